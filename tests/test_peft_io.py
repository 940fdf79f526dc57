"""PEFT adapters in and out for BERT, DistilBERT and ELECTRA, against transformers + PEFT.

Each model family, ELECTRA also with embedding_size != hidden_size: an adapter + head made in
PyTorch imports and predicts with PEFT's logits, and ours exported loads in PEFT with ours.
"""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from lora_jax import lora
from lora_jax.errors import UserError
from lora_jax.models import SequenceClassifier
from lora_jax.models.hf_import import load_pretrained, read_state_dict
from lora_jax.peft_io import complete_head, export_peft, import_peft, linear_head_as_hf
from tests.helpers import (
    HF_HEAD_MODULES,
    HF_KINDS,
    HF_TARGETS,
    TINY,
    hf_inputs,
    tiny_model,
    tiny_variables,
    torch_base,
    torch_classifier,
    torch_logits,
)

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")


def _randomise(model, pattern: str, scale: float = 0.5, seed: int = 1):
    """Non-zero values (as after training) for parameters whose name contains `pattern`."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if pattern in name:
                p.copy_(torch.randn(p.shape, generator=gen) * scale)


def _peft_made(kind, tmp_path, **lora_kw):
    """A SEQ_CLS adapter trained (randomised) in PyTorch, the bare base saved beside it."""
    hf = torch_classifier(kind)
    torch_base(hf).save_pretrained(tmp_path / "base")
    cfg = peft.LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=HF_TARGETS[kind],
                          modules_to_save=HF_HEAD_MODULES.get(kind), **lora_kw)
    pm = peft.get_peft_model(hf, cfg)
    _randomise(pm, "lora_B")
    _randomise(pm, "modules_to_save", scale=0.2, seed=2)
    pm.save_pretrained(tmp_path / "adapter")
    return pm


def _flax_logits(base_dir, lora_tree, head, num_labels=3, inputs=None):
    pre = load_pretrained(str(base_dir))
    model = SequenceClassifier(pre.config, num_labels, head="hf")
    variables = {"params": {"encoder": pre.encoder, "head": head}, "lora": lora_tree}
    ids, mask, types = inputs or hf_inputs()
    return np.asarray(model.apply(variables, ids, mask, types))


@pytest.mark.parametrize("kind", HF_KINDS)
def test_peft_made_adapter_and_head_predict_like_peft(kind, tmp_path):
    pm = _peft_made(kind, tmp_path)
    pre = load_pretrained(str(tmp_path / "base"))
    adapter = import_peft(str(tmp_path / "adapter"), pre.config)
    assert (adapter.spec.r, adapter.spec.alpha, adapter.task_type) == (4, 8.0, "SEQ_CLS")
    head = complete_head(adapter.head, pre.head, pre.config.model_type, adapter.source)
    ours = _flax_logits(tmp_path / "base", adapter.lora, head)
    theirs = torch_logits(pm, hf_inputs())
    assert np.abs(theirs).max() > 0.1  # the randomised head and adapters make a difference
    np.testing.assert_allclose(ours, theirs, atol=1e-4)


@pytest.mark.parametrize("kind", HF_KINDS)
def test_adapter_gradients_match_peft_autograd(kind, tmp_path):
    """d(cross-entropy)/d(every lora_A, lora_B) equals PyTorch autograd through PEFT (eval mode).

    The hf head reads [CLS] only, so our encoder computes that position alone in its last layer:
    the gradients of that layer's adapters (the feed-forward ones too) check the cut. PEFT's
    gradients are written into a PEFT adapter of their own and read back with `import_peft`,
    which puts them in our layout."""
    pm = _peft_made(kind, tmp_path)
    ids, mask, types = hf_inputs()
    labels = np.array([0, 2, 1])
    kw = {} if kind == "distilbert" else {"token_type_ids": torch.tensor(types)}
    pm.eval()
    logits = pm(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), **kw).logits
    torch.nn.functional.cross_entropy(logits, torch.tensor(labels), reduction="sum").backward()
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_" in name:
                p.copy_(p.grad)
    pm.save_pretrained(tmp_path / "grads")

    pre = load_pretrained(str(tmp_path / "base"))
    adapter = import_peft(str(tmp_path / "adapter"), pre.config)
    theirs = import_peft(str(tmp_path / "grads"), pre.config).lora
    head = complete_head(adapter.head, pre.head, pre.config.model_type, adapter.source)
    model = SequenceClassifier(pre.config, 3, head="hf")

    def loss(tree):
        out = model.apply({"params": {"encoder": pre.encoder, "head": head}, "lora": tree},
                          ids, mask, types)
        picked = jax.numpy.take_along_axis(jax.nn.log_softmax(out), labels[:, None], axis=1)
        return -picked.sum()

    def matrices(tree):
        return {jax.tree_util.keystr(path): np.asarray(x) for path, x in
                jax.tree_util.tree_leaves_with_path(tree) if path[-1].key in ("A", "B")}

    ours, theirs = matrices(jax.grad(loss)(adapter.lora)), matrices(theirs)
    assert ours.keys() == theirs.keys() and len(ours) >= 4
    last = f"layer_{pre.config.num_layers - 1}"
    assert any(last in name and np.abs(g).max() > 1e-3 for name, g in theirs.items())
    for name, g in theirs.items():
        np.testing.assert_allclose(ours[name], g, rtol=1e-4, atol=1e-6, err_msg=name)


@pytest.mark.parametrize("kind", HF_KINDS)
def test_adapter_and_head_made_here_load_in_peft(kind, tmp_path):
    hf = torch_classifier(kind)
    torch_base(hf).save_pretrained(tmp_path / "base")
    pre = load_pretrained(str(tmp_path / "base"))
    model = SequenceClassifier(pre.config, 3, head="hf")
    ids, mask, types = hf_inputs()
    params = model.init(jax.random.PRNGKey(3), ids, mask, types)["params"]
    spec = lora.LoRASpec(r=4, alpha=16.0, targets=("query", "value", "output"))
    adapters = lora.init_lora(jax.random.PRNGKey(4), {"encoder": pre.encoder}, spec)
    adapters = jax.tree_util.tree_map_with_path(
        lambda p, x: x if p[-1].key == "alpha" else x + 0.3, adapters)
    head = jax.tree_util.tree_map(lambda x: np.asarray(x) + 0.1, params["head"])
    export_peft(str(tmp_path / "ours"), adapters, spec, pre.config, head=head)
    # As a PyTorch user would: the base folder as a classifier (its head random), then ours.
    base = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "base",
                                                                           num_labels=3)
    pm = peft.PeftModel.from_pretrained(base, str(tmp_path / "ours"))
    ours = _flax_logits(tmp_path / "base", adapters, head)
    np.testing.assert_allclose(ours, torch_logits(pm, hf_inputs()), atol=1e-4)


def test_round_trip_is_exact(tmp_path):
    spec = lora.LoRASpec(r=4, alpha=8.0, dropout=0.05, targets=("query", "value", "intermediate"))
    variables = tiny_variables(tiny_model(head="hf"), spec)
    adapters = jax.tree_util.tree_map_with_path(
        lambda path, x: np.asarray(x) + (0 if path[-1].key == "alpha" else
                                         np.random.default_rng(0).normal(size=x.shape)),
        variables["lora"])
    export_peft(str(tmp_path), adapters, spec, TINY, head=variables["params"]["head"])
    back = import_peft(str(tmp_path), TINY)
    assert (back.spec.r, back.spec.alpha, back.spec.dropout) == (4, 8.0, 0.05)
    assert lora.target_modules(variables["params"], back.spec.targets) == lora.target_modules(
        variables["params"], spec.targets)
    for a, b in zip(jax.tree_util.tree_leaves(adapters), jax.tree_util.tree_leaves(back.lora),
                    strict=True):
        np.testing.assert_array_equal(np.asarray(a, np.float32), b)
    np.testing.assert_array_equal(back.head["classifier"]["kernel"],
                                  np.asarray(variables["params"]["head"]["classifier"]["kernel"]))


def test_an_unmapped_tensor_is_refused_by_name(tmp_path):
    from safetensors.numpy import load_file, save_file

    _peft_made("electra", tmp_path)
    path = tmp_path / "adapter" / "adapter_model.safetensors"
    state = load_file(path)
    state["base_model.model.electra.embeddings.word_embeddings.lora_embedding_A"] = np.zeros(
        (4, 120), np.float32)
    save_file(state, path)
    config = load_pretrained(str(tmp_path / "base")).config
    with pytest.raises(UserError, match="lora_embedding_A in .* does not map onto a layer of electra"):
        import_peft(str(tmp_path / "adapter"), config)


@pytest.mark.parametrize("option", [{"use_dora": True}, {"use_rslora": True},
                                    {"rank_pattern": {"query": 2}}])
def test_unsupported_peft_options_are_refused_by_name(option, tmp_path):
    _peft_made("bert", tmp_path, **option)
    with pytest.raises(UserError, match=f"uses {next(iter(option))}"):
        import_peft(str(tmp_path / "adapter"), load_pretrained(str(tmp_path / "base")).config)


def test_a_head_the_adapter_lacks_must_come_from_the_checkpoint(tmp_path):
    from safetensors.numpy import load_file, save_file

    hf = torch_classifier("distilbert")
    hf.save_pretrained(tmp_path / "full")  # a DistilBertForSequenceClassification checkpoint
    _peft_made("distilbert", tmp_path)
    # Older PEFT saved only `classifier` (its SEQ_CLS default), not DistilBERT's pre_classifier.
    path = tmp_path / "adapter" / "adapter_model.safetensors"
    save_file({k: v for k, v in load_file(path).items() if "pre_classifier" not in k}, path)
    pre = load_pretrained(str(tmp_path / "base"))
    adapter = import_peft(str(tmp_path / "adapter"), pre.config)
    with pytest.raises(UserError, match="lacks pre_classifier and the base checkpoint has none"):
        complete_head(adapter.head, pre.head, "distilbert", adapter.source)
    full = load_pretrained(str(tmp_path / "full"))  # this base checkpoint provides it
    head = complete_head(adapter.head, full.head, "distilbert", adapter.source)
    np.testing.assert_array_equal(head["pre_classifier"]["kernel"],
                                  full.head["pre_classifier"]["kernel"])
    np.testing.assert_array_equal(head["classifier"]["kernel"], adapter.head["classifier"]["kernel"])


def test_export_writes_the_adapters_own_alpha_and_refuses_mixed_alphas(tmp_path):
    import dataclasses

    spec = lora.LoRASpec(r=4, alpha=8.0, targets=("query", "value"))
    adapters = tiny_variables(tiny_model(), spec)["lora"]
    export_peft(str(tmp_path / "a"), adapters, dataclasses.replace(spec, alpha=32.0), TINY)
    written = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert written["lora_alpha"] == 8.0  # the adapter's, not the spec's
    back = import_peft(str(tmp_path / "a"), TINY)
    assert {float(a) for a in lora.adapter_alphas(back.lora).values()} == {8.0}
    mixed = jax.tree_util.tree_map(lambda x: x, adapters)
    mixed["encoder"]["layer_0"]["attention"]["query"]["alpha"] = np.float32(16.0)
    with pytest.raises(UserError, match="2 different alphas"):
        export_peft(str(tmp_path / "b"), mixed, spec, TINY)


def test_a_linear_head_exports_only_where_transformers_has_it(tmp_path):
    head = {"kernel": np.ones((16, 3), np.float32), "bias": np.zeros(3, np.float32)}
    assert linear_head_as_hf(head, "pooler", TINY) == {"classifier": head}
    with pytest.raises(UserError, match="'mean' pooling has no transformers equivalent"):
        linear_head_as_hf(head, "mean", TINY)


def _shard(state: dict, folder, weights_name: str, save) -> None:
    """Write `state` as two shards plus the ``<weights_name>.index.json`` transformers writes."""
    names = sorted(state)
    shards = {f"shard-1.{weights_name.split('.')[-1]}": names[: len(names) // 2],
              f"shard-2.{weights_name.split('.')[-1]}": names[len(names) // 2:]}
    weight_map = {}
    for file, keys in shards.items():
        save({k: state[k] for k in keys}, folder / file)
        weight_map.update(dict.fromkeys(keys, file))
    (folder / f"{weights_name}.index.json").write_text(json.dumps({"weight_map": weight_map}))


def test_sharded_safetensors_and_torch_checkpoints_load_like_one_file(tmp_path):
    from safetensors.torch import save_file

    hf = torch_classifier("bert")
    hf.save_pretrained(tmp_path / "one")
    state = {k: v.contiguous() for k, v in hf.state_dict().items()}
    for folder, name, save in (("st", "model.safetensors", save_file),
                               ("pt", "pytorch_model.bin", torch.save)):
        (tmp_path / folder).mkdir()
        hf.config.save_pretrained(tmp_path / folder)
        _shard(state, tmp_path / folder, name, save)
        assert sorted(read_state_dict(str(tmp_path / folder))) == sorted(state)
        one, many = load_pretrained(str(tmp_path / "one")), load_pretrained(str(tmp_path / folder))
        for a, b in zip(jax.tree_util.tree_leaves((one.encoder, one.head)),
                        jax.tree_util.tree_leaves((many.encoder, many.head)), strict=True):
            np.testing.assert_array_equal(a, b)
    (tmp_path / "st" / "shard-2.safetensors").unlink()
    with pytest.raises(UserError, match="names the shard 'shard-2.safetensors'"):
        read_state_dict(str(tmp_path / "st"))


@pytest.mark.parametrize("kind", ["bert", "distilbert", "electra_proj"])
def test_head_hf_run_starts_from_the_checkpoints_head_like_transformers(kind, tmp_path):
    """config.head='hf' on a *ForSequenceClassification checkpoint: the run's model (before any
    training) computes transformers' logits, head included."""
    from configs import zero_shot
    from lora_jax import lora as lora_lib
    from lora_jax.classifier import prepare

    hf = torch_classifier(kind, seed=3)
    hf.save_pretrained(tmp_path / "clf")
    config = zero_shot.get_config()
    config.model, config.head = str(tmp_path / "clf"), "hf"
    config.custom_task.update(name="mine", num_labels=3)
    setup = prepare(config, with_data=False)
    ids, mask, types = hf_inputs()
    ours = setup.model.apply(lora_lib.combine(setup.trainable, setup.frozen), ids, mask, types)
    np.testing.assert_allclose(np.asarray(ours), torch_logits(hf, hf_inputs()), atol=1e-4)
    config.custom_task.num_labels = 2
    with pytest.raises(UserError, match="has 3 outputs but the task has 2 labels"):
        prepare(config, with_data=False)


