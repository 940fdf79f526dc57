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


def test_packed_per_row_outputs_round_trip_exactly():
    classes = np.array([0, 5, 2, 2, 1, 0], np.int32)
    values = np.array([0.125, -3.5, 4.999, 1e-7], np.float32)
    assert np.array_equal(metrics.unpack_array(metrics.pack_array(classes)), classes)
    assert metrics.unpack_array(metrics.pack_array(classes)).dtype == np.int16
    assert np.array_equal(metrics.unpack_array(metrics.pack_array(values)), values)
    assert metrics.pack_array(classes).startswith("int16:")
    many = np.random.default_rng(0).integers(0, 2, 5000)
    assert len(metrics.pack_array(many)) < 1500  # a few bits per binary row, not 16


def test_paired_bootstrap_agrees_with_scipy_and_sees_a_real_difference():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 400)
    a = np.where(rng.random(400) < 0.80, labels, 1 - labels)  # about 80% right
    b = np.where(rng.random(400) < 0.72, labels, 1 - labels)  # about 72%
    diff, lo, hi = metrics.paired_bootstrap("accuracy", [a], [b], labels, resamples=4000)
    assert diff == pytest.approx(np.mean(a == labels) - np.mean(b == labels))
    ours = (lo, hi)
    theirs = scipy.stats.bootstrap(
        (a == labels, b == labels), lambda x, y: np.mean(x) - np.mean(y), paired=True,
        vectorized=False, n_resamples=4000, method="percentile",
        rng=np.random.default_rng(1)).confidence_interval
    assert np.allclose(ours, (theirs.low, theirs.high), atol=0.01)
    assert lo > 0  # 8 points on 400 rows: significant
    same = metrics.paired_bootstrap("accuracy", [a], [a.copy()], labels, resamples=200)
    assert same == (0.0, 0.0, 0.0)
    single = metrics.paired_bootstrap("matthews", [a], [b], labels, resamples=10)[0]
    seeds = metrics.paired_bootstrap("matthews", [a, b], [b, b], labels, resamples=10)[0]
    assert seeds == pytest.approx(single / 2)  # the mean over the seeds on each side


@pytest.mark.parametrize("metric,classes", [("accuracy", 3), ("f1", 2), ("matthews", 2),
                                            ("matthews", 4), ("pearson", 0), ("spearman", 0)])
def test_counted_bootstrap_equals_scoring_each_resampled_array_with_sklearn_and_scipy(
        metric, classes):
    """The bootstrap scores its resamples from row counts; each draw must equal sklearn's or
    scipy's metric on that resample's rows, drawn as the documented generator draws them."""
    rng = np.random.default_rng(3)
    n = 60  # small: some resamples miss a class, and a few rows repeat many times
    if classes:
        labels = rng.integers(0, classes, n)
        a = [np.where(rng.random(n) < p, labels, rng.integers(0, classes, n)) for p in (.7, .5)]
        b = [np.where(rng.random(n) < 0.6, labels, rng.integers(0, classes, n))]
    else:
        labels = rng.random(n).astype(np.float32)
        a = [(labels + rng.random(n)).astype(np.float32), rng.random(n).astype(np.float32)]
        b = [(labels - rng.random(n)).astype(np.float32)]
    reference = {
        "accuracy": sklearn_metrics.accuracy_score,
        "f1": lambda y, p: sklearn_metrics.f1_score(y, p, zero_division=0.0),
        "matthews": sklearn_metrics.matthews_corrcoef,
        "pearson": lambda y, p: scipy.stats.pearsonr(p.astype(np.float64), y)[0],
        "spearman": lambda y, p: scipy.stats.spearmanr(p, y)[0]}[metric]
    draws = np.random.default_rng(0)
    expected = []
    for _ in range(40):
        idx = draws.integers(0, n, n)
        expected.append(np.mean([reference(labels[idx], p[idx]) for p in a])
                        - np.mean([reference(labels[idx], p[idx]) for p in b]))
    lo, hi = np.percentile(expected, [2.5, 97.5])
    diff, our_lo, our_hi = metrics.paired_bootstrap(metric, a, b, labels, resamples=40, chunk=7)
    assert (our_lo, our_hi) == pytest.approx((lo, hi), abs=1e-9)
    assert diff == pytest.approx(np.mean([reference(labels, p) for p in a])
                                 - np.mean([reference(labels, p) for p in b]), abs=1e-6)


def test_counted_pearson_scores_a_resample_of_one_prediction_value_zero():
    labels = np.array([0.1, 0.5, 0.9, 0.3])
    counts = np.array([[4, 0, 0, 0], [0, 2, 2, 0]])  # one row four times; two rows twice
    pred = np.array([[1.0, 2.0, 3.0, 4.0]])
    scores = metrics._weighted_scores("pearson", pred, labels, counts)
    assert scores[0, 0] == 0.0  # as `pearson` on a constant prediction
    assert scores[1, 0] == pytest.approx(1.0)  # two distinct points: a perfect line
