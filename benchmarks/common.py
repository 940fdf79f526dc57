"""What every benchmark records beside its figures, and how it writes them."""

from __future__ import annotations

import json
import os
import platform
import sys
import time


def environment() -> dict:
    """Library versions, the machine the figures were measured on, the code (git commit), the
    date and the exact command."""
    import jax
    import torch

    from lora_jax.trainer import git_commit

    dev = jax.devices()[0]
    return {"jax": jax.__version__, "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
            "machine": f"{platform.machine()} {dev.platform.upper()} ({dev.device_kind}), "
                       f"{os.cpu_count()} CPU cores",
            "git_commit": git_commit(), "date": time.strftime("%Y-%m-%d"),
            "command": command_line()}


def command_line() -> str:
    """The command as typed: ``python -m benchmarks.run ...`` when run as a module."""
    spec = getattr(sys.modules["__main__"], "__spec__", None)
    program = f"-m {spec.name}" if spec is not None else sys.argv[0]
    return " ".join(["python", program, *sys.argv[1:]])


def machine_slug() -> str:
    """A short file-name-safe name of this machine: "cpu_2cores", "gpu_nvidia_h100_80gb_hbm3"."""
    import re

    import jax

    dev = jax.devices()[0]
    if dev.platform == "cpu":
        return f"cpu_{os.cpu_count()}cores"
    return re.sub(r"[^a-z0-9]+", "_", f"{dev.platform}_{dev.device_kind}".lower()).strip("_")


def emit(result: dict, path: str) -> None:
    """Prints `result` as one JSON line; also writes it (indented) to `path` when given."""
    print(json.dumps(result))
    if path:
        with open(path, "w") as f:
            json.dump(result, f, indent=2)
            f.write("\n")
