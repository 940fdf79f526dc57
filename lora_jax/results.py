"""What every results file records beside its figures: the code, the command, the machine; and
the one record of a finished run (results.json).

    provenance()       # {"git_commit", "command", "machine", "date"}
    results_record()   # a run's results.json: metrics, steps, sizes, protocol, provenance

A result must replay: its ``command`` is what a user types from the project root
(``python -m lora_jax.sweep ...``, ``python train.py ...``: no interpreter path, and paths inside
the project or beside it, such as ``../shared``, relative to the project root), and its
``git_commit`` names the code that ran. `code_state` lets a command that writes committed
results refuse a tree with uncommitted changes; where the user allows them anyway (or writes
elsewhere), `diff_digest` records which changes they were.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shlex
import subprocess
import sys
import time
from typing import TYPE_CHECKING

import jax

from lora_jax.errors import UserError
from lora_jax.metrics import pack_array

if TYPE_CHECKING:  # annotations only: the trainer imports this module
    from lora_jax.checkpoint import Best
    from lora_jax.trainer import Experiment

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# what a tree may hold beside the commit and still count as clean: results/ holds what earlier
# commands wrote, not code
NOT_CODE = (":(exclude)results",)
# set by `python -m lora_jax.launch` for the processes it starts: the command the user typed
ENV_COMMAND = "LORA_JAX_COMMAND"


def _git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=30,
                          check=True).stdout


def uncommitted_changes() -> list[str]:
    """``git status --porcelain`` lines of the project's code (tracked changes and untracked,
    not ignored files; results/ excluded)."""
    return [x for x in _git("status", "--porcelain", "--", ".", *NOT_CODE).splitlines() if x]


def diff_digest() -> str:
    """sha256 (first 16 hex digits) of the uncommitted changes: ``git diff HEAD`` of the code
    and the contents of its untracked files."""
    h = hashlib.sha256(_git("diff", "HEAD", "--", ".", *NOT_CODE).encode())
    for name in sorted(_git("ls-files", "--others", "--exclude-standard", "--", ".",
                            *NOT_CODE).splitlines()):
        h.update(name.encode())
        with open(os.path.join(ROOT, name), "rb") as f:
            h.update(f.read())
    return h.hexdigest()[:16]


def git_commit() -> str:
    """The repository's HEAD commit, with ``+dirty`` when the code differs from it."""
    try:
        head = _git("rev-parse", "HEAD").strip()
        dirty = uncommitted_changes()
    except (OSError, subprocess.SubprocessError):
        return "unknown (not a git checkout)"
    return head + ("+dirty" if dirty else "")


def is_committed_results_path(path: str) -> bool:
    """Whether `path` lies in the project's results/ folder (the results that are committed)."""
    results = os.path.join(ROOT, "results")
    return os.path.commonpath([os.path.abspath(path), results]) == results


def code_state(out: str, allow_dirty: bool) -> dict:
    """Before a command writes results to `out` (a path or a path stem): the fields to record
    beside `git_commit` (``{"diff_sha256": ...}`` for a dirty tree, ``{}`` for a clean one or
    outside a git checkout). Uncommitted code changes are refused (a `UserError` naming the
    first changed files) when `out` is in results/, unless `allow_dirty`."""
    try:
        changed = uncommitted_changes()
    except (OSError, subprocess.SubprocessError):
        return {}  # not a git checkout: git_commit says so
    if not changed:
        return {}
    if is_committed_results_path(out) and not allow_dirty:
        names = ", ".join(x[3:] for x in changed[:3]) + (", ..." if len(changed) > 3 else "")
        raise UserError(f"the working tree has uncommitted changes ({names}): commit them before "
                        f"writing {os.path.relpath(out, ROOT)}, so that its git_commit replays "
                        "it, or pass --allow-dirty to record the diff's hash instead")
    return {"diff_sha256": diff_digest()}


def add_allow_dirty(parser) -> None:
    """The ``--allow-dirty`` flag of every command that writes results (`code_state`)."""
    parser.add_argument("--allow-dirty", action="store_true",
                        help="write into results/ from a tree with uncommitted code changes "
                             "(the diff's sha256 is recorded beside git_commit)")


