"""The decoding loop's own reductions equal the XLA primitives they replace, ties, -inf and NaN
included: `argmax_last` is `jnp.argmax`, `reduce_by_halving` is max/min, and `top_candidates` is
`jax.lax.top_k` over ``beam_logp + log_softmax(logits)`` (values bit for bit, same indices)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from t5_hybrid.generate import argmax_last, reduce_by_halving, top_candidates


def tied(rng, shape, levels=4, inf_share=0.1):
    """Few distinct values (many ties) with some -inf."""
    x = rng.integers(0, levels, shape).astype(np.float32)
    x[rng.random(shape) < inf_share] = -np.inf
    return x


@pytest.mark.parametrize("width", [1, 2, 3, 7, 64, 127, 256])
def test_reduce_by_halving_is_max_and_min(width):
    x = np.random.default_rng(width).normal(size=(5, width)).astype(np.float32)
    x[0, width // 2] = np.nan
    np.testing.assert_array_equal(reduce_by_halving(x), x.max(-1))
    np.testing.assert_array_equal(reduce_by_halving(x, jnp.minimum), x.min(-1))


@pytest.mark.parametrize("vocab", [37, 640, 32128])
def test_argmax_last_is_argmax(vocab):
    rng = np.random.default_rng(vocab)
    x = tied(rng, (24, vocab))
    x[1, [3, 9]] = np.nan  # the first NaN wins
    x[2] = -np.inf
    x[3, vocab - 1] = np.inf
    np.testing.assert_array_equal(jax.jit(argmax_last)(x), jnp.argmax(x, -1))


@pytest.mark.parametrize("vocab", [97, 640, 1000, 32128])  # no chunking, then chunks of 128, 125
def test_top_candidates_is_top_k_of_the_scores(vocab):
    rng = np.random.default_rng(vocab)
    pick = jax.jit(top_candidates, static_argnums=2)
    for _ in range(8):
        k = int(rng.integers(1, 6))
        logits = tied(rng, (3, k, vocab))
        beam_logp = rng.integers(-3, 1, (3, k)).astype(np.float32)
        beam_logp[rng.random((3, k)) < 0.3] = -np.inf  # empty beams, as at the first step
        scores = beam_logp[..., None] + jax.nn.log_softmax(logits, -1)
        want_values, want_index = jax.lax.top_k(scores.reshape(3, -1), 2 * k)
        values, index = pick(logits, beam_logp, 2 * k)
        np.testing.assert_array_equal(index, want_index)
        np.testing.assert_array_equal(values, want_values)


def test_top_candidates_breaks_a_tie_across_chunks_by_flat_index():
    # best candidate 9 in chunk 3; the runner-up 5 is both at index 0 (chunk 0) and at index
    # 401 (chunk 3, picked first by its larger maximum): top_k keeps index 0
    logits = np.full((1, 1, 640), -np.inf, np.float32)
    logits[0, 0, [0, 400, 401]] = [5.0, 9.0, 5.0]
    values, index = top_candidates(logits, np.zeros((1, 1), np.float32), 2)
    np.testing.assert_array_equal(index, [[400, 0]])
    np.testing.assert_array_equal(values, jax.lax.top_k(jax.nn.log_softmax(logits[0], -1), 2)[0])
