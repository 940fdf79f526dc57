"""The T5 input pipeline: a seq2seq task's rows -> (source, target) texts -> token ids ->
padded batches.

`load_pairs` reads the train / selection / reported splits of a `lora_jax.tasks.Task` of kind
seq2seq (through `lora_jax.data.DataSource`, like every task) and turns rows into texts with
the task's `source_fn` / `target_fn`; `encode_pairs` tokenizes (EOS-terminated, truncated);
`make_batch` pads a batch to bucket lengths for jit.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence

import numpy as np

from lora_jax import data as data_lib
from lora_jax.errors import UserError
from lora_jax.tasks import Task
from t5_hybrid.tasks import pairs_from_rows

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Pairs:
    """A split's (source, target) texts and, once tokenized, their ids (ragged int32,
    EOS-terminated) and `row_lengths` ((N, 2): source and target tokens of every row, computed
    once)."""

    sources: list[str]
    targets: list[str]
    source_ids: list[np.ndarray]
    target_ids: list[np.ndarray]
    row_lengths: np.ndarray | None = None  # None: counted from the ids once tokenized

    def __post_init__(self):
        if self.row_lengths is None and len(self.source_ids) == len(self.sources):
            self.row_lengths = np.array([[len(s), len(t)] for s, t in zip(
                self.source_ids, self.target_ids, strict=True)], np.int64).reshape(-1, 2)

    def __len__(self) -> int:
        return len(self.sources)

    @property
    def lengths(self) -> np.ndarray:
        """(N,) source tokens per row (what batches are sorted and grouped by)."""
        return self.row_lengths[:, 0]

    @property
    def target_lengths(self) -> np.ndarray:
        return self.row_lengths[:, 1]

    def subset(self, idx: Sequence[int]) -> Pairs:
        idx = np.asarray(idx, np.int64)
        pick = lambda field: [field[i] for i in idx] if field else []  # [] when untokenized
        return Pairs(*map(pick, (self.sources, self.targets, self.source_ids, self.target_ids)),
                     None if self.row_lengths is None else self.row_lengths[idx])


def text_pairs(sources: list[str], targets: list[str]) -> Pairs:
    """Untokenized pairs (held-out slices and caps are cut before tokenizing)."""
    return Pairs(sources, targets, [], [])


def _truncate(ids: list[int], max_length: int) -> np.ndarray:
    """At most max_length ids, keeping the final EOS."""
    if len(ids) > max_length:
        ids = ids[: max_length - 1] + ids[-1:]
    return np.asarray(ids, np.int32)


def encode_pairs(pairs: Pairs, tokenizer, max_source: int, max_target: int,
                 where: str = "") -> Pairs:
    """Tokenize (T5 tokenizers end every sequence with EOS) and truncate; a warning counts the
    targets that did not fit, since a truncated target can never be generated exactly."""
    src = tokenizer(list(pairs.sources))["input_ids"] if len(pairs) else []
    tgt = tokenizer(list(pairs.targets))["input_ids"] if len(pairs) else []
    cut = sum(len(x) > max_target for x in tgt)
    if cut:
        log.warning("%s: %d of %d targets are longer than max_target_length=%d tokens (longest "
                    "%d) and are truncated; raise --config.max_target_length", where or "data",
                    cut, len(tgt), max_target, max(len(x) for x in tgt))
    src = [_truncate(x, max_source) for x in src]
    tgt = [_truncate(x, max_target) for x in tgt]
    return Pairs(pairs.sources, pairs.targets, src, tgt)


def make_batch(pairs: Pairs, idx: np.ndarray, batch_size: int, source_buckets: Sequence[int],
               target_buckets: Sequence[int], pad_id: int,
               pad_for: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """input_ids/attention_mask (B, S) and labels/label_mask (B, T) padded to bucket lengths;
    rows past len(idx) are padding (all-zero masks). pad_for: the rows of the whole global
    batch `idx` is a part of (their longest source and target set S and T; default `idx`)."""
    longest = (0, 0)
    if pad_for is not None and len(pad_for):
        longest = (int(pairs.lengths[pad_for].max()), int(pairs.target_lengths[pad_for].max()))
    input_ids, attention_mask = data_lib.pad_to_bucket([pairs.source_ids[i] for i in idx],
                                                       batch_size, source_buckets, pad_id,
                                                       longest[0])
    labels, label_mask = data_lib.pad_to_bucket([pairs.target_ids[i] for i in idx], batch_size,
                                                target_buckets, pad_id, longest[1])
    return dict(input_ids=input_ids, attention_mask=attention_mask, labels=labels,
                label_mask=label_mask)


def load_pairs(source: data_lib.DataSource, task: Task, prefix: str, *, train: bool = True,
               train_split: str = "train", selection_split: str = "",
               skip_empty_rows: bool = False) -> tuple[dict[str, tuple], dict, str]:
    """({split: (sources, targets)}, {split: where it came from}, the selection split's name)
    for train (read from `train_split`, when `train`), the selection split and the task's
    reported splits. selection_split: a split name, ``heldout`` (a slice of train, named
    ``selection``) or "" for the task's own choice."""
    selection = selection_split or task.selection_split
    selection = "" if selection == "heldout" else selection  # a held-out slice of train
    if train and train_split in (selection, *task.eval_splits):
        raise UserError(f"train_split {train_split!r} is also the selection or a reported "
                        f"split of {task.name!r} (selection {selection or 'heldout'!r}, reported "
                        f"{', '.join(task.eval_splits)}); pass --config.selection_split=heldout "
                        "or another train_split")
    wanted = list(dict.fromkeys([*([train_split] if train else []),
                                 *([selection] if selection else []), *task.eval_splits]))
    out, where_from = {}, {}
    for split in wanted:
        rows, where = source.load(task, split)
        name = "train" if train and split == train_split else split
        where_from[name] = where
        out[name] = pairs_from_rows(rows, task, where, prefix, skip_empty_rows)
    return out, where_from, selection or "selection"


