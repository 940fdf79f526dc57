"""Data: read a task's splits, validate them, tokenize, and cut them into padded batches.

Flow: `DataSource.load` (rows as dicts, from local files / hub / TFDS / user files, all read
with `datasets`) -> `examples_from_rows` (texts + labels, every row checked) -> `load_examples`
(`SplitSizes.cut`: held-out selection slice, size caps) -> `load_tokenizer` + `encode` (token ids, fast
tokenizer) -> `train_order` / `eval_order` (index batches) -> `make_batch` (numpy arrays padded
to one of a few bucket lengths, so jit compiles a bounded number of shapes).
"""

from __future__ import annotations

import csv
import dataclasses
import math
import os
import tempfile
from collections.abc import Mapping, Sequence

import numpy as np

from lora_jax.errors import UserError, extra_install_hint
from lora_jax.tasks import Task

LOCAL_EXTENSIONS = (".jsonl.gz", ".jsonl", ".json", ".csv", ".tsv", ".parquet")


# ----------------------------------------------------------------------------- reading rows


# file name ending -> (datasets builder, its options)
READERS = {".jsonl.gz": ("json", {}), ".json.gz": ("json", {}), ".jsonl": ("json", {}),
           ".json": ("json", {}), ".csv": ("csv", {}),
           ".tsv": ("csv", {"delimiter": "\t", "quoting": csv.QUOTE_NONE}),
           ".parquet": ("parquet", {})}


def read_rows(path: str) -> list[dict]:
    """Rows of one file (.jsonl[.gz], .json, .csv, .tsv, .parquet) as a list of dicts, read with
    ``datasets.load_dataset(<builder>, data_files=path)``."""
    if not os.path.isfile(path):
        raise UserError(f"data file {path!r} does not exist; check the path in the config")
    ending = next((e for e in READERS if path.lower().endswith(e)), None)
    if ending is None:
        raise UserError(f"unsupported data file {path!r}; use one of "
                        f"{', '.join(LOCAL_EXTENSIONS)}")
    import datasets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)
    builder, options = READERS[ending]
    try:  # a private, throw-away cache: a file edited in place is never served stale
        with tempfile.TemporaryDirectory(prefix="lora_jax_rows_") as cache:
            return datasets.load_dataset(builder, data_files=path, split="train", cache_dir=cache,
                                         keep_in_memory=True, **options).to_list()
    except StopIteration:  # the json builder's answer to a file without a single row
        return []
    except Exception as e:  # noqa: BLE001 - every parser error becomes one line naming the file
        cause = e.__cause__ or e
        detail = str(cause).splitlines()[0][:160] if str(cause) else ""
        raise UserError(f"cannot parse {path!r} ({type(cause).__name__}: {detail}); fix the "
                        "file or its extension") from None


def local_split_path(data_dir: str, task: Task, split: str) -> str:
    """`<data_dir>/<task.local>/<split>.<ext>` for the first extension that exists."""
    if not os.path.isdir(data_dir):
        raise UserError(f"data_dir {data_dir!r} does not exist; pass --config.data_dir=DIR "
                        "(the ../shared/data layout) or leave it empty to use the hub")
    if not task.local:
        raise UserError(f"task {task.name!r} has no local layout; give its files in "
                        "config.data_files")
    stem = os.path.join(data_dir, task.local, task.source_split(split))
    for ext in LOCAL_EXTENSIONS:
        if os.path.isfile(stem + ext):
            return stem + ext
    raise UserError(f"no {split!r} split for task {task.name!r}: {stem}.jsonl.gz (or .jsonl/.csv/"
                    f".tsv/.parquet) is missing; add the file or set config.data_files.{split}")


def _hub_rows(task: Task, split: str) -> list[dict]:
    if not task.hub:
        raise UserError(f"task {task.name!r} has no hub dataset; set config.data_dir or "
                        "config.data_files")
    try:
        import datasets

        ds = datasets.load_dataset(*task.hub, split=task.source_split(split))
    except Exception as e:
        raise UserError(f"could not load {'/'.join(task.hub)} split {split!r} from the Hugging "
                        f"Face Hub ({type(e).__name__}); when offline pass "
                        "--config.data_dir=../shared/data") from None
    return ds.to_list()


