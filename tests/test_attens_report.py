"""The AttEns report: tables in the paper's shape, the verdict, the k sweep and heatmap files."""

from __future__ import annotations

import numpy as np
import pytest

from ensemble.report import build_report, k_sweep, train_budget, verdict
from lora_jax.report import row_of

pytest.importorskip("matplotlib")


def _r(row, task, seed, score, k=3, unseen=False, att=None):
    exp = "attens" if row.startswith("attens") else row
    r = {"experiment": exp, "sweep_row": row, "task": task, "seed": seed,
         "main_metric": "accuracy", "metrics": {"validation": {"accuracy": score}},
         "model": "minilm", "protocol": "held-out", "machine": "cpu",
         "sizes": {"train": 9, "selection": 1, "validation": 3}}
    if exp == "attens":
        r.update({"k": k, "unseen": unseen, "modules": ["a", "b", "c"][:k],
                  "attention": att and {"modules": ["a", "b", "c"], "mean_received": att},
                  "feature_seconds": {"train": 2.0, "selection": 0.5, "validation": 0.7},
                  "feature_cache_hits": {"train": False, "selection": False, "validation": False},
                  "train_seconds": 1.5, "epochs": 20})
    return r


def _sweep():
    results = []
    for seed, delta in ((0, 0.0), (1, 0.02)):
        results += [_r("ft_lora", "a", seed, 0.80 + delta), _r("ft_lora", "b", seed, 0.60),
                    _r("ft_lora", "imdb", seed, 0.70),
                    _r("attens", "a", seed, 0.85, att=[0.5, 0.3, 0.2]),
                    _r("attens", "b", seed, 0.55, att=[0.2, 0.3, 0.5]),
                    _r("attens", "imdb", seed, 0.75, unseen=True, att=[0.4, 0.4, 0.2])]
    results += [_r("zero_shot", t, 0, 0.5) for t in ("a", "b", "imdb")]
    results += [_r("ffn", t, 0, 0.6) for t in ("a", "b", "imdb")]
    results += [_r("attens_k1", "a", 0, 0.81, k=1), _r("attens_k2", "a", 0, 0.83, k=2)]
    return {"name": "test sweep", "command": "python -m lora_jax.sweep ...", "results": results}


def test_report_tables_verdict_and_plots(tmp_path):
    out = str(tmp_path / "attens")
    text = build_report(_sweep(), out)
    assert "| FT_LoRA | 81.0 ± 1.4 | 60.0 ± 0.0 | 70.5 |" in text  # mean ± sample std
    assert "mean ± sample std (n - 1) over seeds" in text
    assert "| AttEns | 85.0 ± 0.0 | 55.0 ± 0.0 | 70.0 |" in text
    assert "| Model | 50.0 | 50.0 | 50.0 |" in text
    assert "## Table 3" in text and "| AttEns | 75.0 ± 0.0 | 75.0 |" in text
    assert "does not beat FT_LoRA on average over a, b (-0.5 points)" in text
    assert "ahead on a and behind or equal on b" in text
    assert "| a | 81.0 | 83.0 | 85.0 |" in text  # k sweep row: k=1, 2, 3
    for png in ("_k_sweep.png", "_attention.png"):
        data = (tmp_path / f"attens{png}").read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 2000


def test_protocol_names_the_module_weights_each_cell_combined(tmp_path):
    """Cells on modules retrained elsewhere show a second digest; cells from before the record
    are counted, not guessed."""
    sweep = _sweep()
    attens = [r for r in sweep["results"] if r["experiment"] == "attens"]
    first = {"a": "aaaa1111" + "0" * 8, "b": "bbbb1111" + "0" * 8, "c": "cccc1111" + "0" * 8}
    for r in attens[:3]:
        r["module_sha256"] = {m: first[m] for m in r["modules"]}
    attens[3]["module_sha256"] = {**first, "a": "aaaa2222" + "0" * 8}
    text = build_report(sweep, str(tmp_path / "attens"))
    assert ("- Module weights by content (module_sha256): a aaaa1111 (3 cells), aaaa2222 (1 cell); "
            "b bbbb1111 (4 cells); c cccc1111 (4 cells); "
            f"{len(attens) - 4} of the {len(attens)} combination cells predate the record.") in text


def test_k_sweep_and_verdict_units():
    curves = k_sweep(_sweep()["results"])
    assert curves["a"] == {1: 81.0, 2: 83.0, 3: 85.0}
    assert verdict([], ["a"]).startswith("AttEns vs FT_LoRA: no task")


