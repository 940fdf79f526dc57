"""LoraHub's pieces: the CMA-ES search and the head fitted per candidate."""

from __future__ import annotations

import sys

import jax.numpy as jnp
import numpy as np
import pytest

from ensemble.lorahub import cma_search, fit_head_loss, require_cma
from lora_jax.errors import UserError
from lora_jax.trainer import weighted_loss_and_predictions

pytest.importorskip("cma")


def test_cma_search_finds_a_known_minimum_within_its_budget_and_bounds():
    target = np.array([0.8, -0.5, 1.2])
    calls = []

    def objective(w):
        calls.append(np.array(w))
        return float(np.square(w - target).sum())

    best, value, history = cma_search(objective, 3, max_evaluations=300, seed=0)
    assert len(history) == len(calls) <= 300
    assert np.abs(best - target).max() < 0.05 and value == min(history)
    assert all(np.abs(w).max() <= 1.5 for w in calls)  # inside [-bound, bound]
    again = cma_search(objective, 3, max_evaluations=300, seed=0)
    np.testing.assert_array_equal(again[0], best)  # seeded
    few = cma_search(objective, 3, max_evaluations=7, seed=0)
    assert len(few[2]) == 7  # the budget is the number of evaluations, whatever the popsize
    outside = cma_search(lambda w: float(np.square(w - 3.0).sum()), 2, 200, seed=1)
    assert np.allclose(outside[0], 1.5, atol=0.05)  # pinned at the bound
    one = cma_search(lambda w: float((w[0] - 0.3) ** 2), 1, 200, seed=0)
    assert one[0].shape == (1,) and abs(one[0][0] - 0.3) < 0.05


def test_the_fitted_head_scores_features_that_carry_the_label_better():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 120)
    informative = np.eye(3)[labels] * 3 + rng.normal(size=(120, 3)) * 0.3
    noise = rng.normal(size=(120, 3))
    loss = fit_head_loss(weighted_loss_and_predictions, 3, regression=False)
    y = jnp.asarray(labels, jnp.int32)
    good = float(loss(jnp.asarray(informative[:80]), y[:80], jnp.asarray(informative[80:]),
                      y[80:]))
    bad = float(loss(jnp.asarray(noise[:80]), y[:80], jnp.asarray(noise[80:]), y[80:]))
    assert good < 0.3 < np.log(3) - 0.2 < bad
    targets = jnp.asarray(informative[:, 0] * 2.0, jnp.float32)
    mse = fit_head_loss(weighted_loss_and_predictions, 1, regression=True, steps=500)
    assert float(mse(jnp.asarray(informative[:80]), targets[:80], jnp.asarray(informative[80:]),
                     targets[80:])) < 0.5


def test_lorahub_without_cma_is_one_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "cma", None)
    with pytest.raises(UserError, match=r"cma package: pip install 'cma>=3\.3' \(the "
                                        r"\[lorahub\] extra: pip install -e '\.\[lorahub\]'"):
        require_cma()
