"""AttEns report: the paper's Table 2 (seen tasks) and Table 3 (unseen), the k sweep (Fig. 3
shape) and a heatmap of the combiner's attention over modules, from one sweep's results.

    python -m ensemble.report --sweep results/attens_minilm_l3.json --out results/attens_minilm_l3

Writes <out>.md, <out>_k_sweep.png, <out>_attention.png and, for a sweep with a few-shot
budget axis, <out>_budgets.png (matplotlib: pip install -e ".[plots]").
"""

from __future__ import annotations

import os
import sys
from collections import Counter
from collections.abc import Sequence

import numpy as np

from lora_jax.cli import ArgumentParser, run_main
from lora_jax.metrics import paired_bootstrap, unpack_array
from lora_jax.report import (
    ROW_NAMES,
    STD_LABEL,
    cell_scores,
    is_attens,
    main_score,
    method_of,
    method_row_names,
    row_of,
    score_table,
)
from lora_jax.sweep_record import read_record
from lora_jax.writers import write_table

ROWS = ("zero_shot", "ffn", "ft_lora", "attens")
# combiner method -> what it is, for the rows beside the paper's (named as lora_jax.report's)
METHOD_DESCRIPTIONS = {
    "average": "a linear head on the mean of the module outputs",
    "scalar": "a linear head on a learned softmax mix of the module outputs and the base",
    "merge": "a linear head on the output of the modules merged into one adapter",
    "lorahub": "a linear head on the output of the modules summed with CMA-ES-searched weights",
    "fusion": "attention over the modules' LoRA deltas inside every adapted layer "
              "(AdapterFusion), fusion and head trained through the encoder",
}


def row_methods(results: Sequence[dict]) -> dict[str, str]:
    """{sweep row: combiner method} of the rows beside the paper's, in run order."""
    return {row_of(r): method_of(r) for r in results
            if r["experiment"] == "attens" and not is_attens(r)}


def seeds_per_row(results: Sequence[dict], rows: Sequence[str], names: dict[str, str]) -> str:
    """'FT_LoRA 3, AttEns 3, Model 1, ...': the seeds each row's cells have (at most)."""
    counts = []
    for row in rows:
        per_task: dict[str, set] = {}
        for r in results:
            if row_of(r) == row:
                per_task.setdefault(r["task"], set()).add(r["seed"])
        if per_task:
            counts.append(f"{names.get(row, row)} {max(len(s) for s in per_task.values())}")
    return ", ".join(counts)


def wall_time_table(results: Sequence[dict], rows: Sequence[str], tasks: Sequence[str],
                    names: dict[str, str]) -> list[str]:
    """Markdown lines: each cell's wall time (s: the whole run, data and compilation included),
    mean over its seeds, one line per row that has any, one column per target."""
    lines = ["| | " + " | ".join(tasks) + " |", "|---" * (len(tasks) + 1) + "|"]
    for row in rows:
        means = []
        for t in tasks:
            times = [r["wall_seconds"] for r in results
                     if row_of(r) == row and r["task"] == t and "wall_seconds" in r]
            means.append(f"{np.mean(times):.0f}" if times else "–")
        if any(m != "–" for m in means):
            lines.append(f"| {names.get(row, row)} | " + " | ".join(means) + " |")
    return lines


def train_budget(result: dict) -> int:
    """The labelled train rows the run was allowed (0: all of train)."""
    return int(result.get("config", {}).get("train_budget", 0))


def budget_curves(results: Sequence[dict], rows: Sequence[str]
                  ) -> tuple[list[int], dict[str, dict[int, float]]]:
    """(budgets, smallest first, 0 = all of train, last; row -> {budget: mean main score over
    the targets and seeds}) where a row has every target at that budget."""
    budgets = sorted({train_budget(r) for r in results}, key=lambda b: b or float("inf"))
    targets = list(dict.fromkeys(r["task"] for r in results))
    curves: dict[str, dict[int, float]] = {}
    for row in rows:
        for b in budgets:
            cell = [r for r in results if row_of(r) == row and train_budget(r) == b]
            per_task = [[main_score(r) for r in cell if r["task"] == t] for t in targets]
            if all(per_task):
                curves.setdefault(row, {})[b] = float(np.mean([np.mean(v) for v in per_task]))
    return budgets, curves