def test_k_sweep_averages_every_k_over_the_same_seeds():
    # k=3 has seeds 0 and 1, k=1 only seed 0: the curve must use seed 0 for both points
    results = [_r("attens", "a", 0, 0.80), _r("attens", "a", 1, 0.90),
               _r("attens_k1", "a", 0, 0.70, k=1)]
    assert k_sweep(results)["a"] == {1: 70.0, 3: 80.0}


def test_combination_methods_get_their_own_rows_and_stay_out_of_the_k_sweep(tmp_path):
    sweep = _sweep()
    for task, score in (("a", 0.70), ("b", 0.58), ("imdb", 0.66)):
        for row, method in (("average", "average"), ("mix", "scalar")):
            r = _r("attens_" + row, task, 0, score + (row == "mix") * 0.1,
                   unseen=task == "imdb")
            r.update(sweep_row=row, method=method)
            sweep["results"].append(r)
    text = build_report(sweep, str(tmp_path / "attens"))
    assert "| Average | 70.0 | 58.0 | 64.0 |" in text
    assert "| Scalar weights | 80.0 | 68.0 | 74.0 |" in text
    assert "| Average | 66.0 | 66.0 |" in text  # the unseen table has the rows too
    assert "Scalar weights = a linear head on a learned softmax mix" in text
    assert "| a | 81.0 | 83.0 | 85.0 |" in text  # the k=3 point is AttEns alone
    assert k_sweep(sweep["results"])["a"] == {1: 81.0, 2: 83.0, 3: 85.0}
    assert "| average | a | 0 | 3 |" in text  # its time row


def test_merge_rows_are_named_by_their_merge_and_every_cell_has_its_wall_time(tmp_path):
    sweep = _sweep()
    for r in sweep["results"]:
        r["wall_seconds"] = 10.0 + r["seed"] * 4  # seed 0: 10 s, seed 1: 14 s
    for row, merge in (("merge_ties", "ties"), ("merge_dare", "dare_linear")):
        for task in ("a", "b", "imdb"):
            r = _r("attens", task, 0, 0.6, unseen=task == "imdb")
            r.update(sweep_row=row, method="merge", wall_seconds=30.0,
                     config={"combiner": {"merge_method": merge}})
            sweep["results"].append(r)
    text = build_report(sweep, str(tmp_path / "attens"))
    assert "| Merge (TIES) | 60.0 | 60.0 | 60.0 |" in text
    assert "| Merge (DARE) | 60.0 | 60.0 | 60.0 |" in text
    assert "seeds per cell: Model 1, FFN 1, FT_LoRA 2, AttEns 2, Merge (TIES) 1" in text
    assert "| | a | b | imdb |" in text
    assert "| FT_LoRA | 12 | 12 | 12 |" in text  # mean over seeds 0 and 1
    assert "| Merge (DARE) | 30 | 30 | 30 |" in text
    assert "| attens_k1 | 10 | – | – |" in text  # the k rows' cells too
    assert f"All {len(sweep['results'])} cells of this file" in text
    # two rows with the same merge keep their sweep row names
    for r in sweep["results"]:
        if r.get("method") == "merge":
            r["config"]["combiner"]["merge_method"] = "ties"
    assert "| merge_dare | 60.0 |" in build_report(sweep, str(tmp_path / "same"))