def _tfds_rows(task: Task, split: str) -> list[dict]:
    if not task.tfds:
        raise UserError(f"task {task.name!r} has no TFDS name; use data_source='hub' or 'local'")
    try:
        import tensorflow_datasets as tfds
    except ImportError:
        raise UserError("data_source='tfds' needs tensorflow-datasets: "
                        + extra_install_hint("tfds")) from None
    try:
        ds = tfds.as_numpy(tfds.load(task.tfds, split=task.source_split(split)))
    except Exception as e:
        raise UserError(f"could not load TFDS {task.tfds!r} split {split!r} "
                        f"({type(e).__name__}); check the name or use data_source='local'") from None
    decode = lambda v: v.decode("utf-8") if isinstance(v, bytes) else v
    return [{k: decode(v) for k, v in row.items()} for row in ds]


@dataclasses.dataclass(frozen=True)
class DataSource:
    """Where a task's splits are read from.

    kind: ``local`` (``<data_dir>/<task path>/<split>.<ext>``, the ../shared/data layout), ``hub``
    (the task's Hugging Face dataset), ``tfds`` (its TFDS name) or ``files`` (only `files`).
    files: split name -> one file; a split named here is read from it whatever the kind.
    """

    kind: str
    data_dir: str = ""
    files: Mapping[str, str] = dataclasses.field(default_factory=dict)

    @classmethod
    def of(cls, config) -> DataSource:
        """From ``config.data_source`` / ``data_dir`` / ``data_files``; ``auto`` is local if
        data_dir is set, files if any data_files entry is, else hub."""
        files = {k: v for k, v in config.data_files.items() if v}
        kind = config.data_source
        if kind == "auto":
            kind = "local" if config.data_dir else "files" if files else "hub"
        return cls(kind, config.data_dir, files)

    def load(self, task: Task, split: str) -> tuple[list[dict], str]:
        """(rows, where): the rows of `split` and a description of where they came from."""
        if split in self.files:
            return read_rows(self.files[split]), self.files[split]
        if self.kind == "local":
            path = local_split_path(self.data_dir, task, split)
            return read_rows(path), path
        if self.kind == "hub":
            return _hub_rows(task, split), f"hub:{'/'.join(task.hub)}"
        if self.kind == "tfds":
            return _tfds_rows(task, split), f"tfds:{task.tfds}"
        if self.kind == "files":
            raise UserError(f"config.data_files has no {split!r} entry; add "
                            f"--config.data_files.{split}=PATH")
        raise UserError(f"unknown data_source {self.kind!r}; use local, hub, tfds or files")


# ----------------------------------------------------------------------------- examples


@dataclasses.dataclass
class Examples:
    """Texts and labels of one split. texts: one tuple of 1 or 2 strings per example."""

    texts: list[tuple[str, ...]]
    labels: np.ndarray  # (N,) int32 class ids, or float32 targets for regression

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, idx: Sequence[int]) -> Examples:
        return Examples([self.texts[i] for i in idx], self.labels[np.asarray(idx, np.int64)])


def examples_from_rows(rows: list[dict], task: Task, where: str) -> Examples:
    """Pick the task's columns and check every label; raises UserError naming the row."""
    if not rows:
        raise UserError(f"{where} has no rows for task {task.name!r}; point the config at a "
                        "non-empty split")
    for key in (*task.text_keys, task.label_key):
        if key not in rows[0]:
            raise UserError(f"{where} has no column {key!r} needed by task {task.name!r} "
                            f"(columns: {', '.join(map(str, rows[0]))}); fix the file or the "
                            "task's text_keys/label_key")
    texts = [tuple("" if r[k] is None else str(r[k]) for k in task.text_keys) for r in rows]
    raw = [r[task.label_key] for r in rows]
    try:
        labels = np.asarray(raw, np.float32 if task.is_regression else np.float64)
    except (TypeError, ValueError):
        bad = next(i for i, v in enumerate(raw) if not _is_number(v))
        raise UserError(f"row {bad} of {where} has label {raw[bad]!r}, not a number; task "
                        f"{task.name!r} needs numeric labels") from None
    if task.is_regression:
        lo, hi = task.label_range or (-math.inf, math.inf)
        bad = np.flatnonzero(~np.isfinite(labels) | (labels < lo) | (labels > hi))
        if bad.size:
            raise UserError(f"row {bad[0]} of {where} has target {labels[bad[0]]}, outside "
                            f"[{lo}, {hi}] for task {task.name!r}; fix the data or the task")
        return Examples(texts, labels)
    bad = np.flatnonzero((labels != np.round(labels)) | (labels < 0) | (labels >= task.num_labels))
    if bad.size:
        raise UserError(f"row {bad[0]} of {where} has label {raw[bad[0]]!r}, outside the "
                        f"{task.num_labels} classes 0..{task.num_labels - 1} of task "
                        f"{task.name!r}; fix the labels or choose the right task/num_labels")
    return Examples(texts, labels.astype(np.int32))


