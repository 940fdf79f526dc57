"""The AttEns report: tables in the paper's shape, the verdict, the k sweep and heatmap files."""

from __future__ import annotations

import pytest

from ensemble.report import build_report, k_sweep, verdict

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


def test_k_sweep_and_verdict_units():
    curves = k_sweep(_sweep()["results"])
    assert curves["a"] == {1: 81.0, 2: 83.0, 3: 85.0}
    assert verdict([], ["a"]).startswith("AttEns vs FT_LoRA: no task")


def test_k_sweep_averages_every_k_over_the_same_seeds():
    # k=3 has seeds 0 and 1, k=1 only seed 0: the curve must use seed 0 for both points
    results = [_r("attens", "a", 0, 0.80), _r("attens", "a", 1, 0.90),
               _r("attens_k1", "a", 0, 0.70, k=1)]
    assert k_sweep(results)["a"] == {1: 70.0, 3: 80.0}
