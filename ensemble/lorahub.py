"""LoraHub (Huang et al. 2023) for encoders: gradient-free weights for summing k frozen LoRA
modules, found on the target's few labelled rows.

LoraHub sums the modules (`lora_jax.merge.weighted_sum`: ``A = sum w_i A_i``, ``B = sum w_i
B_i``) and searches w in [-bound, bound]^k, starting from 0, with a gradient-free optimiser
for a fixed number of evaluations (40 in the paper), minimising the few-shot loss plus
``l1 * sum |w_i|``. A seq2seq LM scores its own outputs; an encoder needs a head for the target's
classes, so here each candidate's loss is that of a linear head fitted on the candidate's
features of the train rows (`fit_head_loss`: full-batch Adam, a fixed number of steps, from
zero), measured on the selection rows: held out, since a head on d > n features fits any train
rows. The optimiser is CMA-ES from the `cma` package (``pip install -e '.[lorahub]'``).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lora_jax.data import random_subset
from lora_jax.errors import UserError, extra_install_hint
from lora_jax.merge import weighted_sum

# loss_fn(logits (B, C), labels (B,), weights (B,), regression) -> (mean loss, predictions)
LossFn = Callable[..., tuple[jax.Array, jax.Array]]


def require_cma():
    try:
        import cma
    except ImportError:
        raise UserError("combiner.method='lorahub' searches with CMA-ES from the cma package: "
                        + extra_install_hint("lorahub")) from None
    return cma


def fit_head_loss(loss_fn: LossFn, num_outputs: int, regression: bool, steps: int = 200,
                  learning_rate: float = 1e-2) -> Callable:
    """A jitted ``(train_x (n, d), train_y (n,), held_x (m, d), held_y (m,)) -> loss on the held
    rows`` of a linear head (d -> num_outputs) fitted from zero by `steps` full-batch Adam
    steps on the train rows: a deterministic function of the features."""

    def logits(head, x):
        return x @ head["kernel"] + head["bias"]

    def loss(head, x, y):
        return loss_fn(logits(head, x), y, jnp.ones(len(y)), regression)[0]

    @jax.jit
    def fitted_loss(train_x, train_y, held_x, held_y):
        head = {"kernel": jnp.zeros((train_x.shape[-1], num_outputs)),
                "bias": jnp.zeros((num_outputs,))}
        opt = optax.adam(learning_rate)

        def step(_, carry):
            head, state = carry
            grads = jax.grad(loss)(head, train_x, train_y)
            updates, state = opt.update(grads, state, head)
            return optax.apply_updates(head, updates), state

        head, _ = jax.lax.fori_loop(0, steps, step, (head, opt.init(head)))
        return loss(head, held_x, held_y)

    return fitted_loss


def cma_search(objective: Callable[[np.ndarray], float], k: int, max_evaluations: int,
               seed: int, bound: float = 1.5, sigma: float = 0.5
               ) -> tuple[np.ndarray, float, list[float]]:
    """(best w (k,), its objective, the objective of every evaluation in order): CMA-ES from
    w = 0 within [-bound, bound]^k for `max_evaluations` evaluations; seeded (cma's seed 0
    means random, so its seed is ``seed + 1``)."""
    cma = require_cma()
    options = {"bounds": [-bound, bound], "seed": seed + 1, "maxfevals": max_evaluations,
               "verbose": -9, "verb_log": 0, "verb_disp": 0}
    if k == 1:  # cma needs two dimensions; a second, unused coordinate leaves w_0's search
        wrapped = lambda x: objective(np.asarray(x[:1]))
        best, value, history = cma_search(wrapped, 2, max_evaluations, seed, bound, sigma)
        return best[:1], value, history
    es = cma.CMAEvolutionStrategy(np.zeros(k), sigma, options)
    history: list[float] = []
    best, best_value = np.zeros(k), float("inf")
    while not es.stop() and len(history) < max_evaluations:
        candidates = es.ask()[: max_evaluations - len(history)]
        values = [float(objective(np.asarray(x))) for x in candidates]
        history += values
        for x, v in zip(candidates, values, strict=True):
            if v < best_value:
                best, best_value = np.asarray(x, np.float64), v
        if len(candidates) == es.popsize:
            es.tell(candidates, values)
    return best, best_value, history


def search_weights(config, extractor, train, held, num_outputs: int, regression: bool,
                   loss_fn: LossFn, features: Callable) -> dict:
    """LoraHub's weights for the first k modules of `extractor` (`ensemble.features.
    FeatureExtractor`) on the encoded `train` and `held` (selection) rows, at most
    ``combiner.lorahub_search_rows`` of each (a seeded sample). features(extractor, enc, rows)
    -> (modules (n, 1, D), base (n, d)). Returns {"weights", "objective", "history" (every
    evaluation's objective), "search_rows" (how many train and selection rows it scored)}."""
    c = config.combiner
    require_cma()
    picked = [random_subset(len(enc), c.lorahub_search_rows, config.seed + i)
              for i, enc in enumerate((train, held))]
    picked = [np.arange(len(enc)) if p is None else p for p, enc in zip(picked, (train, held),
                                                                         strict=True)]
    labels = [jnp.asarray(enc.labels[p]) for enc, p in zip((train, held), picked, strict=True)]
    loras = [m.lora for m in extractor.module_set.modules[: extractor.k]]
    fitted = fit_head_loss(loss_fn, num_outputs, regression)

    def objective(w: np.ndarray) -> float:
        candidate = extractor.with_adapters([weighted_sum(loras, [float(x) for x in w])])
        x_train, x_held = (jnp.asarray(features(candidate, enc, p)[0][:, 0])
                           for enc, p in zip((train, held), picked, strict=True))
        return float(fitted(x_train, labels[0], x_held, labels[1])) + c.lorahub_l1 * float(
            np.abs(w).sum())

    best, value, history = cma_search(objective, extractor.k, c.lorahub_evaluations,
                                      config.seed, c.lorahub_bound)
    return {"weights": [round(float(w), 6) for w in best], "objective": round(value, 6),
            "history": [round(v, 6) for v in history],
            "search_rows": {"train": len(picked[0]), "selection": len(picked[1])}}