def test_a_budget_axis_gets_a_few_shot_table_and_plot_and_stays_out_of_tables_2_and_3(tmp_path):
    sweep = _sweep()
    for budget, score in ((16, 0.52), (64, 0.61)):
        for row in ("ft_lora", "attens"):
            for task in ("a", "b", "imdb"):
                r = _r(row, task, 0, score + (row == "attens") * 0.1, unseen=task == "imdb")
                r.update(config={"train_budget": budget}, sweep_budget=f"n{budget}")
                sweep["results"].append(r)
    text = build_report(sweep, str(tmp_path / "attens"))
    assert "| FT_LoRA | 81.0 ± 1.4 | 60.0 ± 0.0 | 70.5 |" in text  # tables 2/3: all of train
    assert "| | 16 | 64 | all |" in text
    assert "| FT_LoRA | 52.0 | 61.0 | 70.3 |" in text  # mean over the three targets
    assert "| AttEns | 62.0 | 71.0 | 71.7 |" in text
    data = (tmp_path / "attens_budgets.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 2000
    assert "Few-shot" not in build_report(_sweep(), str(tmp_path / "plain"))


def test_paired_tests_use_the_recorded_rows_and_say_what_is_significant(tmp_path):
    from lora_jax.metrics import pack_array

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 300)
    right = lambda p: np.where(rng.random(300) < p, labels, 1 - labels)
    sweep = _sweep()
    accuracy = {"ft_lora": 0.70, "attens": 0.85, "average": 0.71}
    for r in sweep["results"]:
        if r["task"] == "a" and row_of(r) in accuracy:
            preds = right(accuracy[row_of(r)])
            r["predictions"] = {"validation": {"predictions": pack_array(preds),
                                               "labels": pack_array(labels)}}
            r["metrics"] = {"validation": {"accuracy": float(np.mean(preds == labels))}}
    for seed in (0, 1):
        extra = _r("attens_average", "a", seed, 0.0)
        preds = right(0.71)
        extra.update(sweep_row="average", method="average", metrics={
            "validation": {"accuracy": float(np.mean(preds == labels))}}, predictions={
            "validation": {"predictions": pack_array(preds), "labels": pack_array(labels)}})
        sweep["results"].append(extra)
    for r in sweep["results"]:  # last: the draws above stay as they were
        if r["task"] == "a" and row_of(r) == "zero_shot":
            preds = right(0.30)
            r["predictions"] = {"validation": {"predictions": pack_array(preds),
                                               "labels": pack_array(labels)}}
            r["metrics"] = {"validation": {"accuracy": float(np.mean(preds == labels))}}
    text = build_report(sweep, str(tmp_path / "attens")).split("## Paired tests")[1].split(
        "\n## ")[0]
    line = next(ln for ln in text.splitlines() if ln.startswith("| a | AttEns |"))
    assert line.split("|")[4].strip() == "–" and line.split("|")[3].strip().endswith("*")
    average = next(ln for ln in text.splitlines() if ln.startswith("| a | Average |"))
    assert not average.split("|")[3].strip().endswith("*")  # within noise of FT_LoRA
    assert average.split("|")[4].strip().endswith("*")  # and clearly behind AttEns
    assert ("Against FT_LoRA, significantly ahead: AttEns (a); significantly behind: none. "
            "Against AttEns, significantly ahead: none; significantly behind: FT_LoRA (a); "
            "Average (a).") in text
    assert "| b |" not in text  # no per-row outputs recorded for b: no test
    model = next(ln for ln in text.splitlines() if ln.startswith("| a | Model |"))
    assert model.split("|")[3].strip().endswith("*")  # the table marks it
    assert "Model (" not in text.split("Against FT_LoRA")[1]  # the sentence: combiners


def test_few_shot_budgets_get_paired_tests_counted_per_row_and_named_in_words(tmp_path):
    from lora_jax.metrics import pack_array

    rng = np.random.default_rng(1)
    labels = {t: rng.integers(0, 2, 400) for t in ("a", "b", "imdb")}
    right = lambda t, p: np.where(rng.random(400) < p, labels[t], 1 - labels[t])
    sweep = _sweep()
    # at 16 rows AttEns is far ahead of FT_LoRA on a and b and far behind on imdb; at 64 rows
    # level everywhere (the same predictions)
    for budget, level in ((16, False), (64, True)):
        for task in ("a", "b", "imdb"):
            ft_lora = right(task, 0.6)
            attens = ft_lora if level else right(task, 0.85 if task != "imdb" else 0.35)
            for row, preds in (("ft_lora", ft_lora), ("attens", attens)):
                r = _r(row, task, 0, float(np.mean(preds == labels[task])),
                       unseen=task == "imdb")
                r.update(config={"train_budget": budget}, sweep_budget=f"n{budget}",
                         predictions={"validation": {"predictions": pack_array(preds),
                                                     "labels": pack_array(labels[task])}})
                sweep["results"].append(r)
    text = build_report(sweep, str(tmp_path / "attens"))
    section = text.split("## Few-shot paired tests against FT_LoRA and AttEns")[1].split("\n## ")[0]
    line16 = next(ln for ln in section.splitlines() if ln.startswith("| 16 | AttEns |"))
    assert "ahead on 2, behind on 1, of 3" in line16.split("|")[3]
    assert line16.split("|")[4].strip() == "–"
    line64 = next(ln for ln in section.splitlines() if ln.startswith("| 64 | AttEns |"))
    assert line64.split("|")[3].strip() == "+0.0: ahead on 0, behind on 0, of 3"
    assert ("16 rows: Against FT_LoRA, significantly ahead: AttEns (a, b); significantly "
            "behind: AttEns (imdb).") in section
    assert "64 rows: Against FT_LoRA, significantly ahead: none; significantly behind: none." \
        in section
    for r in sweep["results"]:  # a budget without FT_LoRA cells: FFN's in their place
        if train_budget(r) == 64 and row_of(r) == "ft_lora":
            r.update(experiment="ffn", sweep_row="ffn")
    section = build_report(sweep, str(tmp_path / "attens")).split("## Few-shot paired")[1]
    assert "64 rows: FT_LoRA: no cells with per-row outputs to test against. Against AttEns," \
        in section
    # the all-of-train tables keep their own cells: no outputs recorded there, no test
    assert "## Paired tests" not in text
