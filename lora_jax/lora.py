"""Pure-functional LoRA over Flax parameter trees.

The model's variables are two collections: ``params`` (the pretrained base, frozen) and ``lora``
(the adapters). Nothing here mutates or copies the base tree:

* `init_lora(rng, params, spec)` builds the adapter tree: for every Dense kernel (in, out) whose
  module path matches a target pattern, ``A`` (in, r) ~ U(-1/sqrt(in), 1/sqrt(in)) (PEFT's
  Kaiming-uniform with a=sqrt(5)), ``B`` (r, out) = 0, so the adapted model starts equal to the
  base, and ``alpha`` (a float32 scalar): every adapter carries its own scale numerator.
* `merge(params, lora)` returns a new params tree with ``W0 + (alpha / r) A B`` folded in (for
  export/serving); untouched subtrees are shared, not copied.
* `trainable_mask` / `split` / `combine` partition ``{"params", "lora"}`` into the trainable and
  frozen parts by path patterns; the train step differentiates w.r.t. the trainable part only.
  ``alpha`` leaves travel with the trainable adapter (checkpoints and exports keep them) but are
  hyper-parameters: `optimizer_labels` marks them ``"frozen"`` for ``optax.multi_transform``.

Which Dense layers can take an adapter is a registry that each model family fills in
(`register_adaptable`), so this module names no model.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Iterable, Mapping

import jax
import jax.numpy as jnp
from flax import traverse_util

from lora_jax.errors import UserError

ALPHA = "alpha"  # the adapter leaf that holds its scale numerator (not a parameter)
_ADAPTABLE: dict[str, re.Pattern] = {}


def register_adaptable(family: str, pattern: str) -> None:
    """Declare the module paths (a regex searched in "encoder/layer_0/attention/query") of a model
    family whose Dense kernels can take an adapter. Called once by each model module."""
    _ADAPTABLE[family] = re.compile(pattern)


def is_adaptable(module_path: str) -> bool:
    return any(rx.search(module_path) for rx in _ADAPTABLE.values())


@dataclasses.dataclass(frozen=True)
class LoRASpec:
    """LoRA hyper-parameters.

    targets: regular expressions matched against the end of a module path such as
      ``encoder/layer_3/attention/query`` (``"query"`` matches every query projection; the
      names are the same for BERT, DistilBERT and ELECTRA). T5 uses PEFT's names: ``"q"``,
      ``"v"`` match the projections of encoder self, decoder self and cross attention.
    """

    r: int = 4
    alpha: float = 32.0
    dropout: float = 0.1
    targets: tuple[str, ...] = ("query", "key", "value")

    def __post_init__(self):
        if self.r < 1:
            raise UserError(f"lora.r must be a positive integer, got {self.r}")
        if not 0.0 <= self.dropout < 1.0:
            raise UserError(f"lora.dropout must be in [0, 1), got {self.dropout}")
        if not (isinstance(self.alpha, (int, float)) and math.isfinite(self.alpha)
                and self.alpha > 0):
            raise UserError(f"lora.alpha must be a positive number, got {self.alpha!r}")

    @property
    def scale(self) -> float:
        return self.alpha / self.r


def _path_str(path: Iterable) -> str:
    return "/".join(str(p) for p in path)


def target_modules(params: Mapping, targets: Iterable[str]) -> list[str]:
    """Module paths ("encoder/layer_0/attention/query") of the kernels the targets select.

    Raises UserError when a pattern selects nothing, listing the candidates.
    """
    flat = traverse_util.flatten_dict(params)
    modules = sorted({_path_str(p[:-1]) for p in flat if p[-1] == "kernel"})
    capable = [m for m in modules if is_adaptable(m)]
    chosen = set()
    for pattern in targets:
        rx = re.compile(rf"(^|/)(?:{pattern})$")
        hits = [m for m in capable if rx.search(m)]
        if not hits:
            names = sorted({m.split("/", 2)[-1] for m in capable})
            raise UserError(f"LoRA target {pattern!r} matches no adaptable layer; use names such "
                            f"as {', '.join(names)}")
        chosen.update(hits)
    return sorted(chosen)


def init_lora(rng: jax.Array, params: Mapping, spec: LoRASpec) -> dict:
    """The adapter tree for `params` (nested like it):
    {..module..: {"A": (in, r), "B": (r, out), "alpha": () float32}}."""
    flat = traverse_util.flatten_dict(params)
    modules = target_modules(params, spec.targets)
    rngs = jax.random.split(rng, len(modules))
    out = {}
    for key, module in zip(rngs, modules, strict=True):
        path = tuple(module.split("/"))
        fan_in, fan_out = flat[(*path, "kernel")].shape
        bound = 1.0 / math.sqrt(fan_in)
        out[(*path, "A")] = jax.random.uniform(key, (fan_in, spec.r), jnp.float32, -bound, bound)
        out[(*path, "B")] = jnp.zeros((spec.r, fan_out), jnp.float32)
        out[(*path, ALPHA)] = jnp.asarray(spec.alpha, jnp.float32)
    return traverse_util.unflatten_dict(out)


def merge(params: Mapping, lora: Mapping) -> dict:
    """Base params with every adapter folded in: kernel + (alpha / r) * A @ B, each adapter with
    its own alpha."""
    merged = traverse_util.flatten_dict(params)
    for path, leaves in adapter_layers(lora).items():
        a, b = leaves["A"], leaves["B"]
        kernel = merged[(*path, "kernel")]
        delta = (leaves[ALPHA] / a.shape[-1]) * (a.astype(jnp.float32) @ b.astype(jnp.float32))
        merged[(*path, "kernel")] = (kernel.astype(jnp.float32) + delta).astype(kernel.dtype)
    return traverse_util.unflatten_dict(merged)


def adapter_layers(lora: Mapping) -> dict[tuple, dict]:
    """{layer path: {"A": (in, r), "B": (r, out), "alpha": ()}} of a ``lora`` tree."""
    flat = traverse_util.flatten_dict(lora)
    grouped: dict[tuple, dict] = {}
    for path, leaf in flat.items():
        grouped.setdefault(path[:-1], {})[path[-1]] = leaf
    return grouped


def trainable_mask(variables: Mapping, patterns: Iterable[str]) -> dict:
    """Bool tree like `variables`: True where the "/"-joined path matches any regex pattern.

    Paths start with the collection: ``lora/encoder/...``, ``params/head/kernel``.
    """
    rxs = [re.compile(p) for p in patterns]
    flat = traverse_util.flatten_dict(variables)
    return traverse_util.unflatten_dict(
        {p: any(rx.search(_path_str(p)) for rx in rxs) for p in flat})


def split(variables: Mapping, mask: Mapping) -> tuple[dict, dict]:
    """(trainable, frozen): two disjoint nested dicts holding the leaves where mask is True/False."""
    flat = traverse_util.flatten_dict(variables)
    flat_mask = traverse_util.flatten_dict(mask)
    trainable = {p: v for p, v in flat.items() if flat_mask[p]}
    frozen = {p: v for p, v in flat.items() if not flat_mask[p]}
    return traverse_util.unflatten_dict(trainable), traverse_util.unflatten_dict(frozen)


# the dtype names of ``config.dtype`` (compute) and ``config.param_dtype`` (frozen storage)
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def cast_floating(tree, dtype) -> dict:
    """`tree` with every floating-point leaf cast to `dtype` (integer leaves untouched)."""
    return jax.tree_util.tree_map(
        lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def frozen_in_dtype(frozen: Mapping, dtype) -> dict:
    """The frozen tree with its pretrained weights (the ``params`` collection) stored in
    `dtype` (``param_dtype=bfloat16``: half the memory); other collections untouched."""
    return {k: cast_floating(v, dtype) if k == "params" else v for k, v in frozen.items()}


def combine(*trees: Mapping) -> dict:
    """Inverse of `split`: the union of disjoint nested dicts."""
    flat = {}
    for tree in trees:
        flat.update(traverse_util.flatten_dict(tree))
    return traverse_util.unflatten_dict(flat)


def adapter_alphas(lora: Mapping) -> dict[str, float]:
    """{module path: alpha} of every adapter in a ``lora`` tree (for export and reports)."""
    return {"/".join(map(str, path)): float(leaves[ALPHA])
            for path, leaves in adapter_layers(lora).items()}


def _leaf_name(path) -> str | None:
    return getattr(path[-1], "key", None)


def optimizer_labels(tree: Mapping) -> dict:
    """"frozen" for hyper-parameter leaves (adapter ``alpha``), "trainable" for the rest: the
    labels of ``optax.multi_transform`` that keeps alpha out of every update."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: "frozen" if _leaf_name(path) == ALPHA else "trainable", tree)


def weight_decay_mask(tree: Mapping) -> dict:
    """True for matrices (kernels, embeddings, LoRA A/B); False for biases and LayerNorm scales."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: _leaf_name(path) not in ("bias", "scale", ALPHA), tree)


def count_params(tree) -> int:
    """Number of parameters in `tree` (adapter ``alpha`` leaves are settings, not counted)."""
    leaves = jax.tree_util.tree_leaves_with_path(tree)
    return sum(int(x.size) for path, x in leaves if _leaf_name(path) != ALPHA)
