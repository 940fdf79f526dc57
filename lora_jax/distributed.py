"""Several processes, one run: JAX's multi-process runtime and which rows each process feeds.

    initialize()                       # from the environment, before any JAX work
    share = BatchShare.of_this_process(mesh_of(config), batch_size=config.batch_size)
    for step_rows in data.train_order(enc.lengths, batch_size, seed, epoch, grouping):
        batch = make_batch(enc, share.part(step_rows, batch_size), ...)  # this process's rows

The batches do not depend on the number of processes. Every process reads and tokenizes the
whole split and walks the same global plan, the one of a single process
(`lora_jax.data.train_order` / `eval_order`: a function of the data, the seed and the global
batch size only). Process p of P feeds the contiguous positions ``[p*B/P, (p+1)*B/P)`` of each
global batch of B rows: exactly the rows a single process places on those devices, padding
included (a short last batch is padded at its end, so the last parts hold the weight-0 rows).
One process on N devices and N processes of one device each therefore run the same programs on
the same global arrays, and a run may resume on another number of processes.

The outputs of an evaluation are gathered back to every process (`gather_rows`) so that all of
them compute the same metrics and take the same model-selection decisions.
"""

from __future__ import annotations

import dataclasses
import logging
import os

import jax
import numpy as np

from lora_jax import data as data_lib
from lora_jax.errors import UserError
from lora_jax.sharding import check_divisible_by_devices

log = logging.getLogger(__name__)

# What `python -m lora_jax.launch` sets for every process it starts (a cluster job may set
# them too, or rely on `jax.distributed.initialize()`'s auto-detection: LORA_JAX_DISTRIBUTED=auto).
ENV_COORDINATOR = "LORA_JAX_COORDINATOR"
ENV_NUM_PROCESSES = "LORA_JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "LORA_JAX_PROCESS_ID"
ENV_AUTO = "LORA_JAX_DISTRIBUTED"


def initialize(coordinator: str = "", num_processes: int = 0, process_id: int = -1) -> None:
    """Join the multi-process runtime, or do nothing for a single-process run.

    Explicit arguments win; otherwise the ``LORA_JAX_*`` environment (set by
    `lora_jax.launch`); ``LORA_JAX_DISTRIBUTED=auto`` calls ``jax.distributed.initialize()``
    with no arguments so that JAX detects a SLURM / Open MPI / TPU cluster itself. Must run
    before anything asks JAX for its devices.
    """
    coordinator = coordinator or os.environ.get(ENV_COORDINATOR, "")
    num_processes = num_processes or int(os.environ.get(ENV_NUM_PROCESSES, "0") or 0)
    if process_id < 0:
        process_id = int(os.environ.get(ENV_PROCESS_ID, "-1") or -1)
    if os.environ.get(ENV_AUTO) == "auto" and not coordinator:
        jax.distributed.initialize()
    elif num_processes > 1:
        if not coordinator or not 0 <= process_id < num_processes:
            raise UserError(f"a {num_processes}-process run needs a coordinator address and a "
                            f"process id in 0..{num_processes - 1} (got {coordinator!r}, "
                            f"{process_id}); start it with python -m lora_jax.launch")
        jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                                   process_id=process_id)
    else:
        return
    log.info("process %d of %d, %d local of %d devices", jax.process_index(),
             jax.process_count(), jax.local_device_count(), jax.device_count())


def is_main_process() -> bool:
    """Only process 0 writes results, metrics, TensorBoard events, reports and samples."""
    return jax.process_index() == 0


# ----------------------------------------------------------------------------- the deal


@dataclasses.dataclass(frozen=True)
class BatchShare:
    """Process `index` of `count` feeds rows ``[index * b, (index + 1) * b)`` of every global
    batch of B rows, b = B / count (the rows of its devices in the data-parallel placement)."""

    index: int = 0
    count: int = 1

    @classmethod
    def of_this_process(cls, mesh: tuple[int, ...] | None = None,
                        **batch_sizes: int) -> BatchShare:
        """This process's share, after checking that every given batch size (by config key:
        ``batch_size=32``) splits evenly over the processes and over the devices, and that the
        mesh shape (``config.mesh.shape``; None: the default) fits the devices."""
        count = jax.process_count()
        for key, value in batch_sizes.items():
            if value and value % count:
                raise UserError(f"{key} {value} cannot be split evenly over {count} processes; "
                                f"use a multiple of {count}")
        check_divisible_by_devices(mesh, **batch_sizes)
        return cls(jax.process_index(), count)

    def part_size(self, batch_size: int) -> int:
        if batch_size % self.count:
            raise UserError(f"batch size {batch_size} cannot be split evenly over {self.count} "
                            "processes")
        return batch_size // self.count

    def part(self, step_rows: np.ndarray, batch_size: int) -> np.ndarray:
        """The row indices of global batch `step_rows` (at most `batch_size` of them, in batch
        order; a short last batch is padded at its end) this process feeds; possibly empty."""
        size = self.part_size(batch_size)
        return step_rows[self.index * size:(self.index + 1) * size]


# ----------------------------------------------------------------------------- across processes


