"""Evaluation metrics on numpy arrays (tested against scikit-learn and scipy).

Classification metrics take integer predictions and labels (N,); regression metrics take float
predictions and targets (N,). Every function returns a python float.
"""

from __future__ import annotations

import base64
import zlib

import numpy as np


def accuracy(pred: np.ndarray, label: np.ndarray) -> float:
    return float(np.mean(np.asarray(pred) == np.asarray(label)))


def _binary_counts(pred, label):
    pred, label = np.asarray(pred) == 1, np.asarray(label) == 1
    tp = float(np.sum(pred & label))
    fp = float(np.sum(pred & ~label))
    fn = float(np.sum(~pred & label))
    return tp, fp, fn


def f1(pred: np.ndarray, label: np.ndarray) -> float:
    """Binary F1 of the positive class (label 1); 0 when there are no positives at all."""
    tp, fp, fn = _binary_counts(pred, label)
    denom = 2 * tp + fp + fn
    return 2 * tp / denom if denom else 0.0


def matthews(pred: np.ndarray, label: np.ndarray) -> float:
    """Matthews correlation (multi-class form, as sklearn); 0 when undefined."""
    pred, label = np.asarray(pred), np.asarray(label)
    classes = np.union1d(pred, label)
    idx_p = np.searchsorted(classes, pred)
    idx_l = np.searchsorted(classes, label)
    conf = np.zeros((len(classes), len(classes)), np.float64)
    np.add.at(conf, (idx_l, idx_p), 1)
    t, p = conf.sum(1), conf.sum(0)
    c, s = np.trace(conf), conf.sum()
    cov_pp = s * s - p @ p
    cov_tt = s * s - t @ t
    denom = np.sqrt(cov_pp * cov_tt)
    return float((c * s - t @ p) / denom) if denom else 0.0


# scipy.stats is imported where it is used: it takes half a second to import, and every
# command (an error message, a classification run) would pay it otherwise


def pearson(pred: np.ndarray, label: np.ndarray) -> float:
    import scipy.stats

    return float(scipy.stats.pearsonr(pred, label)[0]) if np.std(pred) > 0 else 0.0


def spearman(pred: np.ndarray, label: np.ndarray) -> float:
    import scipy.stats

    return float(scipy.stats.spearmanr(pred, label)[0]) if np.std(pred) > 0 else 0.0


METRICS = {"accuracy": accuracy, "f1": f1, "matthews": matthews, "pearson": pearson,
           "spearman": spearman}


def compute(names, pred, label) -> dict[str, float]:
    return {name: METRICS[name](pred, label) for name in names}


# ----------------------------------------------------------------------------- per-row outputs


def pack_array(x: np.ndarray) -> str:
    """A 1-D int or float array as ``"<dtype>:<base64 of its zlib-compressed bytes>"``: a run's
    per-row predictions and labels fit in its results.json (class ids as int16, regression
    values as float32, exactly)."""
    x = np.asarray(x)
    x = x.astype(np.int16) if np.issubdtype(x.dtype, np.integer) else x.astype(np.float32)
    return f"{x.dtype.name}:" + base64.b64encode(zlib.compress(x.tobytes(), 9)).decode("ascii")


def unpack_array(packed: str) -> np.ndarray:
    dtype, _, data = packed.partition(":")
    return np.frombuffer(zlib.decompress(base64.b64decode(data)), np.dtype(dtype))


def paired_bootstrap(metric: str, preds_a, preds_b, labels: np.ndarray, resamples: int = 1000,
                     seed: int = 0) -> tuple[float, float, float]:
    """(difference, 2.5th, 97.5th percentile) of ``mean over seeds of metric(a) - mean over
    seeds of metric(b)`` on the same rows, the percentiles over `resamples` resamples of the
    rows with replacement (paired: both sides get the same rows). preds_a / preds_b: one
    (N,) prediction array per seed; labels (N,)."""
    fn = METRICS[metric]
    labels = np.asarray(labels)

    def diff(idx):
        return (float(np.mean([fn(p[idx], labels[idx]) for p in preds_a]))
                - float(np.mean([fn(p[idx], labels[idx]) for p in preds_b])))

    rng = np.random.default_rng(seed)
    n = len(labels)
    draws = [diff(rng.integers(0, n, n)) for _ in range(resamples)]
    lo, hi = np.percentile(draws, [2.5, 97.5])
    return diff(np.arange(n)), float(lo), float(hi)
