"""A finished run on disk and the rows given to it: what `lora_jax.predict`, `lora_jax.export`,
`lora_jax.attribute` and every experiment's run loader share.

    run = load_run(workdir)     # results.json -> the loader its experiment registered
    rows = read_input_rows(path)   # .jsonl / .csv / .txt / ... or - for stdin

`load_run` finds the loader under the entry-point group ``lora_jax.run_loaders``
(`lora_jax.inference.classifier_run`, `ensemble.inference.attens_run`,
`t5_hybrid.inference.t5_run`); the loaders rebuild their models with `run_config` and
`best_variables`. Nothing here builds a model or trains.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import sys

import jax
import ml_collections
import numpy as np

from lora_jax import data as data_lib
from lora_jax import lora as lora_lib
from lora_jax.checkpoint import restore_trainable
from lora_jax.errors import UserError
from lora_jax.tasks import Task

LOADER_GROUP = "lora_jax.run_loaders"
TEXT_SUFFIXES = (".txt",)


# ----------------------------------------------------------------------------- inputs


def read_input_rows(path: str) -> list[dict]:
    """Rows to predict on: a .jsonl / .json / .csv / .tsv / .parquet file (read with
    `datasets`), a .txt file (one ``{"text": line}`` per non-empty line), or ``-`` for stdin
    (JSON lines when the first line starts with ``{``, else text lines)."""
    if path == "-":
        lines = [line.rstrip("\n") for line in sys.stdin]
        return _rows_from_lines(lines, "stdin")
    if path.lower().endswith(TEXT_SUFFIXES):
        if not os.path.isfile(path):
            raise UserError(f"input file {path!r} does not exist")
        with open(path, encoding="utf-8") as f:
            return [{"text": line} for line in f.read().splitlines() if line.strip()]
    return data_lib.read_rows(path)


def _rows_from_lines(lines: list[str], where: str) -> list[dict]:
    lines = [line for line in lines if line.strip()]
    if lines and lines[0].lstrip().startswith("{"):
        rows = []
        for i, line in enumerate(lines):
            try:
                rows.append(json.loads(line))
            except ValueError:
                raise UserError(f"line {i + 1} of {where} is not JSON; send one JSON object "
                                "per line, or plain text lines") from None
        return rows
    return [{"text": line} for line in lines]


def texts_of(rows: list[dict], task: Task, where: str) -> list[tuple[str, ...]]:
    """The task's text columns of every row (a lone ``text`` column serves a one-text task)."""
    if not rows:
        raise UserError(f"{where} has no rows to predict on")
    keys = task.text_keys
    if len(keys) == 1 and keys[0] not in rows[0] and "text" in rows[0]:
        keys = ("text",)
    missing = [k for k in keys if k not in rows[0]]
    if missing:
        raise UserError(f"{where} has no column {missing[0]!r} needed by task {task.name!r} "
                        f"(columns: {', '.join(map(str, rows[0]))}); give rows with "
                        f"{', '.join(task.text_keys)}")
    return [tuple("" if r.get(k) is None else str(r[k]) for k in keys) for r in rows]


# ----------------------------------------------------------------------------- runs


def read_results(workdir: str) -> dict:
    path = os.path.join(workdir, "results.json")
    if not os.path.isfile(path):
        raise UserError(f"{workdir!r} has no results.json; point --workdir at a finished run "
                        "(train.py writes results.json when it ends)")
    with open(path) as f:
        return json.load(f)


def load_run(workdir: str):
    """The finished run in `workdir`, rebuilt by its experiment's registered loader."""
    results = read_results(workdir)
    experiment = results.get("experiment", "")
    loaders = {ep.name: ep for ep in importlib.metadata.entry_points(group=LOADER_GROUP)}
    if experiment not in loaders:
        raise UserError(f"{workdir} is a {experiment!r} run, which no installed package can "
                        f"load (loaders: {', '.join(sorted(loaders)) or 'none; pip install -e .'})")
    return loaders[experiment].load()(workdir, results)


def run_config(results: dict) -> ml_collections.ConfigDict:
    """The config a run trained with (``results.json``'s ``config``)."""
    if "config" not in results:
        raise UserError("results.json has no config; it was not written by this project's "
                        "trainer")
    return ml_collections.ConfigDict(results["config"])


def best_variables(workdir: str, trainable: dict, frozen: dict) -> dict:
    """The run's variables with its best checkpoint's trainable tree (the one its results.json
    reports) in place of `trainable`, each leaf in `trainable`'s dtype."""
    best, _ = restore_trainable(workdir, "best_trainable")
    best = jax.tree_util.tree_map(lambda like, x: np.asarray(x, like.dtype), trainable, best)
    return lora_lib.combine(best, frozen)
