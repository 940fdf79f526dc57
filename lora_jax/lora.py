"""Pure-functional LoRA over Flax parameter trees.

The model's variables are two collections: ``params`` (the pretrained base, frozen) and ``lora``
(the adapters). Nothing here mutates or copies the base tree:

* `init_lora(rng, params, spec)` builds the adapter tree: for every Dense kernel (in, out) whose
  module path matches a target pattern, ``A`` (in, r) ~ U(-1/sqrt(in), 1/sqrt(in)) (PEFT's
  Kaiming-uniform with a=sqrt(5)) and ``B`` (r, out) = 0, so the adapted model starts equal to
  the base.
* `merge(params, lora, alpha)` returns a new params tree with ``W0 + (alpha / r) A B`` folded in
  (for export/serving); untouched subtrees are shared, not copied.
* `trainable_mask` / `split` / `combine` partition ``{"params", "lora"}`` into the trainable and
  frozen parts by path patterns; the train step differentiates w.r.t. the trainable part only.
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

# Dense layers that consume an adapter (`LoRADense`); paths are relative to the params root.
# Encoders: layer_i/attention/{query,key,value,output}, layer_i/{intermediate,output};
# T5: blocks_i/{self,cross}_attention/{q,k,v,o}, blocks_i/mlp/{wi,wi_0,wi_1,wo}.
LORA_CAPABLE = re.compile(
    r"(^|/)layer_\d+/(attention/(query|key|value|output)|intermediate|output)$"
    r"|(^|/)blocks_\d+/((self|cross)_attention/[qkvo]|mlp/(wi|wi_0|wi_1|wo))$")


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
    capable = [m for m in modules if LORA_CAPABLE.search(m)]
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
    """The adapter tree for `params` (nested like it): {..module..: {"A": (in, r), "B": (r, out)}}."""
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
    return traverse_util.unflatten_dict(out)


def merge(params: Mapping, lora: Mapping, alpha: float) -> dict:
    """Base params with every adapter folded in: kernel + (alpha / r) * A @ B."""
    merged = traverse_util.flatten_dict(params)
    for path, leaves in _adapters(lora).items():
        a, b = leaves["A"], leaves["B"]
        kernel = merged[(*path, "kernel")]
        delta = (alpha / a.shape[-1]) * (a.astype(jnp.float32) @ b.astype(jnp.float32))
        merged[(*path, "kernel")] = (kernel.astype(jnp.float32) + delta).astype(kernel.dtype)
    return traverse_util.unflatten_dict(merged)


def _adapters(lora: Mapping) -> dict[tuple, dict]:
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


def combine(*trees: Mapping) -> dict:
    """Inverse of `split`: the union of disjoint nested dicts."""
    flat = {}
    for tree in trees:
        flat.update(traverse_util.flatten_dict(tree))
    return traverse_util.unflatten_dict(flat)


def weight_decay_mask(tree: Mapping) -> dict:
    """True for matrices (kernels, embeddings, LoRA A/B); False for biases and LayerNorm scales."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: getattr(path[-1], "key", None) not in ("bias", "scale"), tree)


def count_params(tree) -> int:
    return sum(int(x.size) for x in jax.tree_util.tree_leaves(tree))
