"""Layers shared by every encoder: a Dense that consumes an optional LoRA adapter.

The adapter lives in its own variable collection, ``"lora"``, next to ``"params"``::

    model.apply({"params": frozen_base, "lora": adapter}, ...)

so the base tree is never copied or mutated. A `LoRADense` whose scope has ``lora/A`` (in, r),
``lora/B`` (r, out) and ``lora/alpha`` (a scalar) computes
``y = x W0 + b + (alpha / r) * dropout(x) A B``; without them it is a plain Dense. The adapter
carries its own alpha, so an adapter is never scaled by another adapter's setting. Which kernels
get adapters is decided by `lora_jax.lora.init_lora`, not here. With ``lora/scale`` (B,) in
place of alpha, A (B, in, r) and B (B, r, out) hold one adapter per batch row
(`lora_jax.routing`): ``y_i = x_i W0 + b + scale_i * x_i A_i B_i``.
"""

from __future__ import annotations

import functools
import math
import operator
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

LORA_COLLECTION = "lora"
# A routed adapter (one per batch row, `lora_jax.routing`) carries its scale (alpha / r of the
# adapter each row took) instead of alpha: padded ranks do not change it.
ROUTED_SCALE = "scale"
# A fused layer (`lora_jax.fusion`): k stacked adapters, their scales (k,) under FUSION_SCALE and
# the fusion's own query/key/value kernels (out, out).
FUSION_SCALE = "fusion_scale"
FUSION_KERNELS = ("fusion_query", "fusion_key", "fusion_value")


def gelu_exact(x: jax.Array) -> jax.Array:
    """Exact GELU, ``x * Phi(x) = x (1 + erf(x / sqrt 2)) / 2`` (torch's ``gelu``), elementwise
    in x's dtype.

    The same function as ``jax.nn.gelu(x, approximate=False)``, which goes through ``erfc``:
    XLA:CPU expands erfc into a far longer polynomial than erf. On a 2-core Intel Xeon (jaxlib
    0.10.2, a (32, 128, 1536) float32 array, medians): 3.7 ms forward against 1.3 ms here, the
    gradient 3.9 against 2.8 ms; values within 5e-7. The MiniLM-L3 LoRA train step (batch 32,
    alternating rounds in one process) went from 52.7 to 54.3 examples/s at length 128 and from
    120.2 to 124.7 at length 64.
    """
    return 0.5 * x * (1.0 + jax.lax.erf(x * (1.0 / math.sqrt(2.0))))


ACTIVATIONS = {
    "gelu": gelu_exact,
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
}


def heads_major(x: jax.Array) -> jax.Array:
    """(B, T, H, Dh) -> (B, H, T, Dh): the layout in which the attention dots' batch dims
    (b, h) lead, so XLA:CPU runs them as plain batched GEMMs (the encoder's and T5's
    attention)."""
    return x.transpose(0, 2, 1, 3)


default_kernel_init = nn.initializers.normal(stddev=0.02)

DROPOUT_BITS = 16  # random bits per mask element: the drop probability is a multiple of 2**-16

# Threefry-2x32 with 20 rounds (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3",
# SC 2011): the rotation distances of rounds 4i..4i+3, alternating between two sets.
_THREEFRY_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))
_THREEFRY_PARITY = 0x1BD11BDA


