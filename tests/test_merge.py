"""Weight-space merges of LoRA adapters against PEFT's own `add_weighted_adapter`."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from lora_jax import lora
from lora_jax.errors import UserError
from lora_jax.merge import dare_keep_masks, merge_adapters
from lora_jax.models.hf_import import load_pretrained
from lora_jax.peft_io import ROOT, encoder_module_map, export_peft
from tests.helpers import torch_base, torch_classifier

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

ALPHAS = (8.0, 16.0, 4.0)  # r = 4: scales 2, 4 and 1
WEIGHTS = (0.5, 1.2, -0.7)  # a negative weight: PEFT puts its sign on A only


@pytest.fixture(scope="module")
def three_adapters(tmp_path_factory):
    """(our config, our three lora trees, a PEFT model holding them as m0, m1, m2)."""
    root = tmp_path_factory.mktemp("merge")
    hf = torch_classifier("bert")
    torch_base(hf).save_pretrained(root / "base")
    pre = load_pretrained(str(root / "base"))
    trees = []
    for i, alpha in enumerate(ALPHAS):
        spec = lora.LoRASpec(r=4, alpha=alpha, targets=("query", "value", "intermediate"))
        tree = lora.init_lora(jax.random.PRNGKey(i), {"encoder": pre.encoder}, spec)
        rng = np.random.default_rng(10 + i)  # B != 0, as after training
        tree = jax.tree_util.tree_map_with_path(
            lambda p, x, rng=rng: x if p[-1].key == "alpha" else x + rng.normal(size=x.shape),
            tree)
        export_peft(str(root / f"m{i}"), tree, spec, pre.config)
        trees.append(jax.tree_util.tree_map(np.asarray, tree))
    pm = peft.PeftModel.from_pretrained(hf, str(root / "m0"), adapter_name="m0")
    for i in (1, 2):
        pm.load_adapter(str(root / f"m{i}"), adapter_name=f"m{i}")
    return pre.config, trees, pm


def lora_layers(pm):
    """{PEFT module name without the root: LoraLayer} of a PEFT model."""
    return {name.removeprefix(ROOT): m for name, m in pm.named_modules()
            if hasattr(m, "lora_A") and "m0" in m.lora_A}


def peft_merge(pm, name, method, density, majority_sign="total"):
    kw = {} if method == "linear" else {"density": density}
    pm.add_weighted_adapter(["m0", "m1", "m2"], list(WEIGHTS), name, combination_type=method,
                            majority_sign_method=majority_sign, **kw)
    return {module: (m.lora_A[name].weight.detach().numpy().T,
                     m.lora_B[name].weight.detach().numpy().T, m.scaling[name])
            for module, m in lora_layers(pm).items()}


def assert_equal_merges(config, ours, theirs):
    paths = encoder_module_map(config)
    assert theirs and {paths[m] for m in theirs} == set(lora.adapter_layers(ours))
    for module, (a, b, scaling) in theirs.items():
        mine = lora.adapter_layers(ours)[paths[module]]
        assert float(mine["alpha"]) / mine["A"].shape[-1] == scaling == 1.0
        np.testing.assert_allclose(np.asarray(mine["A"]), a, atol=1e-5, rtol=0)
        np.testing.assert_allclose(np.asarray(mine["B"]), b, atol=1e-5, rtol=0)


@pytest.mark.parametrize("method,density,majority_sign", [
    ("linear", 1.0, "total"), ("magnitude_prune", 0.4, "total"), ("ties", 0.5, "total"),
    ("ties", 0.5, "frequency"), ("ties", 1.0, "total")])
def test_deterministic_merges_equal_peft_add_weighted_adapter(three_adapters, method, density,
                                                              majority_sign):
    config, trees, pm = three_adapters
    theirs = peft_merge(pm, f"{method}_{int(density * 10)}_{majority_sign}", method, density,
                        majority_sign)
    ours = merge_adapters(trees, WEIGHTS, method, density, majority_sign)
    assert_equal_merges(config, ours, theirs)


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
def test_dare_merges_equal_peft_given_the_same_keep_masks(three_adapters, monkeypatch, method):
    """PEFT draws its DARE masks with torch.bernoulli; hand it ours (by tensor storage) and the
    rest of the merge must agree."""
    from peft.utils import merge_utils

    config, trees, pm = three_adapters
    density, key = 0.6, jax.random.PRNGKey(7)
    masks = dare_keep_masks(key, trees, density)
    paths = encoder_module_map(config)
    by_storage = {}
    for module, layer in lora_layers(pm).items():
        for i in range(3):
            keep = masks[i][paths[module]]
            by_storage[layer.lora_A[f"m{i}"].weight.data_ptr()] = np.asarray(keep["A"]).T
            by_storage[layer.lora_B[f"m{i}"].weight.data_ptr()] = np.asarray(keep["B"]).T
    used = []

    def our_masks(tensor, density, rescale):
        used.append(tensor.data_ptr())
        kept = tensor * torch.from_numpy(by_storage[tensor.data_ptr()].astype(np.float32))
        return kept / density if rescale else kept

    monkeypatch.setattr(merge_utils, "random_pruning", our_masks)
    theirs = peft_merge(pm, method, method, density)
    assert sorted(used) == sorted(by_storage)  # every tensor was pruned by its mask, once
    assert_equal_merges(config, merge_adapters(trees, WEIGHTS, method, density, key=key), theirs)


def test_one_adapter_with_weight_one_keeps_its_delta():
    spec = lora.LoRASpec(r=3, alpha=12.0, targets=("query",))
    params = {"encoder": {"layer_0": {"attention": {"query": {"kernel": np.ones((5, 6))}}}}}
    tree = lora.init_lora(jax.random.PRNGKey(0), params, spec)
    tree = jax.tree_util.tree_map_with_path(
        lambda p, x: x if p[-1].key == "alpha" else x + 0.5, tree)
    merged = merge_adapters([tree], [1.0], "ties", density=0.3)  # one adapter: linear, as PEFT
    before = lora.merge(params, tree)["encoder"]["layer_0"]["attention"]["query"]["kernel"]
    after = lora.merge(params, merged)["encoder"]["layer_0"]["attention"]["query"]["kernel"]
    np.testing.assert_allclose(after, before, rtol=1e-5)


def test_dare_masks_keep_about_density_and_depend_on_the_key(three_adapters):
    _, trees, _ = three_adapters
    a = dare_keep_masks(jax.random.PRNGKey(0), trees, 0.3)
    b = dare_keep_masks(jax.random.PRNGKey(1), trees, 0.3)
    kept = np.concatenate([np.asarray(x).ravel() for x in jax.tree_util.tree_leaves(a)])
    assert abs(kept.mean() - 0.3) < 0.05
    assert any(not np.array_equal(x, y) for x, y in zip(jax.tree_util.tree_leaves(a),
                                                         jax.tree_util.tree_leaves(b),
                                                         strict=True))


@pytest.mark.parametrize("kw,message", [
    ({"method": "average"}, "unknown merge method 'average'"),
    ({"method": "ties", "density": 0.0}, r"density must be in \(0, 1\]"),
    ({"method": "ties", "density": 1.5}, r"density must be in \(0, 1\]"),
    ({"method": "ties", "majority_sign": "most"}, "unknown majority_sign 'most'"),
])
def test_bad_merge_settings_are_named(three_adapters, kw, message):
    _, trees, _ = three_adapters
    with pytest.raises(UserError, match=message):
        merge_adapters(trees, WEIGHTS, **kw)


def test_adapters_on_other_layers_or_ranks_are_refused(three_adapters):
    _, trees, _ = three_adapters
    fewer = jax.tree_util.tree_map(lambda x: x, trees[1])
    fewer["encoder"]["layer_0"].pop("attention")
    with pytest.raises(UserError, match="adapter 1 adapts other layers than adapter 0"):
        merge_adapters([trees[0], fewer], [1, 1])
    wider = jax.tree_util.tree_map_with_path(
        lambda p, x: np.concatenate([x, x], -1 if p[-1].key == "A" else 0)
        if p[-1].key in ("A", "B") else x, trees[1])
    with pytest.raises(UserError, match=r"adapters of ranks \[4, 8\]"):
        merge_adapters([trees[0], wider], [1, 1])
    with pytest.raises(UserError, match="one weight per adapter: 2 adapters, 1 weights"):
        merge_adapters(trees[:2], [1])


def test_lorahub_sum_equals_its_formula_on_the_peft_state_dicts(three_adapters, tmp_path):
    """LoraHub sums the adapters' PEFT state dicts key by key (its get_final_weights); ours,
    exported, must be that sum."""
    from safetensors.numpy import load_file

    from lora_jax.merge import weighted_sum

    config, trees, _ = three_adapters
    same_alpha = [jax.tree_util.tree_map_with_path(
        lambda p, x: np.float32(8.0) if p[-1].key == "alpha" else x, t) for t in trees]
    spec = lora.LoRASpec(r=4, alpha=8.0, targets=("query", "value", "intermediate"))
    dicts = []
    for i, tree in enumerate(same_alpha):
        export_peft(str(tmp_path / f"a{i}"), tree, spec, config)
        dicts.append(load_file(str(tmp_path / f"a{i}" / "adapter_model.safetensors")))
    weights = [0.7, -0.4, 1.3]
    export_peft(str(tmp_path / "sum"), weighted_sum(same_alpha, weights), spec, config)
    ours = load_file(str(tmp_path / "sum" / "adapter_model.safetensors"))
    assert set(ours) == set(dicts[0]) and len(ours) > 4
    for key in dicts[0]:
        np.testing.assert_allclose(ours[key], sum(w * d[key] for w, d in zip(weights, dicts,
                                                                            strict=True)),
                                   atol=1e-5, rtol=0)
    with pytest.raises(UserError, match="alphas \\[4.0, 8.0\\] on .*one alpha"):
        weighted_sum([trees[0], trees[2]], [1, 1])
