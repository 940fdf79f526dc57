"""What runs and reports write: `metrics.jsonl` (one JSON object per line) and TensorBoard events,
JSON files written atomically, markdown tables."""

from __future__ import annotations

import json
import os
import tempfile


class MetricWriter:
    """Appends scalars to <workdir>/metrics.jsonl and TensorBoard (tensorboardX) event files."""

    def __init__(self, workdir: str, resume_step: int | None = None):
        """A fresh run (resume_step None) starts an empty metrics.jsonl; a resumed one keeps the
        lines up to its checkpoint's step and drops any a killed run wrote after it."""
        from tensorboardX import SummaryWriter

        path = os.path.join(workdir, "metrics.jsonl")
        kept = []
        if resume_step is not None and os.path.isfile(path):
            with open(path) as f:
                kept = [ln for ln in f if ln.strip() and json.loads(ln)["step"] <= resume_step]
        self._jsonl = open(path, "w")  # noqa: SIM115
        self._jsonl.writelines(kept)
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


class NullWriter:
    """A `MetricWriter` that writes nothing: every process but the first of a multi-process
    run (their metrics are the same)."""

    def write(self, step: int, scalars: dict[str, float]) -> None:
        del step, scalars

    def close(self) -> None:
        pass


def write_json_atomic(path: str, obj) -> None:
    """Write JSON to a temp file in the same folder, then rename: never a half-written file."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=False)
        f.write("\n")
    os.chmod(tmp, 0o644)  # mkstemp makes 0600 files; results are meant to be shared
    os.replace(tmp, path)


def write_table(path: str, text: str) -> None:
    """Write a markdown table to `path` and print it (every report command ends so)."""
    with open(path, "w") as f:
        f.write(text)
    print(text)
