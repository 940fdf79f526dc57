"""Several processes, one run: JAX's multi-process runtime and how a split's rows are dealt.

    initialize()                       # from the environment, before any JAX work
    shards = DataShards.from_config(config)
    enc = data.encode(examples, tokenizer, max_length, shards.rows_to_read(len(examples)))
    plan = shards.train_batches(enc.lengths, batch_size, seed, epoch, grouping)  # the same
                                                                     # on every process

Rows. A split of N rows is cut into ``S = config.data_shards`` shards (0: one per process): row
i belongs to shard ``i % S``, and process p reads, tokenizes and feeds only shards
``p*S/P .. (p+1)*S/P - 1``. Global batch t is the concatenation, in shard order, of every
shard's t-th local batch (batch_size / S rows each; a shard that has run out contributes
weight-0 padding). The plan depends on S, never on the number of processes: one process with
``data_shards=2`` trains on exactly the batches two processes with one shard each do, which is
how the tests compare them. With S = 1 (one process, the default) it is the familiar plan of
`lora_jax.data.train_order` / `eval_order`.

Every process must agree on the padded shape of each global batch, so the token lengths of all
rows (not the rows) are shared once after tokenizing (`sum_over_processes`); the outputs of an
evaluation are gathered back to every process (`gather_rows`) so that all of them compute the
same metrics and take the same model-selection decisions.
"""

from __future__ import annotations

import dataclasses
import logging
import os

import jax
import numpy as np

from lora_jax import data as data_lib
from lora_jax.errors import UserError

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
class DataShards:
    """`count` shards (row i in shard i % count); this process owns `owned` (consecutive)."""

    count: int = 1
    owned: tuple[int, ...] = (0,)

    @classmethod
    def for_process(cls, count: int, process: int, processes: int) -> DataShards:
        per = count // processes
        return cls(count, tuple(range(process * per, (process + 1) * per)))

    @classmethod
    def from_config(cls, config) -> DataShards:
        """From ``config.data_shards`` (0 or absent: one per process), checked against the
        process count and every batch size in the config."""
        processes = jax.process_count()
        count = config.get("data_shards", 0) or processes
        if count % processes:
            raise UserError(f"data_shards={count} cannot be dealt evenly to {processes} "
                            f"processes; use a multiple of {processes} (or 0: one per process)")
        for key in ("batch_size", "eval_batch_size", "feature_batch_size"):
            value = config.get(key)
            if value and value % count:
                raise UserError(f"{key} {value} is not divisible by data_shards={count}; use a "
                                f"multiple of {count}")
        return cls.for_process(count, jax.process_index(), processes)

    @property
    def single(self) -> bool:
        return self.count == 1

    def rows(self, n: int) -> np.ndarray:
        """Indices (ascending) of the rows of an n-row split this process reads."""
        owner = np.arange(n) % self.count
        return np.flatnonzero(np.isin(owner, self.owned))

    def rows_to_read(self, n: int) -> np.ndarray | None:
        """`rows(n)`, or None when this process owns every shard (it reads everything)."""
        return None if len(self.owned) == self.count else self.rows(n)

    def _plan(self, rows: np.ndarray, batch_size: int, cut) -> list[list[np.ndarray]]:
        """Per step, one index array per shard (global row indices; possibly empty)."""
        if batch_size % self.count:
            raise UserError(f"batch size {batch_size} is not divisible by data_shards="
                            f"{self.count}")
        local = batch_size // self.count
        per_shard = [rows[rows % self.count == s] for s in range(self.count)]
        orders = [[part[i] for i in cut(part, local, s)] for s, part in enumerate(per_shard)]
        steps = max((len(o) for o in orders), default=0)
        empty = np.zeros((0,), np.int64)
        return [[o[t] if t < len(o) else empty for o in orders] for t in range(steps)]

    def train_batches(self, lengths: np.ndarray, batch_size: int, seed: int, epoch: int,
                      length_grouping: bool) -> list[list[np.ndarray]]:
        """One epoch's steps: per step, each shard's part of the global batch. With one shard,
        exactly `data_lib.train_order`."""
        rows = np.arange(len(lengths))

        def cut(part, local, shard):
            key = seed if self.single else [seed, self.count, shard]
            return data_lib.train_order(lengths[part], local, key, epoch, length_grouping)

        return self._plan(rows, batch_size, cut)

    def eval_batches(self, lengths: np.ndarray, batch_size: int,
                     rows: np.ndarray | None = None) -> list[list[np.ndarray]]:
        """Length-sorted steps over `rows` (default all) of a split; per step each shard's part.
        With one shard, exactly `data_lib.eval_order`."""
        rows = np.arange(len(lengths)) if rows is None else np.asarray(rows, np.int64)
        return self._plan(rows, batch_size,
                          lambda part, local, _: data_lib.eval_order(lengths[part], local))

    def local_parts(self, parts: list[np.ndarray]) -> list[np.ndarray]:
        """The parts of one step this process feeds, in the order its rows go to its devices."""
        return [parts[s] for s in self.owned]


