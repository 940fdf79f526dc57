"""Result tables: print runs to the terminal and write markdown tables from results.json files."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence


def _main_score(result: dict) -> tuple[str, float]:
    split = next(iter(result["metrics"]))
    return split, result["metrics"][split][result["main_metric"]]


def results_table(results: Sequence[dict]) -> str:
    """Markdown table: one row per run (experiment, task, main metric, all metrics, size, time)."""
    lines = ["| experiment | task | metric | score | all metrics | train rows | trainable "
             "params | train s | ex/s |", "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        split, score = _main_score(r)
        others = "; ".join(f"{s}: " + ", ".join(f"{k} {v:.4f}" for k, v in m.items())
                           for s, m in r["metrics"].items())
        lines.append(f"| {r['experiment']} | {r['task']} | {r['main_metric']} ({split}) | "
                     f"{score:.4f} | {others} | {r['sizes'].get('train', 0)} | "
                     f"{r['trainable_params']:,} | {r['train_seconds']} | "
                     f"{r['train_examples_per_s'] or '-'} |")
    return "\n".join(lines)


def print_results(results: Sequence[dict]) -> None:
    print(results_table(results))


def load_results(paths: Iterable[str]) -> list[dict]:
    out = []
    for p in paths:
        path = os.path.join(p, "results.json") if os.path.isdir(p) else p
        with open(path) as f:
            out.append(json.load(f))
    return out
