"""Config files and the experiment registry shared by train.py, the sweep and the quickstart.

`load_config("configs/x.py")` or `load_config("configs/x.py:arg")` returns the ConfigDict of
`get_config()` / `get_config("arg")`. `run(config, workdir)` dispatches on
``config.experiment`` to the runner that an installed package registered under the entry-point
group ``lora_jax.experiments`` (pyproject.toml: ``ft_lora = "lora_jax.classifier:..."``,
``attens = "ensemble.train:train_attens"``, ...). The core names none of its extensions: a new
experiment is a function ``run(config, workdir) -> results`` plus one entry point.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
import os
import sys

from lora_jax.errors import UserError

ENTRY_POINT_GROUP = "lora_jax.experiments"


def runners() -> dict[str, importlib.metadata.EntryPoint]:
    """{experiment name: entry point} of every installed experiment."""
    return {ep.name: ep for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)}


def log_packages_at_info() -> None:
    """Let the loggers of the packages that provide experiments (and this one) through at INFO
    (selection scores, timings, resumes); other libraries keep the root's level."""
    packages = {"lora_jax"} | {ep.value.split(".")[0] for ep in runners().values()}
    for package in packages:
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


def runner(experiment: str):
    """The run(config, workdir) function registered for `experiment` (imported on first use)."""
    found = runners()
    if not found:
        raise UserError("no experiment is registered: install the project first "
                        "(pip install -e .)")
    if experiment not in found:
        raise UserError(f"experiment {experiment!r} is unknown; use one of "
                        f"{', '.join(sorted(found))}")
    return found[experiment].load()


def run(config, workdir: str) -> dict:
    """Train and evaluate `config` with its experiment's runner; returns the results dict."""
    return runner(config.experiment)(config, workdir)
