"""PEFT adapter round trips, and parity with transformers + PEFT on the same adapter."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from lora_jax import lora
from lora_jax.errors import UserError
from lora_jax.models.hf_import import load_pretrained
from lora_jax.peft_io import export_peft, import_peft
from tests.helpers import TINY, tiny_batch, tiny_model, tiny_variables

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")


def test_round_trip_is_exact(tmp_path):
    spec = lora.LoRASpec(r=4, alpha=8.0, dropout=0.05, targets=("query", "value", "intermediate"))
    variables = tiny_variables(tiny_model(), spec)
    adapters = jax.tree_util.tree_map_with_path(
        lambda path, x: np.asarray(x) + (0 if path[-1].key == "alpha" else
                                         np.random.default_rng(0).normal(size=x.shape)),
        variables["lora"])
    export_peft(str(tmp_path), adapters, spec, TINY, head=variables["params"]["head"])
    back, spec2, head = import_peft(str(tmp_path), TINY)
    assert (spec2.r, spec2.alpha, spec2.dropout) == (4, 8.0, 0.05)
    assert lora.target_modules(variables["params"], spec2.targets) == lora.target_modules(
        variables["params"], spec.targets)
    for a, b in zip(jax.tree_util.tree_leaves(adapters), jax.tree_util.tree_leaves(back),
                    strict=True):
        np.testing.assert_array_equal(np.asarray(a, np.float32), b)
    np.testing.assert_array_equal(head["kernel"], np.asarray(variables["params"]["head"]["kernel"]))


def _hf_classifier(tmp_path):
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(transformers.BertConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=32, num_labels=3))
    model.bert.save_pretrained(tmp_path / "base")
    return model


def _ours(tmp_path, adapters, spec, head):
    _, cfg, encoder, _ = load_pretrained(str(tmp_path / "base"))
    model = tiny_model(cfg, num_labels=3, pooling="pooler")
    variables = {"params": {"encoder": encoder, "head": head}, "lora": adapters}
    ids, mask, types = tiny_batch()
    return np.asarray(model.apply(variables, ids, mask, types)), (ids, mask, types)


def _torch_logits(model, inputs):
    ids, mask, types = (torch.tensor(np.asarray(x), dtype=torch.long) for x in inputs)
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, token_type_ids=types).logits.numpy()


def test_peft_trained_adapter_runs_identically_in_flax(tmp_path):
    hf = _hf_classifier(tmp_path)
    pm = peft.get_peft_model(hf, peft.LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8,
                                                 target_modules=["query", "key", "value"]))
    with torch.no_grad():  # non-zero B, as after training
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    pm.save_pretrained(tmp_path / "adapter")
    adapters, spec, head = import_peft(str(tmp_path / "adapter"), load_pretrained(
        str(tmp_path / "base"))[1])
    ours, inputs = _ours(tmp_path, adapters, spec, head)
    np.testing.assert_allclose(ours, _torch_logits(pm, inputs), atol=1e-4)


def test_flax_adapter_loads_in_peft(tmp_path):
    hf = _hf_classifier(tmp_path)
    _, cfg, encoder, _ = load_pretrained(str(tmp_path / "base"))
    spec = lora.LoRASpec(r=4, alpha=8.0, targets=("query", "value", "output"))
    adapters = lora.init_lora(jax.random.PRNGKey(0), {"encoder": encoder}, spec)
    adapters = jax.tree_util.tree_map(lambda x: x + 0.3, adapters)
    head = {"kernel": np.random.default_rng(1).normal(size=(16, 3)).astype(np.float32),
            "bias": np.ones(3, np.float32)}
    export_peft(str(tmp_path / "ours"), adapters, spec, cfg, head=head)
    pm = peft.PeftModel.from_pretrained(hf, str(tmp_path / "ours"))
    ours, inputs = _ours(tmp_path, adapters, spec, head)
    np.testing.assert_allclose(ours, _torch_logits(pm, inputs), atol=1e-4)


def test_export_writes_the_adapters_own_alpha_and_refuses_mixed_alphas(tmp_path):
    import dataclasses
    import json

    spec = lora.LoRASpec(r=4, alpha=8.0, targets=("query", "value"))
    adapters = tiny_variables(tiny_model(), spec)["lora"]
    export_peft(str(tmp_path / "a"), adapters, dataclasses.replace(spec, alpha=32.0), TINY)
    written = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert written["lora_alpha"] == 8.0  # the adapter's, not the spec's
    back, _, _ = import_peft(str(tmp_path / "a"), TINY)
    assert {float(a) for a in lora.adapter_alphas(back).values()} == {8.0}
    mixed = jax.tree_util.tree_map(lambda x: x, adapters)
    mixed["encoder"]["layer_0"]["attention"]["query"]["alpha"] = np.float32(16.0)
    with pytest.raises(UserError, match="2 different alphas"):
        export_peft(str(tmp_path / "b"), mixed, spec, TINY)
