"""Text-to-text tasks of the FLAN-T5 hybrid paper: SST-2, SAMSum, WikiSQL (and a synthetic one).

A task turns a dataset row into (source text, target text), says where its splits live (the same
``hub`` / ``tfds`` / ``local`` sources as `lora_jax.tasks`, read by `lora_jax.data.load_split`),
which split selects the model and which are reported, and how predictions are scored:

* ``sst2``: target = the label word (``negative`` / ``positive``); accuracy = exact match of the
  generated word;
* ``samsum``: source = dialogue, target = summary; ROUGE-1/2/L F1 (rouge-score, Porter stemming);
* ``wikisql``: source = question + the table's column names, target = ``sql.human_readable``;
  logical-form accuracy = exact match of the generated SQL string.

`prefix` is the hand-written instruction used by the ``base`` and ``full_finetune`` rows.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable

from lora_jax.errors import UserError

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Seq2SeqTask:
    """One text-to-text task. Metrics are fractions in [0, 1]; the first is the main one."""

    name: str
    source_fn: Callable[[dict, str], str]  # (row, where) -> source text; raises UserError
    target_fn: Callable[[dict, str], str]
    metrics: tuple[str, ...]
    prefix: str
    hub: tuple[str, ...] = ()
    tfds: str = ""
    local: str = ""
    splits: tuple[tuple[str, str], ...] = ()  # our name -> the source's split name
    selection_split: str = ""  # "" : a held-out slice of train (config.selection_size)
    eval_splits: tuple[str, ...] = ("validation",)
    max_source_length: int = 256
    max_target_length: int = 64

    @property
    def main_metric(self) -> str:
        return self.metrics[0]

    def source_split(self, split: str) -> str:
        return dict(self.splits).get(split, split)


def _field(row: dict, key: str, where: str, task: str):
    if key not in row:
        raise UserError(f"{where}: a row has no field {key!r} needed by task {task!r} (fields: "
                        f"{', '.join(map(str, row))}); fix the file or choose the right task")
    return row[key]


class EmptyTextError(UserError):
    """A row whose source or target text is empty (`skip_empty` drops such rows instead)."""


def _text(row: dict, key: str, where: str, task: str) -> str:
    value = _field(row, key, where, task)
    if not isinstance(value, str) or not value.strip():
        raise EmptyTextError(f"{where}: row with {key}={value!r} has an empty {key}; task "
                             f"{task!r} needs a non-empty {key} in every row (fix or drop that "
                             "row, or pass --config.skip_empty_rows=True to skip such rows)")
    return value


SST2_WORDS = ("negative", "positive")


def _sst2_target(row: dict, where: str) -> str:
    label = _field(row, "label", where, "sst2")
    if label not in (0, 1):
        raise UserError(f"{where}: SST-2 label {label!r} is not 0 or 1; fix the data")
    return SST2_WORDS[label]


def _wikisql_source(row: dict, where: str) -> str:
    question = _text(row, "question", where, "wikisql")
    table = _field(row, "table", where, "wikisql")
    header = table.get("header") if isinstance(table, dict) else None
    if not header:
        raise UserError(f"{where}: WikiSQL question {question!r} has no table header "
                        "(table.header); the source needs the column names — use the full "
                        "WikiSQL rows (hub 'wikisql' or ../shared/data/wikisql)")
    return f"{question} table: {' | '.join(map(str, header))}"


def _wikisql_target(row: dict, where: str) -> str:
    sql = _field(row, "sql", where, "wikisql")
    if not isinstance(sql, dict) or not sql.get("human_readable"):
        raise UserError(f"{where}: WikiSQL row has no sql.human_readable target; fix the data")
    return sql["human_readable"]


TASKS: dict[str, Seq2SeqTask] = {t.name: t for t in [
    Seq2SeqTask("sst2", lambda r, w: _text(r, "sentence", w, "sst2"), _sst2_target,
                ("accuracy",), "sst2 sentence: ", hub=("nyu-mll/glue", "sst2"),
                tfds="glue/sst2", local="glue/sst2", max_source_length=128, max_target_length=4),
    Seq2SeqTask("samsum", lambda r, w: _text(r, "dialogue", w, "samsum"),
                lambda r, w: _text(r, "summary", w, "samsum"),
                ("rougeL", "rouge1", "rouge2"), "summarize: ", hub=("knkarthick/samsum",),
                local="samsum", selection_split="validation", eval_splits=("test",),
                max_source_length=512, max_target_length=96),
    Seq2SeqTask("wikisql", _wikisql_source, _wikisql_target, ("logical_form_accuracy",),
                "translate English to SQL: ", hub=("wikisql",), local="wikisql",
                selection_split="validation", eval_splits=("test",), max_source_length=256,
                max_target_length=96),
    # Generated offline by lora_jax.synthetic / t5_hybrid.synthetic (tests, smoke runs).
    Seq2SeqTask("synth_sentiment", lambda r, w: _text(r, "sentence", w, "synth_sentiment"),
                lambda r, w: ("neg", "pos")[int(_field(r, "label", w, "synth_sentiment"))],
                ("accuracy",), "sentiment: ", local="synth/sentiment", max_source_length=96,
                max_target_length=4),
    Seq2SeqTask("synth_keyword", lambda r, w: _text(r, "sentence", w, "synth_keyword"),
                lambda r, w: ("no", "yes")[int(_field(r, "label", w, "synth_keyword"))],
                ("accuracy",), "has a zebra: ", local="synth/keyword", max_source_length=64,
                max_target_length=4),
]}


def get_task(name: str) -> Seq2SeqTask:
    if name not in TASKS:
        raise UserError(f"unknown t5 task {name!r}; choose one of {', '.join(TASKS)}")
    return TASKS[name]


def pairs_from_rows(rows: list[dict], task: Seq2SeqTask, where: str, prefix: str = "",
                    skip_empty: bool = False) -> tuple[list[str], list[str]]:
    """(sources, targets) of every row, each checked; `prefix` is prepended to the sources.

    A row with an empty text is an error, or with `skip_empty` is dropped (and counted in a
    warning; the real SAMSum train split has one such dialogue).
    """
    if not rows:
        raise UserError(f"{where} has no rows for task {task.name!r}; point the config at a "
                        "non-empty split")
    sources, targets, skipped = [], [], 0
    for row in rows:
        try:
            source, target = task.source_fn(row, where), task.target_fn(row, where)
        except EmptyTextError:
            if not skip_empty:
                raise
            skipped += 1
            continue
        sources.append(prefix + source)
        targets.append(target)
    if skipped:
        log.warning("%s: skipped %d of %d rows with an empty text", where, skipped, len(rows))
    if not sources:
        raise UserError(f"{where}: every row has an empty text for task {task.name!r}")
    return sources, targets