@pytest.mark.parametrize("kind", ["distilbert", "electra_proj"])
def test_merged_export_of_each_family_loads_in_transformers_with_our_logits(kind, tmp_path):
    """export --format merged for DistilBERT and ELECTRA (BERT: tests/test_predict_export.py):
    adapters folded in, the transformers head, a config.json transformers reads."""
    from configs import ft_lora
    from lora_jax import lora as lora_lib
    from lora_jax.classifier import prepare
    from lora_jax.export import export_classifier
    from lora_jax.inference import ClassifierRun

    torch_classifier(kind, seed=4).save_pretrained(tmp_path / "clf")
    config = ft_lora.get_config()
    config.model, config.head = str(tmp_path / "clf"), "hf"
    config.custom_task.update(name="mine", num_labels=3)
    config.lora.targets = ("query", "value", "intermediate")
    setup = prepare(config, with_data=False)
    variables = lora_lib.combine(setup.trainable, setup.frozen)
    variables["lora"] = jax.tree_util.tree_map_with_path(
        lambda p, x: x if p[-1].key == "alpha" else x + 0.5, variables["lora"])
    run = ClassifierRun(setup.task, setup.model, variables, None, setup.max_length,
                        setup.buckets, setup.pad_id, 8, setup.model_dir, lora_lib.LoRASpec(),
                        "head")
    export_classifier(run, str(tmp_path / "merged"), "merged")
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged")
    ids, mask, types = hf_inputs()
    ours = np.asarray(setup.model.apply(variables, ids, mask, types))
    without_lora = np.asarray(setup.model.apply({"params": variables["params"]}, ids, mask, types))
    assert np.abs(ours - without_lora).max() > 1e-3  # the merged adapters change the logits
    np.testing.assert_allclose(ours, torch_logits(hf, hf_inputs()), atol=1e-4)
