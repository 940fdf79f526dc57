"""Weight-space merges of k LoRA adapters into one: `merge_adapters`, with the semantics of
PEFT's ``LoraModel.add_weighted_adapter`` (combination types linear, ties, dare_linear,
dare_ties, magnitude_prune; all adapters of one rank r on the same layers), and LoraHub's
`weighted_sum`.

For every adapted layer, adapter i (``A_i`` (in, r), ``B_i`` (r, out), scale
``s_i = w_i * alpha_i / r``) enters with the factor ``sqrt(|s_i|) * sign(s_i)`` on A and
``sqrt(|s_i|)`` on B; the A's and the B's are each combined by the method, elementwise:

    linear           sum_i f_i T_i
    magnitude_prune  sum_i f_i P(T_i)                    P: keep the top int(density * size)
                                                            entries of |T_i|, zero the rest
    ties             TIES: P, then the majority sign per entry (of sum_i P(T_i), or of the
                     count of signs with ``majority_sign="frequency"``), then the mean of the
                     weighted entries that carry it (entries with another sign or 0 left out)
    dare_linear      sum_i f_i M_i T_i / density         M_i: Bernoulli(density) keep masks
    dare_ties        the DARE drop, then the TIES sign election and disjoint mean

The merged adapter has alpha = r (scale 1), as PEFT's (which sets lora_alpha = r). Note that
merging A and B separately is not the merge of the deltas ``A_i B_i`` (it adds cross terms);
that is PEFT's definition, kept so that merges agree with it. A density of 1 prunes nothing.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from lora_jax.errors import UserError
from lora_jax.lora import ALPHA, adapter_layers

MERGE_METHODS = ("linear", "magnitude_prune", "ties", "dare_linear", "dare_ties")
MAJORITY_SIGN_METHODS = ("total", "frequency")


def check_merge(method: str, density: float, majority_sign: str = "total") -> None:
    """UserError for an unknown method or sign election, or a density outside (0, 1]."""
    if method not in MERGE_METHODS:
        raise UserError(f"unknown merge method {method!r}; use one of {', '.join(MERGE_METHODS)}")
    if not (isinstance(density, (int, float)) and 0 < density <= 1):
        raise UserError(f"merge density must be in (0, 1] (the fraction of entries kept), got "
                        f"{density!r}")
    if majority_sign not in MAJORITY_SIGN_METHODS:
        raise UserError(f"unknown majority_sign {majority_sign!r}; use total or frequency")


def layers_of(loras: Sequence[Mapping], weights: Sequence[float]) -> list[dict]:
    """`adapter_layers` of each adapter tree, after checking there is one weight per adapter
    and that all adapt the same layers."""
    if len(loras) != len(weights) or not loras:
        raise UserError(f"merging needs one weight per adapter: {len(loras)} adapters, "
                        f"{len(weights)} weights")
    layers = [adapter_layers(lora) for lora in loras]
    for i, other in enumerate(layers[1:], 1):
        if set(other) != set(layers[0]):
            diff = sorted(set(other) ^ set(layers[0]))
            raise UserError(f"adapter {i} adapts other layers than adapter 0 (e.g. "
                            f"{'/'.join(map(str, diff[0]))}); merged adapters need the same layers")
    return layers


def magnitude_prune(t: jax.Array, density: float) -> jax.Array:
    """`t` with all but its int(density * t.size) largest-magnitude entries set to 0."""
    if density >= 1:
        return t
    k = int(density * t.size)
    flat = t.reshape(-1)
    if k == 0:
        return jnp.zeros_like(t)
    _, keep = jax.lax.top_k(jnp.abs(flat), k)
    return jnp.zeros_like(flat).at[keep].set(flat[keep]).reshape(t.shape)


def majority_sign_mask(stacked: jax.Array, method: str) -> jax.Array:
    """(k, ...) bool: entry i carries the elected sign (+1 where the tally is >= 0, else -1)."""
    signs = jnp.sign(stacked)
    tally = stacked.sum(0) if method == "total" else signs.sum(0)
    return signs == jnp.where(tally >= 0, 1.0, -1.0)


def combine_tensors(tensors: Sequence[jax.Array], factors: Sequence[float], method: str,
                    density: float = 1.0, majority_sign: str = "total",
                    keep: Sequence[jax.Array] | None = None) -> jax.Array:
    """One tensor from k same-shaped `tensors` with per-tensor `factors` (see the module
    docstring); `keep`: the k DARE keep masks (bool, like the tensors), needed by dare_*."""
    t = [jnp.asarray(x, jnp.float32) for x in tensors]
    if method in ("magnitude_prune", "ties"):
        t = [magnitude_prune(x, density) for x in t]
    elif method in ("dare_linear", "dare_ties"):
        if keep is None:
            raise ValueError(f"{method} needs the DARE keep masks")
        if density < 1:
            t = [jnp.where(m, x, 0.0) / density for x, m in zip(t, keep, strict=True)]
    stacked = jnp.stack(t)
    f = jnp.asarray(factors, jnp.float32).reshape((-1,) + (1,) * (stacked.ndim - 1))
    if method.endswith("ties"):
        carries = majority_sign_mask(stacked, majority_sign)
        return (stacked * f * carries).sum(0) / jnp.maximum(carries.sum(0), 1)
    return (stacked * f).sum(0)


def dare_keep_masks(key: jax.Array, loras: Sequence[Mapping], density: float) -> list[dict]:
    """Bernoulli(`density`) keep masks of the A and B leaves of each of `loras` (True: the entry
    stays), {layer path: {"A", "B"}}: one independent draw per adapter, layer and leaf, all from
    `key` (a fixed key: a fixed merge)."""
    masks = []
    for i, lora in enumerate(loras):
        flat = traverse_util.flatten_dict(lora)
        paths = sorted(p for p in flat if p[-1] in ("A", "B"))
        keys = jax.random.split(jax.random.fold_in(key, i), len(paths))
        masks.append(adapter_layers(traverse_util.unflatten_dict(
            {p: jax.random.bernoulli(k, density, flat[p].shape)
             for k, p in zip(keys, paths, strict=True)})))
    return masks


def merge_adapters(loras: Sequence[Mapping], weights: Sequence[float], method: str = "linear",
                   density: float = 1.0, majority_sign: str = "total",
                   key: jax.Array | None = None) -> dict:
    """One ``lora`` tree (alpha = r on every layer) merging k adapter trees with `weights`, as
    PEFT's ``add_weighted_adapter(adapters, weights, combination_type=method, density=...,
    majority_sign_method=majority_sign)``. dare_* draw their masks from `key`
    (`dare_keep_masks`; default PRNGKey(0))."""
    check_merge(method, density, majority_sign)
    if len(loras) == 1:
        method = "linear"  # as PEFT: one adapter is only ever scaled
    layers = layers_of(loras, weights)
    keep = None
    if method.startswith("dare"):
        keep = dare_keep_masks(jax.random.PRNGKey(0) if key is None else key, loras, density)
    out = {}
    for path, first in layers[0].items():
        ranks = {int(lay[path]["A"].shape[-1]) for lay in layers}
        if len(ranks) > 1:
            raise UserError(f"adapters of ranks {sorted(ranks)} on {'/'.join(map(str, path))}; "
                            f"{method} merges need one rank")
        r = ranks.pop()
        scales = [w * float(lay[path][ALPHA]) / r
                  for w, lay in zip(weights, layers, strict=True)]
        roots = [float(np.sqrt(abs(s))) for s in scales]
        factors = {"A": [q * (1.0 if s >= 0 else -1.0) for q, s in zip(roots, scales, strict=True)],
                   "B": roots}
        for leaf in ("A", "B"):
            masks = None if keep is None else [k[path][leaf] for k in keep]
            merged = combine_tensors([lay[path][leaf] for lay in layers], factors[leaf], method,
                                     density, majority_sign, masks)
            out[(*path, leaf)] = merged.astype(first[leaf].dtype)
        out[(*path, ALPHA)] = jnp.asarray(float(r), jnp.float32)
    return traverse_util.unflatten_dict(out)


def weighted_sum(loras: Sequence[Mapping], weights: Sequence[float]) -> dict:
    """LoraHub's combination of k adapters (Huang et al. 2023, its ``get_final_weights``): on
    every layer ``A = sum_i w_i A_i`` and ``B = sum_i w_i B_i``, the adapters' common alpha
    kept (weights may be negative; unlike `merge_adapters`, each w_i multiplies both factors)."""
    layers = layers_of(loras, weights)
    out = {}
    for path, first in layers[0].items():
        alphas = {float(lay[path][ALPHA]) for lay in layers}
        if len(alphas) > 1:
            raise UserError(f"adapters with alphas {sorted(alphas)} on "
                            f"{'/'.join(map(str, path))}; LoraHub sums adapters of one alpha")
        for leaf in ("A", "B"):
            stacked = jnp.stack([jnp.asarray(lay[path][leaf], jnp.float32) for lay in layers])
            w = jnp.asarray(weights, jnp.float32).reshape((-1,) + (1,) * (stacked.ndim - 1))
            out[(*path, leaf)] = (stacked * w).sum(0).astype(first[leaf].dtype)
        out[(*path, ALPHA)] = jnp.asarray(first[ALPHA], jnp.float32)
    return traverse_util.unflatten_dict(out)