def threefry2x32(key0: jax.Array, key1: jax.Array, x0: jax.Array,
                 x1: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Threefry-2x32 (20 rounds) of the counter pairs (x0, x1) under the key (key0, key1).

    Bit for bit JAX's ``threefry2x32_p`` (tests/test_dropout.py checks it), written out with
    constant rotation distances. On CPU JAX lowers its primitive to a rolled loop whose rotation
    distances are loop-carried values; XLA:CPU compiles each such mask into large kernels of
    variable shifts. Measured on 2 cores (jaxlib 0.10.2, twelve (32, 8, 16..27) masks in one
    jit): 9.6 s to compile and 0.87 ms to run with the primitive, 1.6 s and 0.33 ms with this
    function. GPUs get the same unrolled rounds from JAX's own lowering.

    Args:
      key0, key1: uint32 scalars, the two key words.
      x0, x1: uint32 arrays of one shape, the counter words.
    Returns:
      The two uint32 output words, each of the counters' shape.
    """
    def rotate_left(x, distance):
        return (x << jnp.uint32(distance)) | (x >> jnp.uint32(32 - distance))

    key2 = key0 ^ key1 ^ jnp.uint32(_THREEFRY_PARITY)
    schedule = (key0, key1, key2)
    x0, x1 = x0 + key0, x1 + key1
    for block in range(5):  # 5 blocks of 4 rounds, a key injection after each
        for distance in _THREEFRY_ROTATIONS[block % 2]:
            x0 = x0 + x1
            x1 = x0 ^ rotate_left(x1, distance)
        x0 = x0 + schedule[(block + 1) % 3]
        x1 = x1 + schedule[(block + 2) % 3] + jnp.uint32(block + 1)
    return x0, x1


def dropout_keep_mask(key: jax.Array, shape: tuple[int, ...], rate: float) -> jax.Array:
    """Boolean mask of `shape`, each element True (kept) with probability 1 - rate.

    Profiled on CPU (MiniLM-L3 LoRA step, batch 32, length 128), the masks drawn by
    `flax.linen.Dropout` took a fifth of the train step: `jax.random.bernoulli` spends one
    Threefry-2x32 block (64 bits) on every element. Here one block gives four 16-bit lanes, so a
    mask costs a quarter of the hashing. The four keep bits of a block are packed into one byte
    that XLA must materialise (see the comment in the code): otherwise XLA copies the hash into
    each lane's fusion and computes it four times. The drop probability is
    ``round(rate * 2**16) / 2**16`` (within 8e-6 of `rate`). The counter of each block is its
    position in the (..., m) block array, m = ceil(n/4), so the mask is the same however the
    array is sharded (like JAX's partitionable Threefry) and two shapes never share blocks only
    by accident of layout.
    Element j of the last axis takes lane j // m of block j % m: each lane fills a contiguous
    quarter of the row. (Interleaving the lanes, element j from lane j % 4, cost more on CPU:
    a (32, 12, 128, 128) mask drawn and applied took 13.3 ms against 3.5 ms, a (32, 128, 384)
    one 1.9 against 0.6 ms; medians of alternating runs on 2 cores. The MiniLM-L3 train step
    at length 128 gained 4%.)

    Args:
      key: a Threefry key (typed or raw uint32[2]).
      shape: mask shape (..., n); at most 2**32 blocks.
      rate: drop probability in [0, 1).
    """
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"dropout rate must be in [0, 1), got {rate}")
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.key_data(key)
    if key.shape != (2,):
        raise ValueError(f"dropout needs a Threefry key (uint32[2]); got key data of shape "
                         f"{key.shape} (another PRNG implementation?)")
    *lead, n = shape
    blocks = (*lead, -(-n // 4))
    if math.prod(blocks) >= 2**32:
        raise ValueError(f"a dropout mask of shape {shape} needs more than 2**32 random blocks")
    counter = jnp.zeros(blocks, jnp.uint32)
    stride = 1
    for axis in reversed(range(len(blocks))):  # row-major position of each block
        counter = counter + jax.lax.broadcasted_iota(jnp.uint32, blocks, axis) * jnp.uint32(stride)
        stride *= blocks[axis]
    hi, lo = threefry2x32(key[0], key[1], jnp.zeros(blocks, jnp.uint32), counter)
    low16, threshold = jnp.uint32(0xFFFF), jnp.uint32(round(rate * 2**DROPOUT_BITS))
    lanes = (lo & low16, lo >> 16, hi & low16, hi >> 16)
    packed = functools.reduce(operator.or_, [(lane >= threshold).astype(jnp.uint8) << bit
                                             for bit, lane in enumerate(lanes)])
    # XLA fuses cheap elementwise producers into every consumer, so each of the four lanes
    # below would recompute the whole hash (XLA:CPU: 78 shift-lefts for one mask, 24 here).
    # An identity reduction (max with 0) is a fusion XLA does not copy: the packed bytes are
    # computed once and stored. Measured on 2 cores (alternating rounds in one process): a
    # (32, 12, 128, 128) mask drawn and applied 3.03 -> 2.77 ms; the MiniLM-L3 LoRA step
    # 86.0 -> 87.9 examples/s at length 128 and 195.9 -> 198.1 at length 64. Same masks.
    packed = jnp.max(jnp.stack([packed, jnp.zeros_like(packed)], axis=-1), axis=-1)
    keep = [(packed >> bit) & 1 == 1 for bit in range(4)]
    # compare before joining: the joined array is bool (1 byte), not uint32
    return jnp.concatenate(keep, axis=-1)[..., :n]


class Dropout(nn.Module):
    """Inverted dropout (``x / (1 - rate)`` where kept, 0 elsewhere) with masks from
    `dropout_keep_mask`; a drop-in for `flax.linen.Dropout` (same "dropout" rng stream)."""

    rate: float

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool) -> jax.Array:
        if deterministic or self.rate == 0.0:
            return x
        keep = dropout_keep_mask(self.make_rng("dropout"), x.shape, self.rate)
        return jnp.where(keep, x / jnp.asarray(1.0 - self.rate, x.dtype), jnp.zeros_like(x))


class LoRADense(nn.Module):
    """Dense layer ``x @ kernel + bias`` plus an optional low-rank update from the lora collection.

    Attributes:
      features: output width.
      lora_dropout: dropout rate applied to the LoRA input only (as PEFT does).
      dtype: compute dtype (params are kept in ``param_dtype``).
    """

    features: int
    use_bias: bool = True
    lora_dropout: float = 0.0
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    kernel_init: Any = default_kernel_init

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
        kernel = self.param("kernel", self.kernel_init, (x.shape[-1], self.features),
                            self.param_dtype)
        x = x.astype(self.dtype)
        y = jnp.dot(x, kernel.astype(self.dtype))
        if self.use_bias:
            bias = self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype)
            y = y + bias.astype(self.dtype)
        if self.has_variable(LORA_COLLECTION, FUSION_SCALE):
            return y + self._fused_update(x, y, deterministic)
        if self.has_variable(LORA_COLLECTION, ROUTED_SCALE):
            return y + self._routed_update(x, deterministic)
        if self.has_variable(LORA_COLLECTION, "A"):
            a = self.get_variable(LORA_COLLECTION, "A")
            b = self.get_variable(LORA_COLLECTION, "B")
            if not self.has_variable(LORA_COLLECTION, "alpha"):
                raise ValueError(f"the adapter of {'/'.join(self.scope.path)} has A and B but no "
                                 "alpha; build adapters with lora_jax.lora.init_lora")
            # alpha is a hyper-parameter stored with the adapter, never trained
            alpha = jax.lax.stop_gradient(self.get_variable(LORA_COLLECTION, "alpha"))
            scale = (alpha / a.shape[-1]).astype(self.dtype)
            x_drop = Dropout(self.lora_dropout)(x, deterministic=deterministic)
            y = y + scale * jnp.dot(jnp.dot(x_drop, a.astype(self.dtype)), b.astype(self.dtype))
        return y

    def _routed_update(self, x: jax.Array, deterministic: bool) -> jax.Array:
        """``scale_i * (x_i A_i) B_i`` for every batch row i: the per-row adapters of
        `lora_jax.routing.route` (A (B, in, R), B (B, R, out), scale (B,)), two batched einsums
        over the rows, whatever adapter each row took."""
        a = self.get_variable(LORA_COLLECTION, "A")
        b = self.get_variable(LORA_COLLECTION, "B")
        scale = jax.lax.stop_gradient(self.get_variable(LORA_COLLECTION, ROUTED_SCALE))
        if a.ndim != 3 or a.shape[0] != x.shape[0]:
            raise ValueError(f"the routed adapter of {'/'.join(self.scope.path)} has A of shape "
                             f"{a.shape}, not (batch={x.shape[0]}, in, r): route it with "
                             "lora_jax.routing.route for this batch")
        x_drop = Dropout(self.lora_dropout)(x, deterministic=deterministic)
        low = jnp.einsum("b...i,bir->b...r", x_drop, a.astype(self.dtype))
        delta = jnp.einsum("b...r,bro->b...o", low, b.astype(self.dtype))
        return scale.astype(self.dtype).reshape(-1, *[1] * (x.ndim - 1)) * delta

    def _fused_update(self, x: jax.Array, y: jax.Array, deterministic: bool) -> jax.Array:
        """AdapterFusion over the k stacked LoRA deltas of this layer (`lora_jax.fusion`):

            delta_i = scale_i (x A_i) B_i                       (..., k, out), every module
            p       = softmax_i((y Wq) . (delta_i Wk) / sqrt(out))   query: this layer's output
            update  = sum_i p_i (delta_i Wv)                     Wv starts as the identity

        with A (k, in, R), B (k, R, out), scale (k,) and Wq, Wk, Wv (out, out); `y` is the
        frozen layer's own output x W0 + b.

        Computed through the rank-R factors, never the deltas themselves: delta_i W =
        (scale_i x A_i) (B_i W), so the keys' and values' kernels are folded into B once per
        call ((k, R, out) each) and a token costs one out x out product (its query) plus
        O(k R out), where projecting the k deltas costs 2 k out^2 (and keeps (..., k, out)
        activations for the backward pass). The fusion train step of the MiniLM-L6 grid
        (k = 6 modules of rank 4 on query/key/value, out 384, batch 32 x 128, fp32, 2-core AMD
        EPYC, one process, 4 alternating rounds): 27.2 s with the deltas projected, 3.08 s
        this way; same loss to 1e-7 (`tests/test_fusion.py` checks the per-module formula)."""
        a = self.get_variable(LORA_COLLECTION, "A").astype(self.dtype)
        b = self.get_variable(LORA_COLLECTION, "B").astype(self.dtype)
        scale = self.get_variable(LORA_COLLECTION, FUSION_SCALE).astype(self.dtype)
        query, key, value = (self.get_variable(LORA_COLLECTION, name).astype(self.dtype)
                             for name in FUSION_KERNELS)
        if a.ndim != 3 or scale.shape != (a.shape[0],):
            raise ValueError(f"the fused adapters of {'/'.join(self.scope.path)} have A of shape "
                             f"{a.shape} and {FUSION_SCALE} of shape {scale.shape}, not (k, in, "
                             "r) and (k,): build them with lora_jax.fusion.init_fusion")
        x_drop = Dropout(self.lora_dropout)(x, deterministic=deterministic)
        low = jnp.einsum("...i,kir->...kr", x_drop, a) * scale[:, None]   # (..., k, R)
        b_key = jnp.einsum("kro,op->krp", b, key)                           # B_i Wk
        b_value = jnp.einsum("kro,op->krp", b, value)                       # B_i Wv
        query_low = jnp.einsum("...p,krp->...kr", jnp.dot(y, query), b_key)
        scores = jnp.einsum("...kr,...kr->...k", low, query_low)
        weights = jax.nn.softmax(scores / jnp.sqrt(jnp.asarray(y.shape[-1], self.dtype)), axis=-1)
        self.sow("intermediates", "fusion_weights", weights)
        return jnp.einsum("...kr,kro->...o", weights[..., None] * low, b_value)
