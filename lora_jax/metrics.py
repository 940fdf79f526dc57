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


def _weighted_scores(metric: str, preds: np.ndarray, labels: np.ndarray,
                     weights: np.ndarray) -> np.ndarray | None:
    """The metric of each prediction array preds (S, N) on each resample of the rows given as
    row counts weights (D, N) (row i taken weights[d, i] times), as (D, S) float64; None for a
    metric without a counted form (spearman: it ranks the resampled values). Each equals the
    metric function on the resampled arrays (a test checks them against sklearn and scipy)."""
    w = np.asarray(weights, np.float64)
    if metric == "accuracy":
        return w @ (preds == labels).T.astype(np.float64) / w.sum(1, keepdims=True)
    if metric == "f1":
        pos, true = preds == 1, labels == 1
        tp, fp, fn = (w @ x.T.astype(np.float64) for x in (pos & true, pos & ~true, ~pos & true))
        denom = 2 * tp + fp + fn
        return np.divide(2 * tp, denom, out=np.zeros_like(denom), where=denom > 0)
    if metric == "matthews":  # the multi-class form from each resample's confusion counts
        classes = np.union1d(preds, labels)
        k, lab = len(classes), np.searchsorted(classes, labels)
        out = np.empty((len(w), len(preds)))
        for s, pred in enumerate(preds):
            cells = np.zeros((len(labels), k * k))
            cells[np.arange(len(labels)), lab * k + np.searchsorted(classes, pred)] = 1.0
            conf = (w @ cells).reshape(len(w), k, k)
            t, p = conf.sum(2), conf.sum(1)
            c, n = np.trace(conf, axis1=1, axis2=2), conf.sum((1, 2))
            denom = np.sqrt((n * n - (p * p).sum(1)) * (n * n - (t * t).sum(1)))
            out[:, s] = np.divide(c * n - (t * p).sum(1), denom, out=np.zeros_like(denom),
                                  where=denom > 0)
        return out
    if metric == "pearson":  # weighted moments of values centred on their full-data means
        y = labels.astype(np.float64) - labels.mean()
        n = w.sum(1, keepdims=True)
        taken = w > 0
        out = np.empty((len(w), len(preds)))
        for s, pred in enumerate(preds):
            x = pred.astype(np.float64) - pred.mean()
            mx, my = w @ x / n[:, 0], w @ y / n[:, 0]
            cxy = w @ (x * y) / n[:, 0] - mx * my
            cxx = w @ (x * x) / n[:, 0] - mx * mx
            cyy = w @ (y * y) / n[:, 0] - my * my
            # as `pearson`: 0 where the resampled predictions are all one value
            constant = (np.where(taken, pred, np.inf).min(1)
                        == np.where(taken, pred, -np.inf).max(1))
            out[:, s] = np.where(constant, 0.0, cxy / np.sqrt(np.where(constant, 1.0, cxx * cyy)))
        return out
    return None


def paired_bootstrap(metric: str, preds_a, preds_b, labels: np.ndarray, resamples: int = 1000,
                     seed: int = 0, chunk: int = 100) -> tuple[float, float, float]:
    """(difference, 2.5th, 97.5th percentile) of ``mean over seeds of metric(a) - mean over
    seeds of metric(b)`` on the same rows, the percentiles over `resamples` resamples of the
    rows with replacement (paired: both sides get the same rows). preds_a / preds_b: one
    (N,) prediction array per seed; labels (N,).

    The resamples are scored `chunk` at a time from their row counts (`_weighted_scores`), the
    same draws and values as scoring each resampled array in turn, without its Python loop
    (a Pearson test on 1,500 rows: seconds, not minutes, in a report of many comparisons)."""
    fn = METRICS[metric]
    labels = np.asarray(labels)
    a, b = np.stack([np.asarray(p) for p in preds_a]), np.stack([np.asarray(p) for p in preds_b])
    rng = np.random.default_rng(seed)
    n = len(labels)
    draws = []
    for start in range(0, resamples, chunk):
        rows = [rng.integers(0, n, n) for _ in range(min(chunk, resamples - start))]
        counts = np.stack([np.bincount(idx, minlength=n) for idx in rows])
        ours, theirs = (_weighted_scores(metric, x, labels, counts) for x in (a, b))
        if ours is None:  # no counted form: score each resampled array
            ours, theirs = (np.array([[fn(p[idx], labels[idx]) for p in x] for idx in rows])
                            for x in (a, b))
        draws.append(ours.mean(1) - theirs.mean(1))
    lo, hi = np.percentile(np.concatenate(draws), [2.5, 97.5])
    point = (float(np.mean([fn(p, labels) for p in a]))
             - float(np.mean([fn(p, labels) for p in b])))
    return point, float(lo), float(hi)
