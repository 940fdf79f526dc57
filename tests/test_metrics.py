"""Our metrics equal scikit-learn's and scipy's."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.stats

from lora_jax import metrics

sklearn_metrics = pytest.importorskip("sklearn.metrics")


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("classes", [2, 3, 6])
def test_classification_metrics_equal_sklearn(seed, classes):
    rng = np.random.default_rng(seed)
    label = rng.integers(0, classes, 300)
    pred = np.where(rng.random(300) < 0.6, label, rng.integers(0, classes, 300))
    assert metrics.accuracy(pred, label) == pytest.approx(
        sklearn_metrics.accuracy_score(label, pred), abs=1e-12)
    assert metrics.matthews(pred, label) == pytest.approx(
        sklearn_metrics.matthews_corrcoef(label, pred), abs=1e-12)
    if classes == 2:
        assert metrics.f1(pred, label) == pytest.approx(sklearn_metrics.f1_score(label, pred),
                                                        abs=1e-12)


def test_degenerate_cases_match_sklearn():
    label = np.array([0, 1, 1, 0])
    const = np.zeros(4, int)
    assert metrics.matthews(const, label) == sklearn_metrics.matthews_corrcoef(label, const) == 0
    assert metrics.f1(const, label) == sklearn_metrics.f1_score(label, const, zero_division=0)


def test_regression_metrics_equal_scipy():
    rng = np.random.default_rng(0)
    label = rng.uniform(0, 5, 200)
    pred = label + rng.normal(0, 1, 200)
    assert metrics.pearson(pred, label) == pytest.approx(scipy.stats.pearsonr(pred, label)[0])
    assert metrics.spearman(pred, label) == pytest.approx(scipy.stats.spearmanr(pred, label)[0])
    assert metrics.pearson(np.ones(200), label) == 0.0  # constant predictions: defined as 0


def test_compute_returns_named_floats():
    out = metrics.compute(("matthews", "accuracy"), np.array([1, 0, 1]), np.array([1, 0, 0]))
    assert set(out) == {"matthews", "accuracy"} and all(isinstance(v, float) for v in out.values())
