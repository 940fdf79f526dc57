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
            "command": "python " + " ".join(sys.argv)}


def emit(result: dict, path: str) -> None:
    """Prints `result` as one JSON line; also writes it (indented) to `path` when given."""
    print(json.dumps(result))
    if path:
        with open(path, "w") as f:
            json.dump(result, f, indent=2)
            f.write("\n")
