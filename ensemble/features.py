"""Pooled outputs of k frozen LoRA modules and the frozen base, in ONE stacked pass.

The k adapters are stacked on a leading axis and a (k+1)-th all-zero adapter (B = 0, i.e.
exactly the base model) is appended; one `jax.vmap` over that axis runs every encoder pass in a
single jit-compiled program that shares the base weights. Per example it yields

  modules: (k, D)  Agg1 over tokens of the last hidden states (D = d, ``output="hidden"``), or of
                   each module's per-token task logits zero-padded to the widest head
                   (D = max C_i, ``output="logits"``);
  base:    (d,)    the base encoder's pooled output (masked mean, [CLS], or BERT pooler).

Because everything here is frozen, the features of a split are computed once (eval mode) and
cached on disk, keyed by the model, the adapters' bytes, the settings and the texts.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from lora_jax import data as data_lib
from lora_jax.models import Encoder
from lora_jax.models.encoder import pool

AGG1 = ("mean", "max", "min", "sum")
OUTPUTS = ("hidden", "logits")


def aggregate_tokens(x: jax.Array, mask: jax.Array, how: str, count_padding: bool = False):
    """Agg1 over the token axis of (..., B, T, D) with mask (B, T); returns (..., B, D) float32.

    count_padding=True reproduces the reference code's plain mean over all T positions.
    """
    x = x.astype(jnp.float32)
    m = jnp.ones_like(mask) if count_padding else mask
    m = m.astype(bool)[..., None]
    if how == "mean":
        return jnp.sum(jnp.where(m, x, 0.0), -2) / jnp.maximum(m.sum(-2), 1)
    if how == "sum":
        return jnp.sum(jnp.where(m, x, 0.0), -2)
    if how == "max":
        return jnp.max(jnp.where(m, x, -jnp.inf), -2)
    if how == "min":
        return jnp.min(jnp.where(m, x, jnp.inf), -2)
    raise ValueError(f"agg1 {how!r} is unknown; use one of {AGG1}")


def stack_trees(trees: list) -> dict:
    """Stack identically shaped pytrees on a new leading axis (k, ...)."""
    return jax.tree_util.tree_map(lambda *xs: jnp.stack([jnp.asarray(x) for x in xs]), *trees)


def with_base_slot(stacked_lora: dict) -> dict:
    """Append one all-zero adapter (k+1-th): with B = 0 it computes exactly the base model."""
    return jax.tree_util.tree_map(
        lambda x: jnp.concatenate([x, jnp.zeros_like(x[:1])], axis=0), stacked_lora)


def stack_heads(heads: list[dict]) -> tuple[jax.Array, jax.Array]:
    """Head kernels (d, C_i) and biases (C_i,) zero-padded to (k, d, Cmax) and (k, Cmax)."""
    cmax = max(h["kernel"].shape[-1] for h in heads)
    pad = lambda x, c: jnp.pad(jnp.asarray(x, jnp.float32),
                               [(0, 0)] * (x.ndim - 1) + [(0, cmax - c)])
    kernels = jnp.stack([pad(h["kernel"], h["kernel"].shape[-1]) for h in heads])
    biases = jnp.stack([pad(h["bias"], h["bias"].shape[-1]) for h in heads])
    return kernels, biases


def make_feature_fn(encoder: Encoder, *, output: str = "hidden", agg1: str = "mean",
                    base_pooling: str = "mean", count_padding: bool = False) -> Callable:
    """features(base_params, stacked_lora_with_base, heads, batch, rng=None) -> (modules, base).

    stacked_lora_with_base: adapters with leading axis k+1, the last one all-zero
    (`with_base_slot`). heads: (kernels (k, d, Cmax), biases (k, Cmax)), used for logits.
    rng: None for eval mode; a PRNG key turns dropout on inside every encoder pass (the
    reference code's quirk; then features cannot be cached).
    Returns modules (B, k, D) and base (B, d), float32.
    """
    if output not in OUTPUTS:
        raise ValueError(f"output {output!r} is unknown; use one of {OUTPUTS}")

    def features(base_params, stacked, heads, batch, rng=None):
        ids, mask, types = batch["input_ids"], batch["attention_mask"], batch["token_type_ids"]
        k1 = jax.tree_util.tree_leaves(stacked)[0].shape[0]
        rngs = jax.random.split(rng, k1) if rng is not None else None

        def one(lora, key):
            kw = {"rngs": {"dropout": key}} if key is not None else {}
            return encoder.apply({"params": base_params, "lora": lora}, ids, mask, types,
                                 deterministic=key is None, **kw)

        hidden, pooled = jax.vmap(one)(stacked, rngs)  # (k+1, B, T, d), (k+1, B, d) | None
        base = pool(hidden[-1], None if pooled is None else pooled[-1], mask, base_pooling)
        per_module = hidden[:-1]
        if output == "logits":
            kernels, biases = heads
            per_module = jnp.einsum("kbtd,kdc->kbtc", per_module.astype(jnp.float32),
                                    kernels) + biases[:, None, None, :]
        modules = aggregate_tokens(per_module, mask, agg1, count_padding)  # (k, B, D)
        return jnp.swapaxes(modules, 0, 1), base

    return features


def fingerprint(tree) -> str:
    """sha256 over the bytes of every leaf (in tree order) of a pytree of arrays."""
    h = hashlib.sha256()
    for leaf in jax.tree_util.tree_leaves(tree):
        arr = np.ascontiguousarray(np.asarray(leaf))
        h.update(str(arr.shape).encode() + str(arr.dtype).encode() + arr.tobytes())
    return h.hexdigest()


def cache_key(settings: dict, texts: list[tuple[str, ...]]) -> str:
    h = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for t in texts:
        h.update("\x1f".join(t).encode() + b"\x1e")
    return h.hexdigest()[:24]


def compute_split_features(feature_fn: Callable, base_params, stacked, heads,
                           enc: data_lib.Encoded, *, batch_size: int, buckets, pad_id: int,
                           put: Callable = lambda b: b, desc: str = "features"):
    """(modules (N, k, D), base (N, d)) float32 numpy for every example of a split."""
    fn = jax.jit(feature_fn)
    modules = base = None
    for idx in tqdm(data_lib.eval_order(enc.lengths, batch_size), desc=desc, leave=False):
        batch = put(data_lib.make_batch(enc, idx, batch_size, buckets, pad_id))
        m, b = jax.device_get(fn(base_params, stacked, heads, batch))
        if modules is None:
            modules = np.zeros((len(enc), *m.shape[1:]), np.float32)
            base = np.zeros((len(enc), *b.shape[1:]), np.float32)
        modules[idx], base[idx] = m[: len(idx)], b[: len(idx)]
    return modules, base


def cached_features(cache_dir: str, settings: dict, texts, compute: Callable):
    """Load (modules, base, seconds=0) from the cache, or compute, save and time them."""
    key = cache_key(settings, texts)
    path = os.path.join(cache_dir, f"{key}.npz")
    if cache_dir and os.path.isfile(path):
        with np.load(path) as z:
            return z["modules"], z["base"], 0.0, True
    t0 = time.perf_counter()
    modules, base = compute()
    seconds = time.perf_counter() - t0
    if cache_dir:
        os.makedirs(cache_dir, exist_ok=True)
        tmp = path + ".tmp.npz"
        np.savez(tmp, modules=modules, base=base)
        os.replace(tmp, path)
        with open(os.path.join(cache_dir, f"{key}.json"), "w") as f:
            json.dump({**settings, "rows": len(texts), "seconds": round(seconds, 2)}, f, indent=1)
    return modules, base, seconds, False
