"""Per-row adapter routing: n adapters on one frozen base, each batch row through its own.

    bank = stack_adapters([lora_1, ..., lora_n], names)   # one tree, leading axis n
    lora = route(bank, index)       # index (B,) int32: row b takes adapter index[b]; BASE = none
    model.apply({"params": base, "lora": lora}, ...)

Every adapted `LoRADense` then computes ``x_b W0 + bias + scale_b * (x_b A_b) B_b``: the base
GEMM once for the whole batch, the low-rank part as two batched einsums over the rows with A/B
gathered per row (no loop over adapters, no sub-batches), all under one jit. This is the
gathered low-rank product of Punica / S-LoRA, written as XLA gathers and batched dots.

A bank holds, per adapted layer, ``A`` (n, in, R), ``B`` (n, R, out) and ``scale`` (n,):
adapters of rank r_i < R are zero-padded to R (the padded products are exact zeros), each keeps
its own ``alpha_i / r_i``, and a layer an adapter does not adapt gets zeros with scale 0.
Classification heads stack the same way (`stack_heads`: the output axis zero-padded to the
widest head) and are gathered per row with `gather_rows`, as are T5 soft prompts
(`stack_prompts`, left-padded); `repeat_routed` lays the rows out for beam search.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from lora_jax.errors import UserError
from lora_jax.lora import ALPHA, adapter_layers
from lora_jax.models.layers import LORA_COLLECTION, ROUTED_SCALE

BASE = -1  # the adapter index of a row that runs the base model alone


def _path(path: tuple) -> str:
    return "/".join(map(str, path))


def stack_adapters(trees: Sequence[Mapping], names: Sequence[str]) -> dict:
    """One bank of n "lora" trees (`lora_jax.lora.init_lora` layout, each leaf A (in, r_i),
    B (r_i, out), alpha ()): {layer: {"A": (n, in, R), "B": (n, R, out), "scale": (n,)}}
    float32 over the union of the adapters' layers, R the largest rank.

    Raises UserError naming the layer and both adapters when two adapters disagree on a
    layer's input or output width (adapters made for different base models).
    """
    if len(trees) != len(names) or not trees:
        raise ValueError(f"stack_adapters needs one name per adapter, got {len(trees)} trees "
                         f"and {len(names)} names")
    per_adapter = [adapter_layers(tree) for tree in trees]
    layers = sorted({path for layers in per_adapter for path in layers})
    rank = max(leaves["A"].shape[-1] for layers in per_adapter for leaves in layers.values())
    bank = {}
    for path in layers:
        widths = {name: (layers[path]["A"].shape[0], layers[path]["B"].shape[-1])
                  for name, layers in zip(names, per_adapter, strict=True) if path in layers}
        if len(set(widths.values())) > 1:
            (first, w1), *rest = widths.items()
            other, w2 = next((name, w) for name, w in rest if w != w1)
            raise UserError(f"adapters {first!r} and {other!r} do not fit one base model: "
                            f"layer {_path(path)} maps {w1[0]} -> {w1[1]} features in "
                            f"{first!r} and {w2[0]} -> {w2[1]} in {other!r}")
        fan_in, fan_out = next(iter(widths.values()))
        a = np.zeros((len(trees), fan_in, rank), np.float32)
        b = np.zeros((len(trees), rank, fan_out), np.float32)
        scale = np.zeros((len(trees),), np.float32)
        for i, layers in enumerate(per_adapter):
            if path not in layers:
                continue
            leaves = layers[path]
            r = leaves["A"].shape[-1]
            a[i, :, :r], b[i, :r] = np.asarray(leaves["A"]), np.asarray(leaves["B"])
            # alpha / r in float32, as LoRADense computes it for the adapter alone
            scale[i] = np.float32(leaves[ALPHA]) / np.float32(r)
        bank[(*path, "A")], bank[(*path, "B")], bank[(*path, ROUTED_SCALE)] = a, b, scale
    return traverse_util.unflatten_dict(bank)


def check_index(index: np.ndarray, n: int) -> np.ndarray:
    """`index` as int32, after checking every entry is BASE or in [0, n)."""
    index = np.asarray(index)
    if not np.issubdtype(index.dtype, np.integer):
        raise ValueError(f"adapter indices must be integers, got {index.dtype}")
    bad = (index < BASE) | (index >= n)
    if bad.any():
        raise ValueError(f"adapter index {int(index[bad][0])} is out of range for {n} adapters "
                         f"(use 0..{n - 1}, or {BASE} for the base model)")
    return index.astype(np.int32)


def gather_rows(stacked, index: jax.Array):
    """Every leaf of a stacked tree (n, ...) gathered to the batch rows (B, ...): row b gets
    entry index[b] (BASE rows get entry 0; `route` zeroes their scale)."""
    rows = jnp.maximum(jnp.asarray(index, jnp.int32), 0)
    return jax.tree_util.tree_map(lambda x: jnp.take(x, rows, axis=0), stacked)


def route(bank: Mapping, index: jax.Array) -> dict:
    """The per-row "lora" tree of a batch: each row's adapter from `bank` (`stack_adapters`),
    A (B, in, R), B (B, R, out), scale (B,); a BASE row gets scale 0 (the base model exactly).
    Concrete (numpy) indices are range-checked; traced ones must be valid."""
    if not isinstance(index, jax.core.Tracer):
        n = jax.tree_util.tree_leaves(bank)[0].shape[0]
        index = check_index(index, n)
    routed = gather_rows(bank, index)
    is_adapter = jnp.asarray(index) >= 0

    def zero_base_rows(path, leaf):
        if getattr(path[-1], "key", None) == ROUTED_SCALE:
            return jnp.where(is_adapter, leaf, 0.0)
        return leaf

    return jax.tree_util.tree_map_with_path(zero_base_rows, routed)


def is_routed(lora: Mapping) -> bool:
    """Whether a "lora" tree holds per-row adapters (`route`) rather than one adapter."""
    return any(getattr(path[-1], "key", None) == ROUTED_SCALE
               for path, _ in jax.tree_util.tree_leaves_with_path(lora))


def repeat_routed(variables: Mapping, times: int) -> dict:
    """`variables` for a batch whose every row is repeated `times` times in place (row b ->
    rows b * times ... b * times + times - 1, as beam search lays out its beams): a routed
    "lora" collection repeated with its rows; anything else unchanged."""
    lora = variables.get(LORA_COLLECTION)
    if lora is None or not is_routed(lora):
        return dict(variables)
    return {**variables, LORA_COLLECTION: jax.tree_util.tree_map(
        lambda x: jnp.repeat(x, times, axis=0), lora)}


def stack_prompts(prompts: Sequence[np.ndarray | None], width: int) -> dict:
    """n soft prompts (P_i, width), None for an adapter without one, as one stacked "prompt"
    collection: {"embedding": (n, P, width), "mask": (n, P)}, P the longest, each prompt
    left-padded with mask-0 slots, so its tokens keep their distances to the input (T5's
    relative positions) and the padded slots are never attended to."""
    longest = max([0, *(len(p) for p in prompts if p is not None)])
    embedding = np.zeros((len(prompts), longest, width), np.float32)
    mask = np.zeros((len(prompts), longest), np.int32)
    for i, prompt in enumerate(prompts):
        if prompt is not None and len(prompt):
            embedding[i, longest - len(prompt):] = np.asarray(prompt, np.float32)
            mask[i, longest - len(prompt):] = 1
    return {"embedding": embedding, "mask": mask}


def stack_heads(heads: Sequence[Mapping], names: Sequence[str]) -> dict:
    """n head parameter trees of one structure stacked to (n, ...), the last axis of every
    leaf zero-padded to its widest (heads with different label counts: the padded logits
    are 0 and each row keeps its own head's first C_i). Other axes must agree."""
    structures = {name: jax.tree_util.tree_structure(h) for name, h in zip(names, heads,
                                                                             strict=True)}
    first = names[0]
    for name, structure in structures.items():
        if structure != structures[first]:
            raise UserError(f"the heads of adapters {first!r} and {name!r} differ in kind "
                            f"({structures[first]} vs {structure}); route them in two banks")
    flat = [traverse_util.flatten_dict(h) for h in heads]
    stacked = {}
    for key in flat[0]:
        leaves = [np.asarray(f[key], np.float32) for f in flat]
        lead = {leaf.shape[:-1] for leaf in leaves}
        if len(lead) > 1:
            raise UserError(f"head leaf {_path(key)} has shapes "
                            f"{', '.join(str(x.shape) for x in leaves)} across adapters "
                            f"{', '.join(names)}: heads for different base models")
        width = max(leaf.shape[-1] for leaf in leaves)
        stacked[key] = np.stack([np.pad(leaf, [(0, 0)] * (leaf.ndim - 1)
                                        + [(0, width - leaf.shape[-1])]) for leaf in leaves])
    return traverse_util.unflatten_dict(stacked)