def barrier(name: str) -> None:
    """Wait until every process gets here (a no-op with one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def gather_rows(values, rows: np.ndarray, n: int):
    """A pytree of host arrays with leading axis len(rows) (this process's rows of an n-row
    split) -> the same pytree with leading axis n, every row filled, on every process."""
    def one(x):
        full = np.zeros((n, *np.shape(x)[1:]), np.asarray(x).dtype)
        full[rows] = x
        return full

    full = jax.tree_util.tree_map(one, values)
    if jax.process_count() == 1:
        return full
    from jax.experimental import multihost_utils

    stacked = multihost_utils.process_allgather(full)  # (processes, n, ...)
    mine = np.zeros(n, np.int64)
    mine[rows] = 1
    owner_of = np.asarray(multihost_utils.process_allgather(mine))  # (processes, n)
    owner = owner_of.argmax(0)
    return jax.tree_util.tree_map(lambda s: np.asarray(s)[owner, np.arange(n)], stacked)


def process_row_range(x) -> tuple[int, int] | None:
    """(start, stop) of this process's rows of a batch-split global array; None when the array
    is all here (one process)."""
    if not isinstance(x, jax.Array) or x.is_fully_addressable:
        return None
    starts = [s.index[0].start or 0 for s in x.addressable_shards]
    stops = [s.index[0].stop if s.index[0].stop is not None else x.shape[0]
             for s in x.addressable_shards]
    return min(starts), max(stops)


def local_rows(x, rows: tuple[int, int] | None) -> np.ndarray:
    """This process's rows `rows` (from `process_row_range` of the input batch) of an output:
    a host array, a batch-split global array or a replicated one."""
    if not isinstance(x, jax.Array) or x.is_fully_addressable:
        x = np.asarray(x)
        return x if rows is None else x[rows[0]:rows[1]]
    if x.is_fully_replicated:
        return np.asarray(x.addressable_shards[0].data)[rows[0]:rows[1]]
    blocks = {}
    for s in x.addressable_shards:  # a row block held by several local devices counts once
        blocks.setdefault(s.index[0].start or 0, np.asarray(s.data))
    return np.concatenate([blocks[k] for k in sorted(blocks)])


def map_batches(fn, num_rows: int, lengths: np.ndarray, batch_size: int, batch_of, *,
                put=lambda b: b, rows: np.ndarray | None = None,
                share: BatchShare | None = None, desc: str = "", progress: bool = False,
                shrink_short: bool = False):
    """``fn(batch)`` over `rows` (default all) of a split, outputs gathered back in row order.

    Global batches come from `lora_jax.data.eval_order` over `rows` (length-sorted: least
    padding), whatever the number of processes. This process builds its part of each with
    ``batch_of(idx, part_size, step_rows)`` (a host batch of `part_size` rows for indices
    `idx`, padded for all of `step_rows`), `put` makes the parts one global batch, and `fn`
    returns a pytree of (B, ...) arrays split over the batch axis like its input (or host
    arrays). B is `batch_size`; with `shrink_short`, a short batch (the last one, or a split
    smaller than a batch) is padded only to `lora_jax.data.short_batch_rows` of its rows: for
    an `fn` whose rows do not see each other (its outputs for a row are the same whatever the
    padding), compiled once more per such size. Returns the same pytree of numpy arrays with
    leading axis len(rows), identical on every process.
    """
    from tqdm.auto import tqdm

    share = share or BatchShare()
    rows = np.arange(num_rows) if rows is None else np.asarray(rows, np.int64)
    position = np.zeros(num_rows, np.int64)
    position[rows] = np.arange(len(rows))
    share.part_size(batch_size)  # splits evenly, or one error line
    devices = jax.device_count()  # a multiple of the devices the batch axis is split over
    out, treedef, filled = None, None, []
    for order in tqdm(data_lib.eval_order(lengths[rows], batch_size), desc=desc, leave=False,
                      disable=not (progress and is_main_process())):
        step_rows = rows[order]
        size = (data_lib.short_batch_rows(len(step_rows), batch_size, devices)
                if shrink_short else batch_size)
        mine = share.part(step_rows, size)
        batch = put(batch_of(mine, share.part_size(size), step_rows))
        rows_here = process_row_range(jax.tree_util.tree_leaves(batch)[0])
        leaves, treedef = jax.tree_util.tree_flatten(fn(batch))
        leaves = [local_rows(x, rows_here) for x in leaves]
        if out is None:
            out = [np.zeros((len(rows), *x.shape[1:]), x.dtype) for x in leaves]
        for gathered, x in zip(out, leaves, strict=True):
            gathered[position[mine]] = x[:len(mine)]
        filled.append(position[mine])
    if treedef is None:
        return None
    mine = np.sort(np.concatenate(filled)) if filled else np.zeros((0,), np.int64)
    return treedef.unflatten(gather_rows([x[mine] for x in out], mine, len(rows)))


def map_encoded(fn, enc: data_lib.Encoded, batch_size: int, buckets, pad_id: int, *,
                put=lambda b: b, rows: np.ndarray | None = None,
                share: BatchShare | None = None, desc: str = "", progress: bool = False):
    """`map_batches` over a tokenized split, batches from `lora_jax.data.make_batch`, short
    batches shrunk (`shrink_short`): `fn` is a per-row encoder pass."""
    return map_batches(
        fn, len(enc), enc.lengths, batch_size,
        lambda idx, size, step_rows: data_lib.make_batch(enc, idx, size, buckets, pad_id,
                                                         step_rows),
        put=put, rows=rows, share=share, desc=desc, progress=progress, shrink_short=True)
