"""LoRA invariants: B = 0 is the base, merged equals unmerged, frozen leaves never move,
the trainable count equals PEFT's, and bad targets are refused."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util

from lora_jax import lora
from lora_jax.classifier import make_loss_fn
from lora_jax.errors import UserError
from lora_jax.trainer import make_train_step
from tests.helpers import TINY, tiny_batch, tiny_model, tiny_variables

SPEC = lora.LoRASpec(r=4, alpha=8.0, dropout=0.0, targets=("query", "key", "value"))


def _randomise_b(adapters, seed=3):
    leaves, tree = jax.tree_util.tree_flatten_with_path(adapters)
    keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
    return jax.tree_util.tree_unflatten(tree, [
        jax.random.normal(k, x.shape) * 0.5 if path[-1].key == "B" else x
        for k, (path, x) in zip(keys, leaves, strict=True)])


def test_init_shapes_and_distribution():
    model = tiny_model()
    variables = tiny_variables(model, SPEC)
    flat = traverse_util.flatten_dict(variables["lora"])
    assert len(flat) == 3 * 3 * TINY.num_layers  # A, B and alpha per adapted kernel
    assert {float(v) for p, v in flat.items() if p[-1] == "alpha"} == {SPEC.alpha}
    a = flat[("encoder", "layer_0", "attention", "query", "A")]
    b = flat[("encoder", "layer_0", "attention", "query", "B")]
    assert a.shape == (16, 4) and b.shape == (4, 16)
    assert np.all(np.asarray(b) == 0)
    bound = 1 / np.sqrt(16)  # PEFT: kaiming_uniform(a=sqrt(5)) -> U(-1/sqrt(in), 1/sqrt(in))
    assert np.abs(np.asarray(a)).max() <= bound and np.abs(np.asarray(a)).max() > 0.5 * bound


def test_zero_b_gives_exactly_the_base_output():
    model = tiny_model()
    variables = tiny_variables(model, SPEC)
    ids, mask, types = tiny_batch()
    base = model.apply({"params": variables["params"]}, ids, mask, types)
    adapted = model.apply(variables, ids, mask, types)
    np.testing.assert_array_equal(np.asarray(adapted), np.asarray(base))


def test_adapter_changes_output_and_merge_equals_unmerged():
    model = tiny_model()
    variables = tiny_variables(model, SPEC)
    variables["lora"] = _randomise_b(variables["lora"])
    ids, mask, types = tiny_batch()
    base = model.apply({"params": variables["params"]}, ids, mask, types)
    unmerged = model.apply(variables, ids, mask, types)
    assert np.abs(np.asarray(unmerged - base)).max() > 1e-3
    merged_params = lora.merge(variables["params"], variables["lora"])
    merged = model.apply({"params": merged_params}, ids, mask, types)
    np.testing.assert_allclose(np.asarray(merged), np.asarray(unmerged), atol=1e-5)
    # merge returns a new tree: the base kernels are untouched
    k0 = variables["params"]["encoder"]["layer_0"]["attention"]["query"]["kernel"]
    k1 = merged_params["encoder"]["layer_0"]["attention"]["query"]["kernel"]
    assert not np.array_equal(np.asarray(k0), np.asarray(k1))


def test_lora_dropout_only_in_training_mode():
    # every other dropout off, so a difference can only come from the LoRA dropout
    quiet = dataclasses.replace(TINY, hidden_dropout=0.0, attention_dropout=0.0)
    spec = lora.LoRASpec(r=4, alpha=8.0, dropout=0.5, targets=("query",))
    variables = tiny_variables(tiny_model(quiet), spec)
    variables["lora"] = _randomise_b(variables["lora"])
    ids, mask, types = tiny_batch()
    rngs = {"dropout": jax.random.PRNGKey(1)}
    for rate in (0.5, 0.0):
        m = tiny_model(quiet, lora_dropout=rate, classifier_dropout=0.0)
        eval1 = m.apply(variables, ids, mask, types, deterministic=True)
        eval2 = m.apply(variables, ids, mask, types, deterministic=True)
        np.testing.assert_array_equal(np.asarray(eval1), np.asarray(eval2))
        train = m.apply(variables, ids, mask, types, deterministic=False, rngs=rngs)
        if rate:
            assert not np.allclose(np.asarray(train), np.asarray(eval1))
        else:  # no LoRA dropout: training mode is the eval forward exactly
            np.testing.assert_allclose(np.asarray(train), np.asarray(eval1), atol=1e-6)


def test_training_updates_only_trainable_and_frozen_is_bit_identical():
    model = tiny_model()
    variables = tiny_variables(model, SPEC)
    mask = lora.trainable_mask(variables, ("^lora/", "^params/head/"))
    trainable, frozen = lora.split(variables, mask)
    assert set(trainable) == {"lora", "params"} and set(trainable["params"]) == {"head"}
    frozen_before = jax.tree_util.tree_map(np.array, frozen)
    trainable_before = jax.tree_util.tree_map(np.array, trainable)
    tx = optax.multi_transform(
        {"trainable": optax.adamw(1e-2, weight_decay=0.1, mask=lora.weight_decay_mask),
         "frozen": optax.set_to_zero()}, lora.optimizer_labels)
    opt_state = tx.init(trainable)
    step_fn = jax.jit(make_train_step(make_loss_fn(model, False), tx, jax.random.PRNGKey(0)))
    ids, amask, types = tiny_batch()
    batch = dict(input_ids=ids, attention_mask=amask, token_type_ids=types,
                 labels=jnp.array([0, 1, 2, 1]), weights=jnp.ones(4))
    for step in range(5):
        trainable, opt_state, metrics = step_fn(trainable, opt_state, step, frozen, batch)
    assert np.isfinite(float(metrics["train/loss"]))
    for a, b in zip(jax.tree_util.tree_leaves(frozen_before), jax.tree_util.tree_leaves(frozen),
                    strict=True):
        np.testing.assert_array_equal(a, np.asarray(b))
    before = traverse_util.flatten_dict(trainable_before)
    after = traverse_util.flatten_dict(jax.device_get(trainable))
    moved = {path: not np.array_equal(before[path], after[path]) for path in before}
    alphas = [path for path in moved if path[-1] == "alpha"]
    assert len(alphas) == 2 * 3 and not any(moved[p] for p in alphas)  # alpha is a setting
    assert all(v for p, v in moved.items() if p[-1] != "alpha")  # every A, B and the head moved
    full = lora.combine(trainable, frozen)
    assert jax.tree_util.tree_structure(full) == jax.tree_util.tree_structure(variables)


def test_split_combine_round_trip():
    variables = tiny_variables(tiny_model(), SPEC)
    mask = lora.trainable_mask(variables, ("^lora/",))
    t, f = lora.split(variables, mask)
    assert lora.count_params(t) + lora.count_params(f) == lora.count_params(variables)
    back = lora.combine(t, f)
    for a, b in zip(jax.tree_util.tree_leaves(back), jax.tree_util.tree_leaves(variables),
                    strict=True):
        assert a is b  # no copies


def test_weight_decay_mask_skips_biases_and_norms():
    variables = tiny_variables(tiny_model(), SPEC)
    flat = traverse_util.flatten_dict(lora.weight_decay_mask(variables))
    assert flat[("params", "head", "kernel")] and not flat[("params", "head", "bias")]
    assert not flat[("params", "encoder", "layer_0", "output_norm", "scale")]
    assert flat[("lora", "encoder", "layer_0", "attention", "query", "A")]


def test_bad_target_is_a_clear_error():
    params = tiny_variables(tiny_model(), SPEC)["params"]
    with pytest.raises(UserError, match="matches no adaptable layer"):
        lora.init_lora(jax.random.PRNGKey(0), params, lora.LoRASpec(targets=("q_proj",)))
    with pytest.raises(UserError, match="positive"):
        lora.LoRASpec(r=0)


def test_targets_match_path_suffixes():
    params = tiny_variables(tiny_model(), SPEC)["params"]
    all_outputs = lora.target_modules(params, ("output",))
    assert "encoder/layer_0/attention/output" in all_outputs
    assert "encoder/layer_0/output" in all_outputs
    assert lora.target_modules(params, ("layer_1/attention/(query|value)",)) == [
        "encoder/layer_1/attention/query", "encoder/layer_1/attention/value"]


def test_trainable_count_equals_peft():
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    hf = transformers.BertForSequenceClassification(transformers.BertConfig(
        vocab_size=120, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
        intermediate_size=48, num_labels=2))
    peft_model = peft.get_peft_model(hf, peft.LoraConfig(
        task_type="SEQ_CLS", r=4, lora_alpha=32, lora_dropout=0.1,
        target_modules=["query", "key", "value"]))
    peft_trainable, _ = peft_model.get_nb_trainable_parameters()

    from lora_jax.models import EncoderConfig

    cfg = EncoderConfig(vocab_size=120, hidden_size=32, num_layers=3, num_heads=4,
                        intermediate_size=48, embedding_size=32)
    model = tiny_model(cfg, num_labels=2)
    variables = tiny_variables(model, lora.LoRASpec(r=4, alpha=32, dropout=0.1))
    trainable, _ = lora.split(variables, lora.trainable_mask(variables, ("^lora/", "^params/head/")))
    assert lora.count_params(trainable) == peft_trainable