def steps_per_epoch(n: int, batch_size: int, count: int = 1) -> int:
    """Global steps of one epoch of n rows: the local batches of the largest shard."""
    largest_shard = -(-n // count)
    return -(-largest_shard // (batch_size // count))


# ----------------------------------------------------------------------------- across processes


def barrier(name: str) -> None:
    """Wait until every process gets here (a no-op with one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def sum_over_processes(x: np.ndarray) -> np.ndarray:
    """Element-wise sum of a host array over the processes (each contributes its rows, zeros
    elsewhere); the array itself when there is one process."""
    if jax.process_count() == 1:
        return x
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x)).sum(0).astype(x.dtype)


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


def spread_rows(columns: list[list[np.ndarray]], rows: np.ndarray, n: int):
    """Columns of per-row arrays of this process's `rows` -> length-n lists (empty arrays for
    the rows of other processes), and the (n, columns) lengths of every row's arrays, shared by
    all processes."""
    empty = np.zeros((0,), np.int32)
    spread = []
    for column in columns:
        full = [empty] * n
        for i, x in zip(rows, column, strict=True):
            full[i] = x
        spread.append(full)
    lengths = np.zeros((n, len(columns)), np.int64)
    for j, column in enumerate(columns):
        lengths[rows, j] = [len(x) for x in column]
    return spread, sum_over_processes(lengths)


def concat_batches(batches: list[dict]) -> dict:
    """Host batches (dicts of arrays, leading axis = rows) one after another."""
    if len(batches) == 1:
        return batches[0]
    return jax.tree_util.tree_map(lambda *xs: np.concatenate(xs), *batches)


def map_batches(fn, num_rows: int, lengths: np.ndarray, batch_size: int, batch_of, *,
                put=lambda b: b, rows: np.ndarray | None = None,
                shards: DataShards | None = None, desc: str = "", progress: bool = False):
    """``fn(batch)`` over `rows` (default all) of a split, outputs gathered back in row order.

    Steps come from `DataShards.eval_batches` (length-sorted: least padding). This process
    builds its parts of each global batch with ``batch_of(idx, part_size, step_rows)`` (a host
    batch of `part_size` rows for indices `idx`, padded for all of `step_rows`), `put` makes
    them one global batch, and `fn` returns a pytree of (batch_size, ...) arrays split over the
    batch axis like its input (or host arrays). Returns the same pytree of numpy arrays with
    leading axis len(rows), identical on every process.
    """
    from tqdm.auto import tqdm

    shards = shards or DataShards()
    rows = np.arange(num_rows) if rows is None else np.asarray(rows, np.int64)
    position = np.zeros(num_rows, np.int64)
    position[rows] = np.arange(len(rows))
    part_size = batch_size // shards.count
    out, treedef, filled = None, None, []
    for parts in tqdm(shards.eval_batches(lengths, batch_size, rows), desc=desc, leave=False,
                      disable=not (progress and is_main_process())):
        mine, step_rows = shards.local_parts(parts), np.concatenate(parts)
        batch = put(concat_batches([batch_of(p, part_size, step_rows) for p in mine]))
        rows_here = process_row_range(jax.tree_util.tree_leaves(batch)[0])
        leaves, treedef = jax.tree_util.tree_flatten(fn(batch))
        leaves = [local_rows(x, rows_here) for x in leaves]
        if out is None:
            out = [np.zeros((len(rows), *x.shape[1:]), x.dtype) for x in leaves]
        for j, part in enumerate(mine):
            for gathered, x in zip(out, leaves, strict=True):
                gathered[position[part]] = x[j * part_size: j * part_size + len(part)]
            filled.append(position[part])
    if treedef is None:
        return None
    mine = np.sort(np.concatenate(filled)) if filled else np.zeros((0,), np.int64)
    return treedef.unflatten(gather_rows([x[mine] for x in out], mine, len(rows)))


def map_encoded(fn, enc: data_lib.Encoded, batch_size: int, buckets, pad_id: int, *,
                put=lambda b: b, rows: np.ndarray | None = None,
                shards: DataShards | None = None, desc: str = "", progress: bool = False):
    """`map_batches` over a tokenized split, batches from `lora_jax.data.make_batch`."""
    return map_batches(
        fn, len(enc), enc.lengths, batch_size,
        lambda idx, size, step_rows: data_lib.make_batch(enc, idx, size, buckets, pad_id,
                                                         step_rows),
        put=put, rows=rows, shards=shards, desc=desc, progress=progress)