def plot_budgets(budgets: list[int], curves: dict[str, dict[int, float]], names: dict[str, str],
                 path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    at = {b: i for i, b in enumerate(budgets)}
    for row, points in curves.items():
        bs = [b for b in budgets if b in points]
        ax.plot([at[b] for b in bs], [points[b] for b in bs], marker="o",
                label=names.get(row, row))
    ax.set_xticks(range(len(budgets)), [str(b) if b else "all" for b in budgets])
    ax.set_xlabel("labelled target rows (train + selection)")
    ax.set_ylabel("mean validation score over targets (x100)")
    ax.set_title("score vs few-shot budget")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def split_tasks(results: Sequence[dict]) -> tuple[list[str], list[str]]:
    """(seen, unseen) target tasks in first-appearance order, judged from the AttEns runs."""
    seen, unseen = [], []
    for r in results:
        if r["experiment"] == "attens":
            bucket = unseen if r.get("unseen") else seen
            if r["task"] not in seen + unseen:
                bucket.append(r["task"])
    return seen, unseen


def k_rows(results: Sequence[dict]) -> list[str]:
    """The rows of the paper's combiner other than "attens" (its k sweep), sorted."""
    return sorted({row_of(r) for r in results if is_attens(r) and row_of(r) != "attens"})


def k_of(result: dict) -> int:
    return int(result["k"])


def k_sweep(results: Sequence[dict]) -> dict[str, dict[int, float]]:
    """task -> {k: mean main score} over the AttEns runs, each point averaged over the SAME
    seeds: those that every k of that task has (a 3-seed full-k mean next to 1-seed k points
    would compare different things)."""
    acc: dict[str, dict[int, dict[int, float]]] = {}
    for r in results:
        if is_attens(r):
            acc.setdefault(r["task"], {}).setdefault(k_of(r), {})[r["seed"]] = (
                100 * next(iter(r["metrics"].values()))[r["main_metric"]])
    curves = {}
    for task, by_k in acc.items():
        common = set.intersection(*(set(seeds) for seeds in by_k.values()))
        curves[task] = {k: float(np.mean([by_k[k][s] for s in sorted(common)]))
                        for k in sorted(by_k) if common}
    return curves


def attention_by_task(results: Sequence[dict]) -> tuple[list[str], list[str], np.ndarray]:
    """(targets, modules, (targets, modules) mean attention received) from full-k AttEns runs."""
    rows = [r for r in results if row_of(r) == "attens" and r.get("attention")]
    if not rows:
        return [], [], np.zeros((0, 0))
    modules = rows[0]["attention"]["modules"]
    by_task: dict[str, list] = {}
    for r in rows:
        by_task.setdefault(r["task"], []).append(r["attention"]["mean_received"])
    targets = list(by_task)
    return targets, modules, np.array([np.mean(by_task[t], 0) for t in targets])


def plot_k_sweep(curves: dict[str, dict[int, float]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for task, points in curves.items():
        ks = sorted(points)
        ax.plot(ks, [points[k] for k in ks], marker="o", label=task)
    ax.set_xlabel("number of modules k")
    ax.set_ylabel("validation score (x100)")
    ax.set_title("AttEns: score vs k")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_attention(targets, modules, weights: np.ndarray, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1.0 + 0.8 * len(modules), 1.0 + 0.5 * len(targets)))
    im = ax.imshow(weights, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(modules)), modules, rotation=45, ha="right")
    ax.set_yticks(range(len(targets)), targets)
    ax.set_xlabel("module")
    ax.set_ylabel("target task")
    for i in range(len(targets)):
        for j in range(len(modules)):
            ax.text(j, i, f"{weights[i, j]:.2f}", ha="center", va="center", fontsize=7,
                    color="white" if weights[i, j] < weights.max() * 0.6 else "black")
    ax.set_title("mean attention received per module")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def row_predictions(results: Sequence[dict], row: str, task: str
                    ) -> tuple[list[np.ndarray], np.ndarray | None]:
    """(per-seed predictions on the task's first reported split, its labels) of a row, from
    the packed per-row outputs of its results (runs recorded before those were kept: none)."""
    preds, labels = [], None
    for r in results:
        rows = r.get("predictions", {})
        if row_of(r) == row and r["task"] == task and rows:
            split = rows[next(iter(r["metrics"]))]
            y = unpack_array(split["labels"])
            if labels is not None and not np.array_equal(y, labels):
                return [], None  # seeds scored on other rows: no paired test
            preds.append(unpack_array(split["predictions"]))
            labels = y
    return preds, labels


PAIRED = "paired bootstrap over the validation rows (1000 resamples), 95% interval"
BASELINES = ("ft_lora", "attens")
UNJUDGED = ("zero_shot", "ffn")  # rows the plain sentences leave to the tables


def paired_differences(results: Sequence[dict], rows: Sequence[str], tasks: Sequence[str],
                       baselines: Sequence[str] = BASELINES
                       ) -> dict[tuple[str, str, str], tuple[float, float, float]]:
    """{(task, row, baseline): (difference, low, high)} in the main score (fractions, mean over
    seeds) with its paired-bootstrap interval, for every row and baseline that both recorded
    per-row outputs on the same validation rows of a task."""
    metric = {r["task"]: r["main_metric"] for r in results}
    out = {}
    for task in tasks:
        base = {b: row_predictions(results, b, task) for b in baselines}
        for row in rows:
            mine, labels = row_predictions(results, row, task)
            for b in baselines:
                theirs, their_labels = base[b]
                if mine and row != b and theirs and np.array_equal(labels, their_labels):
                    out[task, row, b] = paired_bootstrap(metric[task], mine, theirs, labels)
    return out


def significant(interval: tuple[float, float, float]) -> bool:
    return interval[1] > 0 or interval[2] < 0


def significance_sentence(diffs: dict, names: dict[str, str],
                          baselines: Sequence[str] = BASELINES) -> str:
    """Plain words, per baseline: which rows (combiners and FT_LoRA) are significantly ahead of
    it and behind it, and on which targets."""
    said = []
    for b in baselines:
        if not any(base == b for _, _, base in diffs):
            said.append(f"{names.get(b, b)}: no cells with per-row outputs to test against.")
            continue
        sides = {"ahead": {}, "behind": {}}
        for (task, row, base), interval in diffs.items():
            if base == b and row not in UNJUDGED and significant(interval):
                side = sides["ahead" if interval[0] > 0 else "behind"]
                side.setdefault(names.get(row, row), []).append(task)
        words = {k: "; ".join(f"{row} ({', '.join(ts)})" for row, ts in v.items()) or "none"
                 for k, v in sides.items()}
        said.append(f"Against {names.get(b, b)}, significantly ahead: {words['ahead']}; "
                    f"significantly behind: {words['behind']}.")
    return " ".join(said) + (" Every other difference of a combiner or FT_LoRA is within its "
                             "interval (Model and FFN: see the table).")


def paired_tests(results: Sequence[dict], rows: Sequence[str], tasks: Sequence[str],
                 names: dict[str, str], baselines=BASELINES) -> list[str]:
    """Markdown lines: every row's difference to each baseline per target (mean over seeds,
    x100) with its paired-bootstrap interval, and a plain sentence of what is significant."""
    diffs = paired_differences(results, rows, tasks, baselines)
    header = "| target | row | " + " | ".join(f"vs {names.get(b, b)}" for b in baselines) + " |"
    lines = [header, "|---" * (len(baselines) + 2) + "|"]
    for task in tasks:
        for row in rows:
            if not any(t == task and row in (r, b) for t, r, b in diffs):
                continue  # neither tested nor a baseline that something was tested against
            cells = []
            for b in baselines:
                if (task, row, b) not in diffs:
                    cells.append("–")
                    continue
                diff, lo, hi = diffs[task, row, b]
                mark = "*" if significant((diff, lo, hi)) else ""
                cells.append(f"{100 * diff:+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}]{mark}")
            lines.append(f"| {task} | {names.get(row, row)} | " + " | ".join(cells) + " |")
    if len(lines) == 2:
        return []
    return [f"Difference in the main score x100 (mean over seeds), {PAIRED}; * = the interval "
            "excludes 0.", "", *lines, "", significance_sentence(diffs, names, baselines)]


def few_shot_paired_tests(every_budget: Sequence[dict], rows: Sequence[str],
                          tasks: Sequence[str], names: dict[str, str],
                          baselines=BASELINES) -> list[str]:
    """Markdown lines: at each few-shot budget, every row against each baseline: the mean
    over targets of the paired difference, on how many targets it is significantly ahead and
    behind, and the plain sentence of which."""
    budgets = sorted({train_budget(r) for r in every_budget} - {0})
    table, sentences = [], []
    for budget in budgets:
        diffs = paired_differences([r for r in every_budget if train_budget(r) == budget],
                                   rows, tasks, baselines)
        if not diffs:
            continue
        for row in rows:
            cells = []
            for b in baselines:
                mine = [v for (_, r, base), v in diffs.items() if r == row and base == b]
                if not mine:
                    cells.append("–")
                    continue
                ahead = sum(significant(v) and v[0] > 0 for v in mine)
                behind = sum(significant(v) and v[0] < 0 for v in mine)
                mean = round(100 * float(np.mean([v[0] for v in mine])), 1) + 0.0  # no -0.0
                cells.append(f"{mean:+.1f}: ahead on {ahead}, "
                             f"behind on {behind}, of {len(mine)}")
            if any(c != "–" for c in cells):
                table.append(f"| {budget} | {names.get(row, row)} | " + " | ".join(cells) + " |")
        sentences.append(f"{budget} rows: " + significance_sentence(diffs, names, baselines))
    if not table:
        return []
    return [f"At each budget, the difference in the main score x100 (mean over seeds, then over "
            f"the targets both rows have) and the number of targets where the {PAIRED} "
            "excludes 0 on either side.", "",
            "| rows | row | " + " | ".join(f"vs {names.get(b, b)}" for b in baselines) + " |",
            "|---" * (len(baselines) + 2) + "|", *table, "", *sentences]


def verdict(results: Sequence[dict], tasks: Sequence[str]) -> str:
    """One honest sentence: does AttEns beat FT_LoRA on average, and where not."""
    cells = cell_scores(results)
    common = [t for t in tasks if cells.get(("attens", t)) and cells.get(("ft_lora", t))]
    if not common:
        return "AttEns vs FT_LoRA: no task has both rows yet."
    diff = {t: np.mean(cells[("attens", t)]) - np.mean(cells[("ft_lora", t)]) for t in common}
    avg = float(np.mean(list(diff.values())))
    wins = [t for t in common if diff[t] > 0]
    losses = [t for t in common if diff[t] <= 0]
    head = "beats" if avg > 0 else "does not beat"
    return (f"AttEns {head} FT_LoRA on average over {', '.join(common)} "
            f"({avg:+.1f} points); it is ahead on {', '.join(wins) or 'no task'} and behind "
            f"or equal on {', '.join(losses) or 'no task'}.")


def module_contents(results: Sequence[dict]) -> str:
    """One protocol line: for each module, which trained weights (the first 8 hex digits of the
    `module_sha256` a combination run records) how many combination cells combined; modules
    retrained on another machine or commit show up as a second digest. Cells written before the
    record existed are counted apart."""
    combined = [r for r in results if r["experiment"] == "attens"]
    uses: dict[str, Counter] = {}
    for r in combined:
        for task, digest in (r.get("module_sha256") or {}).items():
            uses.setdefault(task, Counter())[digest[:8]] += 1
    unrecorded = sum(1 for r in combined if not r.get("module_sha256"))

    def counted(digests: Counter) -> str:
        return ", ".join(f"{d} ({n} cell{'s' * (n != 1)})" for d, n in digests.most_common())

    parts = ["; ".join(f"{task} {counted(c)}" for task, c in uses.items()) or "none recorded"]
    if unrecorded:
        parts.append(f"{unrecorded} of the {len(combined)} combination cells predate the record")
    return "- Module weights by content (module_sha256): " + "; ".join(parts) + "."


def build_report(sweep: dict, out: str, sweep_path: str = "") -> str:
    """The report's markdown; `out` is the stem of the .md/.png files, `sweep_path` the sweep
    .json it was built from (for the command line it prints)."""
    sweep_path = sweep_path or out + ".json"
    every_budget = sweep["results"]
    results = [r for r in every_budget if not train_budget(r)]  # the tables: all of train
    seen, unseen = split_tasks(results)
    attens = [r for r in results if r["experiment"] == "attens"]
    methods = row_methods(results)
    rows = [*ROWS, *methods]  # the paper's rows, then each other combination method's
    names = {**ROW_NAMES, **method_row_names(results)}  # every row's name in the tables
    lines = [f"# {sweep['name']}", ""]
    lines += ["## Table 2: target tasks that have a module", "",
              score_table(results, rows, seen, names), "", verdict(results, seen), ""]
    if unseen:
        lines += ["## Table 3: unseen target tasks (no module trained on them)", "",
                  score_table(results, rows, unseen, names), "", verdict(results, unseen), ""]
    tests = paired_tests(results, rows, seen + unseen, names)
    if tests:
        lines += ["## Paired tests against FT_LoRA and AttEns", "", *tests, ""]
    budgets, by_budget = budget_curves(every_budget, rows)
    if len(budgets) > 1:
        lines += ["## Few-shot: score against the labelled target rows", "",
                  "Mean over every target (and seed) of the main score x100; a row is shown at "
                  "a budget where it has every target. The selection slice comes out of the "
                  "same budget.", "",
                  "| | " + " | ".join(str(b) if b else "all" for b in budgets) + " |",
                  "|---" * (len(budgets) + 1) + "|"]
        lines += [f"| {names.get(row, row)} | " + " | ".join(
            f"{c[b]:.1f}" if b in c else "–" for b in budgets) + " |"
            for row, c in by_budget.items()]
        lines += ["", f"![few-shot]({os.path.basename(out)}_budgets.png)", ""]
        plot_budgets(budgets, by_budget, names, out + "_budgets.png")
        few_shot = few_shot_paired_tests(every_budget, rows, seen + unseen, names)
        if few_shot:
            lines += ["## Few-shot paired tests against FT_LoRA and AttEns", "", *few_shot, ""]
    curves = k_sweep(results)
    if curves:
        ks = sorted({k for c in curves.values() for k in c})
        lines += ["## k sweep (AttEns with the first k modules)", "",
                  "| target | " + " | ".join(f"k={k}" for k in ks) + " |",
                  "|---" * (len(ks) + 1) + "|"]
        lines += [f"| {t} | " + " | ".join(f"{c[k]:.1f}" if k in c else "–" for k in ks) + " |"
                  for t, c in curves.items()]
        lines += ["", f"![k sweep]({os.path.basename(out)}_k_sweep.png)", ""]
        plot_k_sweep(curves, out + "_k_sweep.png")
    targets, modules, weights = attention_by_task(results)
    if targets:
        lines += ["## Combiner attention (mean weight each module receives, validation)", "",
                  "| target | " + " | ".join(modules) + " |", "|---" * (len(modules) + 1) + "|"]
        lines += [f"| {t} | " + " | ".join(f"{w:.3f}" for w in weights[i]) + " |"
                  for i, t in enumerate(targets)]
        lines += ["", f"![attention]({os.path.basename(out)}_attention.png)", ""]
        plot_attention(targets, modules, weights, out + "_attention.png")
    if attens:
        lines += ["## AttEns time: feature extraction (once, cached) vs combiner training", "",
                  "| row | target | seed | k | feature extraction s per split | "
                  "cache hit | combiner training s | epochs | train rows |", "|---" * 9 + "|"]
        for r in attens:
            fs = ", ".join(f"{k} {v:.0f}" for k, v in r["feature_seconds"].items())
            lines.append(f"| {row_of(r)} | {r['task']} | {r['seed']} | {r['k']} | {fs} | "
                         f"{all(r['feature_cache_hits'].values())} | "
                         f"{r['train_seconds']:.1f} | {r['epochs']} | "
                         f"{r['sizes'].get('train')} |")
        lines.append("")
    if any("wall_seconds" in r for r in every_budget):
        total = sum(r.get("wall_seconds", 0.0) for r in every_budget)
        lines += ["## Wall time per cell", "",
                  "Seconds per run on all of train (data, compilation, training, selection and "
                  "evaluation) as each cell recorded it, mean over its seeds; the sweep runs "
                  "its cells one after another, and a cell that shared its cores with other "
                  f"work took longer. All {len(every_budget)} cells of this file (few-shot "
                  f"budgets included): {total / 3600:.1f} hours.", "",
                  *wall_time_table(results, [*rows, *k_rows(results)], seen + unseen,
                                   names), ""]
    first = results[0]
    seeds = sorted({r["seed"] for r in results})
    lines += ["## Protocol", "",
              f"- Base model: `{first['model']}`; modules: "
              f"{', '.join(attens[0]['modules']) if attens else '–'} (FT_LoRA, seed 0, each "
              "selected on its own held-out slice).",
              "- Selection: " + next((r["protocol"] for r in results
                                      if r["experiment"] != "zero_shot"), "") + ".",
              f"- Seeds: {seeds}; seeds per cell: "
              f"{seeds_per_row(results, rows, names)} ({STD_LABEL} where "
              "more than one; the k sweep: the seeds that every k of a target has).",
              "- Rows: Model = frozen encoder + untrained head; FFN = frozen encoder + trained "
              "linear head; FT_LoRA = single-task LoRA (r=4, alpha=32, q/k/v); AttEns = "
              "combiner over the frozen modules" + "".join(
                  f"; {names[row]} = {METHOD_DESCRIPTIONS[m]}" for row, m in methods.items()
                  if m in METHOD_DESCRIPTIONS) + ".",
              "- Rows per target: " + "; ".join(
                  f"{r['task']}: " + ", ".join(f"{k} {v}" for k, v in r["sizes"].items())
                  for r in attens if r["seed"] == 0 and row_of(r) == "attens") + ".",
              module_contents(every_budget),
              f"- Machine: {first['machine']}.",
              f"- Command: `{sweep['command']}`, then `python -m ensemble.report "
              f"--sweep {sweep_path} --out {out}`.", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sweep", required=True, help="a lora_jax.sweep .json")
    p.add_argument("--out", required=True, help="path stem for .md and .png files")
    a = p.parse_args(argv)
    return run_main(lambda: write_table(a.out + ".md",
                                        build_report(read_record(a.sweep), a.out, a.sweep)))


if __name__ == "__main__":
    sys.exit(main())
