"""Text-to-text tasks of the FLAN-T5 hybrid paper: SST-2, SAMSum, WikiSQL (and a synthetic one).

Each is a `lora_jax.tasks.Task` of kind ``seq2seq`` (registered here on import): it turns a
dataset row into (source text, target text), says where its splits live (the same ``hub`` /
``tfds`` / ``local`` sources as every task, read by `lora_jax.data.load_split`), which split
selects the model and which are reported, and how predictions are scored:

* ``sst2``: target = the label word (``negative`` / ``positive``); accuracy = exact match of the
  generated word;
* ``samsum``: source = dialogue, target = summary; ROUGE-1/2/L F1 (rouge-score, Porter stemming);
* ``wikisql``: source = question + the table's column names, target = ``sql.human_readable``;
  logical-form accuracy = exact match of the generated SQL string.

`prefix` is the hand-written instruction used by the ``base`` and ``full_finetune`` rows.
"""

from __future__ import annotations

import logging

from lora_jax.errors import UserError
from lora_jax.tasks import Task, get_task, register_task

log = logging.getLogger(__name__)


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


SEQ2SEQ = "seq2seq"

for _task in [
    Task("sst2", source_fn=lambda r, w: _text(r, "sentence", w, "sst2"), target_fn=_sst2_target,
         metrics=("accuracy",), prefix="sst2 sentence: ", hub=("nyu-mll/glue", "sst2"),
         tfds="glue/sst2", local="glue/sst2", max_source_length=128, max_target_length=4),
    Task("samsum", source_fn=lambda r, w: _text(r, "dialogue", w, "samsum"),
         target_fn=lambda r, w: _text(r, "summary", w, "samsum"),
         metrics=("rougeL", "rouge1", "rouge2"), prefix="summarize: ", hub=("knkarthick/samsum",),
         local="samsum", splits=(), selection_split="validation", eval_splits=("test",),
         max_source_length=512, max_target_length=96),
    Task("wikisql", source_fn=_wikisql_source, target_fn=_wikisql_target,
         metrics=("logical_form_accuracy",), prefix="translate English to SQL: ",
         hub=("wikisql",), local="wikisql", splits=(), selection_split="validation",
         eval_splits=("test",), max_source_length=256, max_target_length=96),
    # Generated offline by lora_jax.synthetic / t5_hybrid.synthetic (tests, smoke runs).
    Task("synth_sentiment", source_fn=lambda r, w: _text(r, "sentence", w, "synth_sentiment"),
         target_fn=lambda r, w: ("neg", "pos")[int(_field(r, "label", w, "synth_sentiment"))],
         metrics=("accuracy",), prefix="sentiment: ", local="synth/sentiment",
         max_source_length=96, max_target_length=4),
    Task("synth_keyword", source_fn=lambda r, w: _text(r, "sentence", w, "synth_keyword"),
         target_fn=lambda r, w: ("no", "yes")[int(_field(r, "label", w, "synth_keyword"))],
         metrics=("accuracy",), prefix="has a zebra: ", local="synth/keyword",
         max_source_length=64, max_target_length=4),
]:
    register_task(_task)


def get_seq2seq_task(name: str) -> Task:
    return get_task(name, SEQ2SEQ)


def pairs_from_rows(rows: list[dict], task: Task, where: str, prefix: str = "",
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
