"""AdapterFusion over k LoRA modules in every adapted layer (lora_jax.fusion): the one batched
pass against a per-module reference, and its initialisation against the modules' average."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from lora_jax import lora
from lora_jax.fusion import TRAINABLE_PATTERN, init_fusion
from lora_jax.models import Encoder, SequenceClassifier
from lora_jax.models.layers import FUSION_KERNELS, LoRADense
from tests.helpers import TINY, jaxpr_equations, tiny_batch

# three modules of different rank, alpha and targets (the third adapts no value projection)
MODULES = {"m1": dict(r=2, alpha=4.0, targets=("query", "value")),
           "m2": dict(r=4, alpha=16.0, targets=("query", "value")),
           "m3": dict(r=8, alpha=8.0, targets=("query",))}


def _encoder_params() -> dict:
    ids, mask, types = tiny_batch()
    return SequenceClassifier(TINY, 2).init(jax.random.PRNGKey(0), ids, mask, types)[
        "params"]["encoder"]


def _modules(encoder: dict) -> list[dict]:
    """The "lora" trees (encoder level) of MODULES, with B randomised (B = 0 would hide bugs)."""
    out = []
    for seed, spec in enumerate(MODULES.values()):
        tree = lora.init_lora(jax.random.PRNGKey(seed), {"encoder": encoder},
                              lora.LoRASpec(**spec))["encoder"]
        out.append(jax.tree_util.tree_map_with_path(
            lambda p, x, seed=seed: x if p[-1].key == "alpha" else x + 0.3 * jax.random.normal(
                jax.random.PRNGKey(10 + seed), x.shape), tree))
    return out


def _randomised(fused: dict, seed: int = 5) -> dict:
    """The fusion kernels drawn large enough that the module weights are far from uniform."""
    key = iter(jax.random.split(jax.random.PRNGKey(seed), 1000))
    return jax.tree_util.tree_map_with_path(
        lambda p, x: np.asarray(jax.random.normal(next(key), x.shape), np.float32)
        if p[-1].key in FUSION_KERNELS else x, fused)


def _layer_reference(x, kernel, bias, adapters, fused_layer):
    """Straightforward per-module AdapterFusion of one layer: each module's delta from its own
    LoRADense (the adapter alone), then the attention written out in numpy, one module at a
    time. `adapters` holds each module's layer tree ({A, B, alpha}, or None where it does not
    adapt the layer)."""
    dense = LoRADense(kernel.shape[1])
    params = {"kernel": kernel, "bias": bias}
    y = np.asarray(dense.apply({"params": params}, x), np.float64)
    deltas = [np.zeros_like(y) if a is None else
              np.asarray(dense.apply({"params": params, "lora": a}, x), np.float64) - y
              for a in adapters]
    wq, wk, wv = (np.asarray(fused_layer[k], np.float64) for k in FUSION_KERNELS)
    q = y @ wq
    scores = np.stack([(q * (d @ wk)).sum(-1) for d in deltas], -1) / np.sqrt(y.shape[-1])
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    return y + sum(weights[..., i:i + 1] * (d @ wv) for i, d in enumerate(deltas))


@pytest.mark.parametrize("layer", ["layer_0/attention/query", "layer_1/attention/value"])
def test_fused_layer_equals_per_module_reference(layer):
    encoder = _encoder_params()
    modules = _modules(encoder)
    fused = _randomised(init_fusion(modules, list(MODULES), jax.random.PRNGKey(3)))
    path = tuple(layer.split("/"))
    flat_params = traverse_util.flatten_dict(encoder)
    kernel, bias = flat_params[(*path, "kernel")], flat_params[(*path, "bias")]
    fused_layer = fused
    for name in path:
        fused_layer = fused_layer[name]

    def module_layer(tree):
        for name in path:
            tree = tree.get(name)
            if tree is None:
                return None
        return tree

    x = np.asarray(jax.random.normal(jax.random.PRNGKey(9), (3, 5, kernel.shape[0])), np.float32)
    ours = LoRADense(kernel.shape[1]).apply(
        {"params": {"kernel": kernel, "bias": bias}, "lora": fused_layer}, jnp.asarray(x))
    reference = _layer_reference(x, kernel, bias, [module_layer(m) for m in modules], fused_layer)
    np.testing.assert_allclose(np.asarray(ours), reference, atol=1e-5, rtol=1e-5)
    # the module weights are far from uniform, so the attention itself is under test
    _, state = LoRADense(kernel.shape[1]).apply(
        {"params": {"kernel": kernel, "bias": bias}, "lora": fused_layer}, jnp.asarray(x),
        mutable=["intermediates"])
    weights = np.asarray(state["intermediates"]["fusion_weights"][0])
    assert weights.shape == (3, 5, 3) and np.allclose(weights.sum(-1), 1.0, atol=1e-6)
    assert weights.max() > 0.6


def test_fused_layer_never_builds_the_k_projected_deltas():
    """The fused layer works through the modules' rank-R factors: neither its forward nor its
    gradient computes a (..., k, out) array (the k deltas, or their keys or values), which cost
    2 k out^2 per token where the factors cost O(k R out)."""
    encoder = _encoder_params()
    fused_layer = _randomised(init_fusion(_modules(encoder), list(MODULES),
                                          jax.random.PRNGKey(3)))["layer_0"]["attention"]["query"]
    kernel = traverse_util.flatten_dict(encoder)[("layer_0", "attention", "query", "kernel")]
    k, out = fused_layer["A"].shape[0], kernel.shape[1]
    assert fused_layer["A"].shape[2] != k  # rank R and k told apart in the shapes below
    dense = LoRADense(out)
    x = jax.random.normal(jax.random.PRNGKey(9), (3, 5, kernel.shape[0]))

    def loss(lora_layer, x):
        return dense.apply({"params": {"kernel": kernel, "bias": np.zeros(out, np.float32)},
                            "lora": lora_layer}, x).sum()

    shapes = {tuple(v.aval.shape) for eqn, _ in jaxpr_equations(
        jax.make_jaxpr(jax.grad(loss))(fused_layer, x).jaxpr) for v in eqn.outvars}
    assert (3, 5, k, 8) in shapes  # the rank-R factors x A_i are there (R = 8, padded)
    assert not [s for s in shapes if s[-2:] == (k, out)], sorted(shapes)


def test_zero_query_is_the_average_of_the_modules_in_every_layer():
    """With a zero query kernel every module weighs 1/k and the value kernel starts as the
    identity: the whole encoder then equals one adapter made of the k modules side by side
    (A_cat = [A_1 .. A_k], B_cat = [scale_i B_i / k]), in every layer at once."""
    encoder = _encoder_params()
    modules = _modules(encoder)
    fused = init_fusion(modules, list(MODULES), jax.random.PRNGKey(3))
    fused = jax.tree_util.tree_map_with_path(
        lambda p, x: np.zeros_like(x) if p[-1].key == FUSION_KERNELS[0] else x, fused)
    k = len(modules)
    flat = traverse_util.flatten_dict(fused)
    concatenated = {}
    for layer in {path[:-1] for path in flat}:
        a, b, scale = flat[(*layer, "A")], flat[(*layer, "B")], flat[(*layer, "fusion_scale")]
        rank = a.shape[0] * a.shape[2]
        concatenated[(*layer, "A")] = np.concatenate(list(a), axis=1)           # (in, k R)
        concatenated[(*layer, "B")] = np.concatenate(
            [s * bi / k for s, bi in zip(scale, b, strict=True)], axis=0)      # (k R, out)
        concatenated[(*layer, "alpha")] = np.float32(rank)                       # scale 1
    ids, mask, types = tiny_batch()
    model = Encoder(TINY)
    ours = model.apply({"params": encoder, "lora": fused}, ids, mask, types)[0]  # hidden
    average = model.apply({"params": encoder, "lora": traverse_util.unflatten_dict(concatenated)},
                          ids, mask, types)[0]
    base = model.apply({"params": encoder}, ids, mask, types)[0]
    np.testing.assert_allclose(np.asarray(ours), np.asarray(average), atol=1e-5)
    assert np.abs(np.asarray(ours) - np.asarray(base)).max() > 1e-2  # the modules do act


def test_only_the_fusion_kernels_are_trainable_and_get_gradients():
    encoder = _encoder_params()
    fused = init_fusion(_modules(encoder), list(MODULES), jax.random.PRNGKey(3))
    mask = traverse_util.flatten_dict(
        lora.trainable_mask({"lora": fused}, (TRAINABLE_PATTERN,))["lora"])
    assert {path[-1] for path, on in mask.items() if on} == set(FUSION_KERNELS)
    ids, types = tiny_batch()[0], tiny_batch()[2]
    model = Encoder(TINY)
    grads = jax.grad(lambda lo: model.apply({"params": encoder, "lora": lo}, ids,
                                            tiny_batch()[1], types)[0].sum())(fused)
    flat = traverse_util.flatten_dict(grads)
    assert all(np.abs(np.asarray(flat[p])).max() > 0 for p, on in mask.items() if on)


def test_adapters_of_another_base_are_refused_by_name():
    from lora_jax.errors import UserError

    modules = _modules(_encoder_params())
    other = jax.tree_util.tree_map_with_path(
        lambda p, x: x if p[-1].key == "alpha" else np.zeros((x.shape[0] + 1, *x.shape[1:]))
        if p[-1].key == "A" else x, modules[1])
    with pytest.raises(UserError, match="do not fit one base model"):
        init_fusion([modules[0], other], ["m1", "m2"], jax.random.PRNGKey(0))