def _is_number(v) -> bool:
    try:
        float(v)
        return True
    except (TypeError, ValueError):
        return False


def hold_out(train: Examples, size: float, seed: int) -> tuple[Examples, Examples]:
    """(train_rest, held_out): a seeded slice of train for model selection.

    size < 1 is a fraction of train, size >= 1 a count. The held-out rows never train.
    """
    n = len(train)
    k = int(round(size * n)) if size < 1 else int(size)
    if not 0 < k < n:
        raise UserError(f"selection_size={size} leaves {n - k} of {n} training rows; use a "
                        "fraction in (0, 1) or a count below the train size")
    perm = np.random.default_rng(seed).permutation(n)
    return train.subset(np.sort(perm[k:])), train.subset(np.sort(perm[:k]))


EVAL_SUBSET_SEED = 20240601  # fixed: every seed is scored on the same eval rows


def random_subset(n: int, size: int, seed: int) -> np.ndarray | None:
    """Sorted indices of a seeded random `size` of `n` rows, or None when nothing is cut."""
    if not size or n <= size:
        return None
    return np.sort(np.random.default_rng(seed).permutation(n)[:size])


def cap(split, n: int, seed: int):
    """A seeded random `n` rows of `split` (Examples, or anything with len and subset; all of
    them when n is 0 or not smaller), in their original order."""
    keep = random_subset(len(split), n, seed)
    return split if keep is None else split.subset(keep)


@dataclasses.dataclass(frozen=True)
class SplitSizes:
    """How a task's splits are cut before tokenizing, the same for every kind of task.

    train_budget: the labelled target rows a run may see in all (few-shot), drawn from train
    with the seed before anything else, so the selection slice comes out of the same budget
    (0: all of train). selection_size: the slice of train held out for model selection (a
    fraction below 1, or a count; 0: none). max_train_examples / max_eval_examples: random caps
    (0: all).
    """

    selection_size: float = 0
    max_train_examples: int = 0
    max_eval_examples: int = 0
    train_budget: int = 0

    @classmethod
    def of(cls, config) -> SplitSizes:
        return cls(config.selection_size, config.max_train_examples, config.max_eval_examples,
                   config.train_budget)

    def cut(self, splits: dict, seed: int, selection_from_train: bool) -> dict:
        """{name: split} after the cuts: train cut to its budget (seed + 2); when
        `selection_from_train`, a seeded ``selection`` slice of train held out (`hold_out`);
        train capped with seed + 1; every other split capped with `EVAL_SUBSET_SEED` (some
        splits are sorted by label), so every seed is scored on the same rows."""
        out = dict(splits)
        if "train" in out:
            if self.train_budget > len(out["train"]):
                raise UserError(f"train_budget={self.train_budget} is larger than the "
                                f"{len(out['train'])} rows of the train split; use at most "
                                f"{len(out['train'])} or 0 for all")
            out["train"] = cap(out["train"], self.train_budget, seed + 2)
            if selection_from_train:
                out["train"], out["selection"] = hold_out(out["train"], self.selection_size, seed)
            out["train"] = cap(out["train"], self.max_train_examples, seed + 1)
        return {name: split if name == "train" else cap(split, self.max_eval_examples,
                                                        EVAL_SUBSET_SEED)
                for name, split in out.items()}


