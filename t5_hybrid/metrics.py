"""Scores of generated text against references, as fractions in [0, 1] (tables show x100)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def exact_match(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Fraction of predictions equal to their reference after stripping outer whitespace."""
    return float(np.mean([p.strip() == r.strip()
                          for p, r in zip(predictions, references, strict=True)]))


def rouge(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Mean ROUGE-1/2/L F1 (rouge-score, Porter stemming), as the SAMSum literature reports."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    scores = [scorer.score(r, p) for p, r in zip(predictions, references, strict=True)]
    return {k: float(np.mean([s[k].fmeasure for s in scores]))
            for k in ("rouge1", "rouge2", "rougeL")}


def compute(metrics: Sequence[str], predictions: Sequence[str],
            references: Sequence[str]) -> dict[str, float]:
    out: dict[str, float] = {}
    if any(m.startswith("rouge") for m in metrics):
        out.update(rouge(predictions, references))
    for name in metrics:
        if name in ("accuracy", "logical_form_accuracy"):
            out[name] = exact_match(predictions, references)
    return {m: out[m] for m in metrics}
