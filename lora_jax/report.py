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
        experiment = r["experiment"] + (f":{r['variant']}" if "variant" in r else "")
        lines.append(f"| {experiment} | {r['task']} | {r['main_metric']} ({split}) | "
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


ROW_NAMES = {"zero_shot": "Model", "ffn": "FFN", "ft_lora": "FT_LoRA", "full": "Full FT",
             "attens": "AttEns", "average": "Average", "scalar": "Scalar weights",
             "fusion": "Fusion", "merge": "Merge", "lorahub": "LoraHub"}


def method_of(result: dict) -> str:
    """The combiner method of an AttEns-experiment run (runs from before methods: attens)."""
    return result.get("method", "attens")


def is_attens(result: dict) -> bool:
    """A run of the paper's attention combiner (any k)."""
    return result["experiment"] == "attens" and method_of(result) == "attens"


MERGE_NAMES = {"linear": "linear", "ties": "TIES", "dare_linear": "DARE", "dare_ties": "DARE-TIES",
               "magnitude_prune": "magnitude"}


def method_row_names(results: Sequence[dict]) -> dict[str, str]:
    """{sweep row: its name in the tables} of the method rows: the method's name, a merge's
    with its merge method ("Merge (TIES)"); two rows that would share a name keep their row."""
    names = {}
    for r in results:
        if r["experiment"] != "attens" or is_attens(r) or row_of(r) in names:
            continue
        name = ROW_NAMES.get(method_of(r), row_of(r))
        if method_of(r) == "merge":
            merge = r.get("config", {}).get("combiner", {}).get("merge_method", "")
            name += f" ({MERGE_NAMES.get(merge, merge)})" if merge else ""
        names[row_of(r)] = name
    taken = list(names.values())
    return {row: name if taken.count(name) == 1 else row for row, name in names.items()}


def main_score(result: dict) -> float:
    """The task's main metric on its first reported split, x100."""
    return 100 * _main_score(result)[1]


def row_of(result: dict) -> str:
    return result.get("sweep_row", result["experiment"])


def cell_scores(results: Sequence[dict]) -> dict[tuple[str, str], list[float]]:
    """(row, task) -> main scores (x100) of every seed."""
    cells: dict[tuple[str, str], list[float]] = {}
    for r in results:
        cells.setdefault((row_of(r), r["task"]), []).append(main_score(r))
    return cells


STD_LABEL = "mean ± sample std (n - 1) over seeds"


def mean_std(values: Sequence[float], digits: int = 1) -> str:
    """"m ± s" with the sample standard deviation (ddof=1), or "m" for a single value; the one
    convention of every table here (label it with `STD_LABEL`)."""
    import statistics

    mean = statistics.fmean(values)
    if len(values) < 2:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def score_table(results: Sequence[dict], rows: Sequence[str], tasks: Sequence[str],
                row_names: dict[str, str] | None = None) -> str:
    """Markdown: rows x (tasks + average); `mean_std` over seeds; "–" where a cell is missing."""
    import numpy as np

    names = {**ROW_NAMES, **method_row_names(results), **(row_names or {})}
    cells = cell_scores(results)
    metric = {r["task"]: r["main_metric"] for r in results}
    lines = ["| | " + " | ".join(f"{t} ({metric[t]})" if t in metric else t for t in tasks)
             + " | average |",
             "|---" * (len(tasks) + 2) + "|"]
    for row in rows:
        out, means = [], []
        for t in tasks:
            vals = cells.get((row, t), [])
            if not vals:
                out.append("–")
                continue
            means.append(float(np.mean(vals)))
            out.append(mean_std(vals))
        avg = f"{np.mean(means):.1f}" if len(means) == len(tasks) else "–"
        lines.append(f"| {names.get(row, row)} | " + " | ".join(out) + f" | {avg} |")
    return "\n".join(lines)