def _relative(arg: str) -> str:
    """A path in the project or beside it (``../shared``) relative to the project root."""
    if not os.path.isabs(arg):
        return arg
    rel = os.path.relpath(arg, ROOT)
    return arg if rel.startswith(os.path.join(os.pardir, os.pardir)) else rel


def user_argument(arg: str) -> str:
    """One argument as typed from the project root: absolute paths made relative, also as the
    value of ``--key=/path``."""
    key, eq, value = arg.partition("=")
    return key + eq + _relative(value) if eq else _relative(arg)


def module_command(module: str, args) -> str:
    """``python -m module args...`` as a user types it from the project root (`user_argument`),
    quoted for the shell: for a command whose arguments arrive as a list, not in sys.argv."""
    return shlex.join(["python", "-m", module, *map(user_argument, args)])


def command_line(argv: list[str] | None = None) -> str:
    """The running command as a user types it from the project root: ``python -m module ...``
    for a module, ``python train.py ...`` for a script, arguments quoted for the shell; in a
    process started by the launcher, the launcher's command."""
    if argv is None and os.environ.get(ENV_COMMAND):
        return os.environ[ENV_COMMAND]
    argv = list(sys.argv if argv is None else argv)
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    program = ["-m", spec.name] if spec is not None and spec.name != "__main__" else (
        [user_argument(argv[0])] if argv and argv[0] else [])
    return shlex.join(["python", *program, *map(user_argument, argv[1:])])


def machine_description() -> str:
    dev = jax.devices()[0]
    processes = (f", {jax.process_count()} processes" if jax.process_count() > 1 else "")
    return (f"{platform.machine()} {dev.platform.upper()} ({dev.device_kind}), "
            f"{jax.device_count()} device(s){processes}, {os.cpu_count()} CPU cores, "
            f"jax {jax.__version__}")


def provenance(command: str | None = None) -> dict:
    """Fields every results file carries: the code, the exact command (default: this process's,
    `command_line`) and the machine."""
    return {"git_commit": git_commit(), "command": command or command_line(),
            "machine": machine_description(), "date": time.strftime("%Y-%m-%d")}


# ----------------------------------------------------------------------------- a run's record


def selection_protocol(sizes: dict[str, int], eval_splits) -> str:
    """The protocol line of a run that selects on a held-out ``selection`` slice of train (or,
    without one, reports its last step)."""
    splits = ", ".join(eval_splits)
    if "selection" in sizes:
        return (f"model selection on a held-out slice of train ({sizes['selection']} rows, never "
                f"trained on); metrics reported on {splits}")
    return f"no selection (last step); metrics reported on {splits}"


def results_record(exp: Experiment, metrics: dict, selection_metrics: dict | None, best: Best,
                   stats: dict, n_trainable: int, n_total: int, wall_seconds: float,
                   placement: dict | None = None, predictions: dict | None = None) -> dict:
    """The one results record (results.json) of every experiment. predictions: {reported
    split: (per-row predictions (N,), labels (N,))}, stored packed
    (`lora_jax.metrics.pack_array`) as ``{"predictions", "labels"}``."""
    cfg = exp.config
    record = {"task": exp.task.name, "experiment": exp.name, "model": exp.model,
              "main_metric": exp.task.main_metric, "metrics": metrics}
    if selection_metrics is not None:
        record["selection_metrics"] = selection_metrics
    seconds = stats["seconds"]
    record.update({
        "best_step": best.step, "last_step": stats["last_step"],
        "total_steps": stats["total_steps"], "stopped_early": stats["stopped_early"],
        "epochs": cfg.num_epochs, "trainable_params": n_trainable, "total_params": n_total,
        "sizes": exp.sizes, "train_seconds": round(seconds, 2),
        "train_examples_per_s": round(stats["examples"] / seconds, 1) if seconds else None,
        "protocol": exp.protocol, "data_sources": exp.sources, "seed": cfg.seed,
        **provenance(), "wall_seconds": round(wall_seconds, 1), **(placement or {}),
    })
    if exp.extra is not None:
        record.update(exp.extra(best.trainable))
    if predictions:
        record["predictions"] = {split: {"predictions": pack_array(p), "labels": pack_array(y)}
                                 for split, (p, y) in predictions.items()}
    record["config"] = cfg.to_dict()
    return record
