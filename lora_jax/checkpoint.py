"""A run's Orbax checkpoints and its workdir: what training writes and what every reader of a
finished run (predict, export, attribute, the AttEns module set) restores.

    mngr = checkpoint_manager(workdir)           # items "state" (trees) and "meta" (JSON)
    save_train_state(mngr, step, trainable, opt_state, best, stopped_early, meta)
    restore_train_state(mngr, trainable, opt_state)   # exact resume
    restore_trainable(workdir)                   # the best tree, on this process's devices

Nothing here trains; `lora_jax.trainer` imports this, never the other way.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from lora_jax.errors import UserError
from lora_jax.sharding import Placement


def checkpoint_manager(workdir: str, max_to_keep: int = 2) -> ocp.CheckpointManager:
    return ocp.CheckpointManager(
        os.path.join(os.path.abspath(workdir), "checkpoints"),
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True),
        item_handlers={"state": ocp.StandardCheckpointHandler(),
                       "meta": ocp.JsonCheckpointHandler()})


@dataclasses.dataclass
class Best:
    """The best trainable tree so far by the selection split's main metric."""

    score: float
    step: int
    trainable: Any


def _state_dict(trainable, opt_state, best_trainable) -> dict:
    return {"trainable": trainable, "opt_state": opt_state, "best_trainable": best_trainable}


def restore_train_state(mngr: ocp.CheckpointManager, trainable, opt_state):
    """(step, trainable, opt_state, best, stopped_early) from the latest checkpoint, written by
    any number of processes (the batches do not depend on it)."""
    step = mngr.latest_step()
    abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct,
                                      _state_dict(trainable, opt_state, trainable))
    restored = mngr.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
    state, loop = restored["state"], restored["meta"]["loop"]
    shards = loop.get("data_shards", 1)  # written by versions that dealt rows to shards
    if shards != 1:
        raise UserError(
            f"the checkpoints in {mngr.directory} were written with data_shards={shards}, a batch "
            f"order this version no longer makes (its batches do not depend on the number of "
            f"processes); train again in a fresh workdir")
    score = -np.inf if loop["best_score"] is None else loop["best_score"]
    best = Best(score, loop["best_step"], state["best_trainable"])
    return step, state["trainable"], state["opt_state"], best, loop["stopped_early"]


def save_train_state(mngr: ocp.CheckpointManager, step: int, trainable, opt_state, best: Best,
                     stopped_early: bool, meta: dict) -> None:
    """Write the state of `step` and wait until it is on disk.

    The best score travels in the JSON metadata as the exact Python float: stored as float32 it
    came back a hair lower, and a resumed run then took an equal later score for a new best.
    Waiting matters too: the next train step donates the buffers of `trainable` and
    `opt_state`, which an asynchronous write might still be reading.
    """
    loop = {"best_score": None if not np.isfinite(best.score) else float(best.score),
            "best_step": int(best.step), "stopped_early": bool(stopped_early),
            "processes": jax.process_count()}
    mngr.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(_state_dict(trainable, opt_state, best.trainable)),
        meta=ocp.args.JsonSave({**meta, "loop": loop})), force=True)
    mngr.wait_until_finished()


def restore_trainable(workdir: str, which: str = "best_trainable", step: int | None = None):
    """Trainable tree (`best_trainable` or `trainable`) and metadata from a run's checkpoints,
    replicated on this process's devices whatever mesh or process count wrote them."""
    mngr = checkpoint_manager(workdir)
    step = mngr.latest_step() if step is None else step
    if step is None:
        raise UserError(f"no checkpoint under {workdir}/checkpoints; train first")
    here = Placement.all_devices().replicated
    abstract = jax.tree_util.tree_map(
        lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=here),
        mngr.item_metadata(step)["state"])
    restored = mngr.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
    return restored["state"][which], restored["meta"]


# ----------------------------------------------------------------------------- workdir


def check_workdir(workdir: str, resume: bool) -> None:
    """Refuse a workdir that holds another run's checkpoints unless resuming (creates nothing,
    so entry points call it before loading data or weights)."""
    ckpt_dir = os.path.join(workdir, "checkpoints")
    if os.path.isdir(ckpt_dir) and os.listdir(ckpt_dir) and not resume:
        raise UserError(f"{workdir} already holds checkpoints; pass --config.resume=True to "
                        "continue that run, or choose a new --workdir")


def prepare_workdir(workdir: str, resume: bool) -> None:
    """Check the workdir (`check_workdir`), then create it."""
    check_workdir(workdir, resume)
    os.makedirs(workdir, exist_ok=True)
