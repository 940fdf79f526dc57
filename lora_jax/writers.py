"""Metric writing: `metrics.jsonl` (one JSON object per line) and TensorBoard events."""

from __future__ import annotations

import json
import os
import tempfile


class MetricWriter:
    """Appends scalars to <workdir>/metrics.jsonl and TensorBoard (tensorboardX) event files."""

    def __init__(self, workdir: str):
        from tensorboardX import SummaryWriter

        self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")  # noqa: SIM115
        self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

    def write(self, step: int, scalars: dict[str, float]) -> None:
        self._jsonl.write(json.dumps({"step": int(step), **{k: float(v) for k, v in
                                                              scalars.items()}}) + "\n")
        self._jsonl.flush()
        for k, v in scalars.items():
            self._tb.add_scalar(k, float(v), int(step))

    def close(self) -> None:
        self._jsonl.close()
        self._tb.close()


def write_json_atomic(path: str, obj) -> None:
    """Write JSON to a temp file in the same folder, then rename: never a half-written file."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=False)
        f.write("\n")
    os.replace(tmp, path)