def load_examples(source: DataSource, task: Task, sizes: SplitSizes, seed: int,
                  train: bool = True) -> tuple[dict[str, Examples], dict[str, str]]:
    """The train (when `train`), selection and reported splits of a classification task as
    Examples, cut by `sizes` (selection held out of train when sizes.selection_size); and where
    each split came from. Train is read without `train` only to hold out the selection slice."""
    sources, out = {}, {}
    for split in (*(["train"] if train or sizes.selection_size else []), *task.eval_splits):
        rows, where = source.load(task, split)
        sources[split] = where
        out[split] = examples_from_rows(rows, task, where)
    out = sizes.cut(out, seed, selection_from_train=bool(sizes.selection_size))
    if not train:
        out.pop("train", None)  # its source stays: the selection slice came from it
    return out, sources


def load_tokenizer(model_dir: str, name: str = ""):
    """The fast tokenizer of a model folder (or `name`, a folder or hub id)."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(name or model_dir, use_fast=True)
    except Exception as e:  # noqa: BLE001 - transformers raises many kinds here
        raise UserError(f"could not load a tokenizer from {name or model_dir!r} "
                        f"({type(e).__name__}); the model folder needs tokenizer.json or "
                        "vocab.txt, or set --config.tokenizer=PATH") from None
    if not tok.is_fast:
        raise UserError(f"tokenizer at {name or model_dir!r} is not a fast tokenizer; "
                        "provide tokenizer.json")
    return tok


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of the tokenizer's full serialised state (vocabulary, normaliser, special tokens):
    two tokenizers with one fingerprint tokenize every text the same way."""
    import hashlib

    state = tokenizer.backend_tokenizer.to_str() if getattr(tokenizer, "is_fast", False) \
        else repr(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(state.encode()).hexdigest()


# ----------------------------------------------------------------------------- tokens


@dataclasses.dataclass
class Encoded:
    """Token ids of a split: ragged lists of int32 arrays, labels (N,), and every row's token
    count `row_lengths` (N,), computed once (batches are padded and ordered by it)."""

    input_ids: list[np.ndarray]
    token_type_ids: list[np.ndarray]
    labels: np.ndarray
    row_lengths: np.ndarray | None = None  # None: counted from input_ids

    def __post_init__(self):
        if self.row_lengths is None:
            self.row_lengths = np.fromiter((len(x) for x in self.input_ids), np.int64,
                                           len(self.input_ids))

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def lengths(self) -> np.ndarray:
        return self.row_lengths

    def subset(self, idx) -> Encoded:
        idx = np.asarray(idx, np.int64)
        return Encoded([self.input_ids[i] for i in idx], [self.token_type_ids[i] for i in idx],
                       self.labels[idx], self.row_lengths[idx])


def encode(examples: Examples, tokenizer, max_length: int) -> Encoded:
    """Tokenize (truncating pairs longest-first) to at most max_length tokens per example."""
    texts = examples.texts
    first = [t[0] for t in texts]
    second = [t[1] for t in texts] if texts and len(texts[0]) > 1 else None
    out = tokenizer(first, second, truncation=True, max_length=max_length,
                    return_token_type_ids=True, return_attention_mask=False) if texts else {
                        "input_ids": [], "token_type_ids": []}
    ids = [np.asarray(x, np.int32) for x in out["input_ids"]]
    types = [np.asarray(x, np.int32) for x in out["token_type_ids"]]
    return Encoded(ids, types, examples.labels)


def bucket_lengths(max_length: int, buckets: Sequence[int]) -> tuple[int, ...]:
    """Sorted padded lengths: the configured buckets below max_length, plus max_length."""
    return tuple(sorted({b for b in buckets if b < max_length} | {max_length}))


def pad_to_bucket(seqs: Sequence[np.ndarray], batch_size: int, buckets: Sequence[int],
                  pad_id: int, longest: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(ids, mask), each int32 (batch_size, smallest bucket >= the longest of `seqs` and
    `longest`): the sequences left-aligned, `pad_id` and mask 0 after them and in the rows past
    len(seqs). `longest` makes the parts of one global batch (`lora_jax.distributed`) agree."""
    longest = max(longest, 1, *(len(s) for s in seqs))
    length = next(b for b in buckets if b >= longest)
    ids = np.full((batch_size, length), pad_id, np.int32)
    mask = np.zeros((batch_size, length), np.int32)
    for row, s in enumerate(seqs):
        ids[row, : len(s)], mask[row, : len(s)] = s, 1
    return ids, mask


def make_batch(enc: Encoded, idx: np.ndarray, batch_size: int, buckets: Sequence[int],
               pad_id: int, pad_for: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Arrays for the examples `idx`, padded to (batch_size, smallest bucket >= longest).

    Rows past len(idx) are padding with weight 0. Keys: input_ids, attention_mask,
    token_type_ids (int32, (B, T)), labels (B,), weights (B,) float32. pad_for: the rows of
    the whole global batch `idx` is a part of (their longest sets T; default `idx`).
    """
    longest = int(enc.lengths[pad_for].max()) if pad_for is not None and len(pad_for) else 0
    ids, mask = pad_to_bucket([enc.input_ids[i] for i in idx], batch_size, buckets, pad_id,
                              longest)
    types, _ = pad_to_bucket([enc.token_type_ids[i] for i in idx], batch_size, (ids.shape[1],), 0)
    labels = np.zeros((batch_size,), enc.labels.dtype)
    labels[: len(idx)] = enc.labels[idx]
    weights = np.zeros((batch_size,), np.float32)
    weights[: len(idx)] = 1.0
    return dict(input_ids=ids, attention_mask=mask, token_type_ids=types, labels=labels,
                weights=weights)


def train_order(lengths: np.ndarray, batch_size: int, seed, epoch: int,
                length_grouping: bool = True, group_batches: int = 50) -> list[np.ndarray]:
    """Index batches of one epoch; a pure function of (seed, epoch), so resuming is exact.

    With length_grouping, each chunk of `group_batches` batches is sorted by length before it is
    cut (less padding, same randomness across chunks), and batch order is shuffled again.
    The last batch may be short (it is padded with weight-0 rows).
    """
    rng = np.random.default_rng([*np.atleast_1d(seed), epoch])
    perm = rng.permutation(len(lengths))
    if length_grouping:
        chunk = batch_size * group_batches
        perm = np.concatenate([
            c[np.argsort(lengths[c], kind="stable")]
            for c in np.array_split(perm, max(1, math.ceil(len(perm) / chunk)))])
    batches = [perm[i:i + batch_size] for i in range(0, len(perm), batch_size)]
    order = rng.permutation(len(batches)) if length_grouping else np.arange(len(batches))
    return [batches[i] for i in order]


def steps_per_epoch(num_rows: int, batch_size: int) -> int:
    """Batches of one epoch of `num_rows` rows (`train_order`, `eval_order`): the last may be
    short."""
    return -(-num_rows // batch_size)


SMALLEST_SHORT_BATCH = 8


def short_batch_rows(n: int, batch_size: int, unit: int = 1,
                     smallest: int = SMALLEST_SHORT_BATCH) -> int:
    """Rows to pad a batch of n <= batch_size examples to: the smallest of batch_size,
    batch_size / 2, batch_size / 4, ... that holds n, is at least `smallest` and a multiple of
    `unit` (the devices the batch is split over). A few-shot selection slice of 4 rows then
    runs as 8 rows instead of a whole eval batch of 128, and jit sees at most
    log2(batch_size / smallest) + 1 batch sizes."""
    if n > batch_size:
        raise ValueError(f"a batch of {n} rows does not fit batch_size {batch_size}")
    size = batch_size
    while size % 2 == 0 and size // 2 >= max(n, smallest) and (size // 2) % unit == 0:
        size //= 2
    return size


def eval_order(lengths: np.ndarray, batch_size: int) -> list[np.ndarray]:
    """Index batches sorted by length (least padding); predictions are scattered back by index."""
    perm = np.argsort(lengths, kind="stable")
    return [perm[i:i + batch_size] for i in range(0, len(perm), batch_size)]
