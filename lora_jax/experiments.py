"""Config files and the experiment registry shared by train.py, the sweep and the quickstart.

`load_config("configs/x.py")` or `load_config("configs/x.py:arg")` returns the ConfigDict of
`get_config()` / `get_config("arg")`. `run(config, workdir)` dispatches on
``config.experiment`` to the runner registered below (imported lazily, so the core package does
not depend on `ensemble` or `t5_hybrid`).
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
import sys

from lora_jax.errors import UserError

RUNNERS = {
    "ft_lora": "lora_jax.trainer:train_and_evaluate",
    "ffn": "lora_jax.trainer:train_and_evaluate",
    "zero_shot": "lora_jax.trainer:train_and_evaluate",
    "full": "lora_jax.trainer:train_and_evaluate",
    "attens": "ensemble.train:train_attens",
    "t5_hybrid": "t5_hybrid.train:train_t5",
}

# The packages whose INFO lines (selection scores, timings, resumes) the command-line tools show.
PACKAGES = ("lora_jax", "ensemble", "t5_hybrid")


def log_packages_at_info() -> None:
    """Let the project's own loggers through at INFO; other libraries keep the root's level."""
    for package in PACKAGES:
        logging.getLogger(package).setLevel(logging.INFO)


def load_config(spec: str):
    """(module, ConfigDict) of "path/to/config.py[:arg]", with the repository root importable."""
    path, _, arg = spec.partition(":")
    if not os.path.isfile(path):
        raise UserError(f"config file {path!r} does not exist; pass e.g. configs/ft_lora.py")
    root = os.path.dirname(os.path.dirname(os.path.abspath(path)))
    if root not in sys.path:
        sys.path.insert(0, root)
    name = "config_" + os.path.splitext(os.path.basename(path))[0]
    module_spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module, module.get_config(arg) if arg else module.get_config()


def run(config, workdir: str) -> dict:
    """Train and evaluate `config` with its experiment's runner; returns the results dict."""
    target = RUNNERS.get(config.experiment)
    if target is None:
        raise UserError(f"experiment {config.experiment!r} is unknown; use one of "
                        f"{', '.join(RUNNERS)}")
    module, _, fn = target.partition(":")
    return getattr(importlib.import_module(module), fn)(config, workdir)
