"""The dropout used by every model (`lora_jax.models.layers.Dropout`): Bernoulli keep masks from
four 16-bit lanes per Threefry block, checked for rate, lane independence and scaling, and the
block function checked bit for bit against JAX's own Threefry."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lora_jax.models.layers import Dropout, dropout_keep_mask, threefry2x32


@pytest.mark.parametrize("rate", [0.1, 0.5])
def test_every_lane_keeps_1_minus_rate(rate):
    keep = np.asarray(dropout_keep_mask(jax.random.PRNGKey(0), (512, 4 * 257), rate))
    for lane in range(4):  # lane i fills quarter i of the row
        part = keep[:, lane * 257:(lane + 1) * 257]
        sigma = np.sqrt(rate * (1 - rate) / part.size)
        assert abs(part.mean() - (1 - rate)) < 5 * sigma, (lane, part.mean())


def test_lanes_and_neighbours_are_uncorrelated():
    keep = np.asarray(dropout_keep_mask(jax.random.PRNGKey(1), (256, 4096), 0.5), np.float64)
    flat = keep.ravel()
    for offset in (1, 2, 1024, 2048, 3072, 4096):  # next blocks, same block's lanes, next row
        r = np.corrcoef(flat[:-offset], flat[offset:])[0, 1]
        assert abs(r) < 0.01, (offset, r)


def test_masks_depend_on_the_key_only_and_odd_widths_work():
    a = dropout_keep_mask(jax.random.PRNGKey(2), (3, 1001), 0.3)
    b = dropout_keep_mask(jax.random.PRNGKey(2), (3, 1001), 0.3)
    c = dropout_keep_mask(jax.random.PRNGKey(3), (3, 1001), 0.3)
    assert a.shape == (3, 1001) and a.dtype == jnp.bool_
    np.testing.assert_array_equal(a, b)
    assert 0.3 < float(jnp.mean(a != c)) < 0.5  # independent masks differ in 2p(1-p) = 42%
    typed = dropout_keep_mask(jax.random.key(2), (3, 1001), 0.3)
    np.testing.assert_array_equal(a, typed)


def test_dropout_scales_kept_values_and_is_identity_when_deterministic():
    x = jnp.asarray(np.random.default_rng(0).normal(size=(64, 512)), jnp.float32)
    layer = Dropout(0.25)
    y = layer.apply({}, x, deterministic=False, rngs={"dropout": jax.random.PRNGKey(4)})
    kept = np.asarray(y) != 0
    np.testing.assert_allclose(np.asarray(y)[kept], np.asarray(x)[kept] / 0.75, rtol=1e-6)
    assert abs(kept.mean() - 0.75) < 0.01
    np.testing.assert_array_equal(layer.apply({}, x, deterministic=True), x)
    bf16 = layer.apply({}, x.astype(jnp.bfloat16), deterministic=False,
                       rngs={"dropout": jax.random.PRNGKey(4)})
    assert bf16.dtype == jnp.bfloat16


def test_bad_rate_and_non_threefry_keys_are_refused():
    with pytest.raises(ValueError, match=r"in \[0, 1\)"):
        dropout_keep_mask(jax.random.PRNGKey(0), (4, 4), 1.0)
    with pytest.raises(ValueError, match="Threefry key"):
        dropout_keep_mask(jax.random.key(0, impl="rbg"), (4, 4), 0.1)


def test_threefry_is_jax_threefry_bit_for_bit():
    from jax.extend.random import threefry2x32_p

    rng = np.random.default_rng(5)
    for _ in range(4):
        k0, k1 = (jnp.uint32(v) for v in rng.integers(0, 2**32, 2, dtype=np.uint64))
        x0, x1 = (jnp.asarray(rng.integers(0, 2**32, (7, 33), dtype=np.uint64), jnp.uint32)
                  for _ in range(2))
        ours = jax.jit(threefry2x32)(k0, k1, x0, x1)
        theirs = jax.jit(threefry2x32_p.bind)(k0, k1, x0, x1)
        for a, b in zip(ours, theirs, strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # the known-answer vector of the Random123 reference implementation (key 0, counter 0)
    zero = jnp.zeros((1,), jnp.uint32)
    out = threefry2x32(jnp.uint32(0), jnp.uint32(0), zero, zero)
    assert [hex(int(w[0])) for w in out] == ["0x6b200159", "0x99ba4efe"]


def test_mask_is_the_documented_function_of_jaxs_threefry():
    """Element j of a row of n takes lane j // m of block j % m (m = ceil(n / 4) blocks a row,
    counted row-major over the whole mask); lanes are the low and high halves of the hash's
    second word, then of its first; kept where the lane >= round(rate * 2**16). Rebuilt here
    in numpy from JAX's own Threefry primitive."""
    from jax.extend.random import threefry2x32_p

    key, shape, rate = jax.random.PRNGKey(7), (3, 5, 37), 0.3
    m = -(-shape[-1] // 4)
    counter = jnp.arange(3 * 5 * m, dtype=jnp.uint32).reshape(3, 5, m)
    hi, lo = (np.asarray(w) for w in threefry2x32_p.bind(
        key[0], key[1], jnp.zeros_like(counter), counter))
    lanes = np.concatenate([lo & 0xFFFF, lo >> 16, hi & 0xFFFF, hi >> 16], axis=-1)
    expected = (lanes >= round(rate * 2**16))[..., :shape[-1]]
    np.testing.assert_array_equal(np.asarray(jax.jit(
        dropout_keep_mask, static_argnums=(1, 2))(key, shape, rate)), expected)


def test_a_compiled_mask_computes_the_hash_once():
    """XLA copies cheap elementwise producers into each consumer; the packed keep bits are
    materialised so that the four lanes do not each recompute the hash (on CPU the shift-lefts
    of one hash, 20 rotations, against 78 when each lane had its own copy)."""
    if jax.default_backend() != "cpu":
        pytest.skip("counts the shifts in XLA:CPU's compiled program")
    key, shape = jax.random.PRNGKey(0), (32, 128, 384)  # small masks were not copied
    blocks = jnp.zeros((32, 128, 96), jnp.uint32)
    rotations = jax.jit(threefry2x32).lower(key[0], key[1], blocks, blocks).as_text().count(
        "stablehlo.shift_left")  # before XLA's passes: one hash, one shift-left per rotation
    mask = jax.jit(dropout_keep_mask, static_argnums=(1, 2)).lower(key, shape, 0.1).compile()
    hashes = mask.as_text().count("shift-left(") / rotations
    assert rotations == 20 and 1 <= hashes < 1.5, (rotations, hashes)
