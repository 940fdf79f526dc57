"""A sweep's record on disk: ``<out>.json`` (its name, note and provenance, and the list of its
cells) and one file per cell under ``<out>/``.

A grid of a thousand cells, each keeping its validation predictions for the paired tests, is
megabytes; one file per cell keeps every file small, lets a session add cells without rewriting
the others, and makes each cell's file the cell's own ``results.json`` (its commit, command and
config) with the sweep's tags (``sweep_row``, ``sweep_budget``). `read_record` also reads a
record written before cells had their own files (the cells inline under ``results``).
"""

from __future__ import annotations

import json
import logging
import os

from lora_jax.errors import UserError
from lora_jax.writers import write_json_atomic


def cell_name(experiment: str, task: str, seed: int, budget: str = "") -> str:
    """The name of a cell's folder in the workdir and of its file in the record:
    ``<row>_<task>[_<budget>]_s<seed>``."""
    return "_".join([experiment, task, *([budget] if budget else []), f"s{seed}"])


def cell_key(result: dict) -> tuple[str, str, int, str]:
    """(row, task, seed, budget) of a recorded cell; budget "" in a sweep without budgets."""
    return (result["sweep_row"], result["task"], result["seed"], result.get("sweep_budget", ""))


def write_record(out: str, header: dict, results: list[dict]) -> None:
    """Write each result to ``<out>/<cell>.json``, then ``<out>.json`` = `header` + ``cells``
    (those files' paths relative to the folder of ``<out>.json``), after them, so a record never
    lists a cell that is not written. A cell file that the previous ``<out>.json`` listed and
    this one does not is removed (nothing else in the folder is touched)."""
    folder = os.path.abspath(out)
    base = os.path.basename(folder)
    cells = [f"{base}/{cell_name(*cell_key(r))}.json" for r in results]
    if len(set(cells)) != len(cells):
        raise ValueError("two results of one sweep record name the same cell")
    listed_before = set()
    if os.path.isfile(folder + ".json"):
        with open(folder + ".json") as f:
            listed_before = set(json.load(f).get("cells", []))
    os.makedirs(folder, exist_ok=True)
    for rel, result in zip(cells, results, strict=True):
        write_json_atomic(os.path.join(os.path.dirname(folder), rel), result)
    write_json_atomic(folder + ".json", {**header, "cells": cells})
    stale = sorted(listed_before - set(cells))  # only files this record itself wrote
    for rel in stale:
        path = os.path.join(os.path.dirname(folder), rel)
        if os.path.isfile(path):
            os.remove(path)
    if stale:
        logging.getLogger("lora_jax").warning("sweep: removed %d cell file(s) under %s that "
                                              "the record no longer lists", len(stale), out)


def read_record(path: str) -> dict:
    """A sweep's ``.json`` with ``results``: every cell's result, read from the files it lists
    (or inline, in a record from before cells had their own files). A missing file is an error
    naming it."""
    if not os.path.isfile(path):
        raise UserError(f"{path} does not exist; give a .json written by python -m "
                        "lora_jax.sweep")
    with open(path) as f:
        record = json.load(f)
    if "cells" not in record:
        if "results" not in record:
            raise UserError(f"{path} is not a sweep record (it has neither cells nor results)")
        return record
    folder = os.path.dirname(os.path.abspath(path))
    results = []
    for rel in record["cells"]:
        cell = os.path.join(folder, rel)
        if not os.path.isfile(cell):
            raise UserError(f"{path} lists the cell {rel}, which does not exist next to it")
        with open(cell) as f:
            results.append(json.load(f))
    return {**record, "results": results}
