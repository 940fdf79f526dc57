"""Per-row adapter routing (lora_jax.routing, lora_jax.adapter_bank) against each adapter alone
and against PEFT's mixed batches (``adapter_names``) on the same weights."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from lora_jax import lora, routing
from lora_jax.adapter_bank import AdapterBank, NamedAdapter
from lora_jax.errors import UserError
from lora_jax.models import Encoder, SequenceClassifier
from lora_jax.models.hf_import import load_pretrained
from lora_jax.peft_io import complete_head, import_peft
from lora_jax.tasks import custom_task
from tests.helpers import (
    HF_HEAD_MODULES,
    HF_KINDS,
    HF_TARGETS,
    TINY,
    hf_inputs,
    torch_base,
    torch_classifier,
)

ROWS = ["m1", "m3", "m2", "m1", "m3", "m2", "m3"]  # the adapter of each row of the mixed batch
# three adapters of different rank, alpha and target layers
PEFT_ADAPTERS = {"m1": dict(r=2, lora_alpha=4),
                 "m2": dict(r=4, lora_alpha=16, first_target=True),
                 "m3": dict(r=8, lora_alpha=8)}
# PEFT mixes batches only through Linear modules_to_save, and as a SEQ_CLS model it wraps
# ELECTRA's whole head (not a Linear): there the adapters are task-free with the head's two
# Linear layers saved, the same weights
MIXED_HEAD_MODULES = {**HF_HEAD_MODULES, "electra": ["classifier.dense", "classifier.out_proj"],
                      "electra_proj": ["classifier.dense", "classifier.out_proj"]}


def _batch(index, **kw):
    ids, mask, types = hf_inputs(batch=len(index), **kw)
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types,
            "adapter_index": np.asarray(index, np.int32)}


def _alone_logits(config, encoder_params, adapter: NamedAdapter, batch) -> np.ndarray:
    """The adapter applied by itself to the whole batch, as SequenceClassifier does."""
    model = SequenceClassifier(config, adapter.task.num_labels, head=adapter.head_kind,
                               pooling=adapter.pooling if adapter.head_kind == "linear" else "mean")
    variables = {"params": {"encoder": encoder_params, "head": adapter.head},
                 "lora": {"encoder": adapter.lora}}
    return np.asarray(model.apply(variables, batch["input_ids"], batch["attention_mask"],
                                  batch["token_type_ids"]))


def _peft_mixed(kind, tmp_path):
    """A PEFT SEQ_CLS model with three randomised adapters (and heads), saved; returns it."""
    import peft
    import torch

    hf = torch_classifier(kind)
    torch_base(hf).save_pretrained(tmp_path / "base")
    pm = None
    for name, kw in PEFT_ADAPTERS.items():
        targets = HF_TARGETS[kind][:1] if kw.get("first_target") else HF_TARGETS[kind]
        task_type = None if kind.startswith("electra") else "SEQ_CLS"
        cfg = peft.LoraConfig(task_type=task_type, r=kw["r"], lora_alpha=kw["lora_alpha"],
                              target_modules=targets,
                              modules_to_save=MIXED_HEAD_MODULES.get(kind))
        if pm is None:
            pm = peft.get_peft_model(hf, cfg, adapter_name=name)
        else:
            pm.add_adapter(name, cfg)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for pname, p in pm.named_parameters():
            if "lora_B" in pname or "modules_to_save" in pname:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    pm.save_pretrained(tmp_path / "adapters")
    pm.eval()
    return pm


def _imported(kind, tmp_path) -> tuple[object, list[NamedAdapter]]:
    pre = load_pretrained(str(tmp_path / "base"))
    task = custom_task({"name": "t", "text_keys": ["text"], "num_labels": 3})
    adapters = []
    for name in PEFT_ADAPTERS:
        imported = import_peft(str(tmp_path / "adapters" / name), pre.config)
        head = complete_head(imported.head, pre.head, pre.config.model_type, imported.source)
        adapters.append(NamedAdapter(name, task, imported.lora["encoder"], head, "hf", "head",
                                     40, imported.source))
    return pre, adapters


@pytest.mark.parametrize("kind", HF_KINDS)
def test_routed_rows_equal_each_adapter_alone_and_peft_mixed_batches(kind, tmp_path):
    torch = pytest.importorskip("torch")
    pytest.importorskip("peft")
    pm = _peft_mixed(kind, tmp_path)
    pre, adapters = _imported(kind, tmp_path)
    names = [a.name for a in adapters]
    index = [names.index(n) for n in ROWS]
    batch = _batch(index)
    bank = AdapterBank.of(adapters)
    routed = np.asarray(bank.logits_fn(Encoder(pre.config))(pre.encoder, batch))
    for row, i in enumerate(index):
        alone = _alone_logits(pre.config, pre.encoder, adapters[i], batch)
        np.testing.assert_allclose(routed[row], alone[row], atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        kw = {} if kind == "distilbert" else {"token_type_ids": torch.tensor(batch["token_type_ids"])}
        theirs = pm(input_ids=torch.tensor(batch["input_ids"]),
                    attention_mask=torch.tensor(batch["attention_mask"]), adapter_names=ROWS,
                    **kw).logits.numpy()
    # the three adapters give three different answers, so a row routed wrongly would show
    assert min(np.abs(theirs[0] - theirs[1]).max(), np.abs(theirs[0] - theirs[2]).max()) > 1e-2
    np.testing.assert_allclose(routed, theirs, atol=1e-4)


def _tiny_encoder() -> dict:
    model = SequenceClassifier(TINY, 2)
    ids = np.ones((1, 4), np.int32)
    return model.init(jax.random.PRNGKey(0), ids, ids)["params"]["encoder"]


def _random_adapter(encoder, name, seed, r, alpha, targets, num_labels, pooling) -> NamedAdapter:
    params = {"encoder": encoder}
    tree = lora.init_lora(jax.random.PRNGKey(seed), params, lora.LoRASpec(r=r, alpha=alpha,
                                                                         targets=targets))
    tree = jax.tree_util.tree_map_with_path(
        lambda p, x: x if p[-1].key == "alpha" else x + 0.2 * jax.random.normal(
            jax.random.PRNGKey(seed + 7), x.shape), tree)
    rng = np.random.default_rng(seed)
    head = {"kernel": rng.normal(0, 0.3, (TINY.hidden_size, num_labels)).astype(np.float32),
            "bias": rng.normal(0, 0.3, (num_labels,)).astype(np.float32)}
    task = custom_task({"name": name, "text_keys": ["text"], "num_labels": num_labels})
    return NamedAdapter(name, task, tree["encoder"], head, "linear", pooling, 16, "test")


def test_linear_heads_of_different_label_counts_and_poolings_route_like_each_alone():
    encoder = _tiny_encoder()
    adapters = [_random_adapter(encoder, "two", 1, 2, 8.0, ("query", "value"), 2, "mean"),
                _random_adapter(encoder, "reg", 2, 6, 3.0, ("intermediate",), 1, "cls"),
                _random_adapter(encoder, "five", 3, 4, 32.0, ("query", "key", "output"), 5, "mean")]
    index = [2, 0, 1, 1, 2, 0]
    batch = _batch(index, vocab=TINY.vocab_size, length=9)
    bank = AdapterBank.of(adapters)
    routed = np.asarray(bank.logits_fn(Encoder(TINY))(encoder, batch))
    assert routed.shape == (6, 5)
    for row, i in enumerate(index):
        alone = _alone_logits(TINY, encoder, adapters[i], batch)[row]
        np.testing.assert_allclose(routed[row, :len(alone)], alone, atol=1e-5, rtol=1e-5)
        np.testing.assert_array_equal(routed[row, len(alone):], 0.0)


def test_base_rows_run_the_base_encoder_exactly():
    encoder = _tiny_encoder()
    adapters = [_random_adapter(encoder, "x", 4, 4, 8.0, ("query", "value"), 2, "mean")]
    bank = routing.stack_adapters([adapters[0].lora], ["x"])
    batch = _batch([0, routing.BASE, 0], vocab=TINY.vocab_size, length=9)
    net = Encoder(TINY)
    args = (batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
    routed, _ = net.apply({"params": encoder, "lora": routing.route(bank, batch["adapter_index"])},
                          *args)
    base, _ = net.apply({"params": encoder}, *args)
    adapted, _ = net.apply({"params": encoder, "lora": adapters[0].lora}, *args)
    np.testing.assert_array_equal(np.asarray(routed[1]), np.asarray(base[1]))
    np.testing.assert_allclose(np.asarray(routed[0]), np.asarray(adapted[0]), atol=1e-5)
    assert np.abs(np.asarray(adapted[0]) - np.asarray(base[0])).max() > 1e-3


def test_padded_rank_keeps_each_adapters_own_scale():
    a = {"l": {"A": np.ones((3, 2), np.float32), "B": np.ones((2, 5), np.float32),
               "alpha": np.float32(6.0)}}
    b = {"l": {"A": np.ones((3, 8), np.float32), "B": np.ones((8, 5), np.float32),
               "alpha": np.float32(4.0)}}
    bank = routing.stack_adapters([a, b], ["a", "b"])["l"]
    assert bank["A"].shape == (2, 3, 8) and bank["B"].shape == (2, 8, 5)
    np.testing.assert_array_equal(bank["scale"], [3.0, 0.5])
    np.testing.assert_array_equal(bank["A"][0, :, 2:], 0.0)


def test_adapters_for_another_base_are_refused_by_name():
    a = {"l": {"A": np.ones((3, 2)), "B": np.ones((2, 5)), "alpha": 1.0}}
    b = {"l": {"A": np.ones((4, 2)), "B": np.ones((2, 5)), "alpha": 1.0}}
    with pytest.raises(UserError, match=r"'a' and 'b'.*layer l maps 3 -> 5.*4 -> 5"):
        routing.stack_adapters([a, b], ["a", "b"])
    with pytest.raises(ValueError, match="index 2 is out of range for 2 adapters"):
        routing.route(routing.stack_adapters([a, a], ["a", "c"]), np.array([0, 2]))


# ----------------------------------------------------------------------------- T5


def _t5_adapter(params, seed: int, prompt_tokens: int, spec: lora.LoRASpec) -> dict:
    """Prompt + LoRA variables with non-zero B (as after training)."""
    from t5_hybrid import adapters as t5_adapters

    variables = t5_adapters.init_variables(jax.random.PRNGKey(seed), params, "prompt_lora", spec,
                                           prompt_tokens)
    variables["lora"] = jax.tree_util.tree_map_with_path(
        lambda p, x: x if p[-1].key == "alpha" else x + 0.5 * jax.random.normal(
            jax.random.PRNGKey(seed + 1), x.shape), variables["lora"])
    return variables


def test_t5_rows_routed_over_two_prompt_lora_adapters_generate_as_each_alone():
    import jax.numpy as jnp

    from t5_hybrid.config import T5Config
    from t5_hybrid.generate import make_generate
    from t5_hybrid.model import T5ForConditionalGeneration

    cfg = T5Config(vocab_size=97, d_model=32, d_kv=8, d_ff=40, num_layers=2, num_decoder_layers=2,
                   num_heads=4, relative_attention_num_buckets=32,
                   relative_attention_max_distance=20, dropout_rate=0.0,
                   feed_forward_proj="gated-gelu", tie_word_embeddings=False)
    # 32 buckets: distances up to 8 each get their own, so a prompt padded on the wrong side
    # (its tokens moved against the input) changes the output
    model = T5ForConditionalGeneration(cfg)
    rng = np.random.default_rng(3)
    ids = rng.integers(2, cfg.vocab_size, (5, 9))
    mask = np.ones_like(ids)
    mask[1, 5:] = mask[3, 2:] = 0
    ids[mask == 0] = 0
    ids, mask = jnp.asarray(ids), jnp.asarray(mask)
    params = model.init(jax.random.PRNGKey(0), ids, mask, ids[:, :3])["params"]
    params = jax.tree_util.tree_map(lambda x: x * 3.0, params)  # sharper, less tied argmaxes
    two = [_t5_adapter(params, 10, 2, lora.LoRASpec(r=4, alpha=8.0, targets=("q", "v"))),
           _t5_adapter(params, 20, 6, lora.LoRASpec(r=2, alpha=2.0, targets=("q", "k", "o")))]
    index = np.array([1, 0, 0, 1, 1], np.int32)
    bank = routing.stack_adapters([v["lora"] for v in two], ["x", "y"])
    prompts = routing.stack_prompts([np.asarray(v["prompt"]["embedding"]) for v in two],
                                    cfg.d_model)
    routed = {"params": params, "lora": routing.route(bank, index),
              "prompt": routing.gather_rows(prompts, index)}
    decoder_ids = ids[:, :4]
    logits = np.asarray(model.apply(routed, ids, mask, decoder_ids))
    for beams in (1, 3):
        generate = make_generate(model, 6, num_beams=beams)
        tokens = np.asarray(generate(routed, ids, mask))
        alone = [np.asarray(generate(v, ids, mask)) for v in two]
        assert not np.array_equal(alone[0], alone[1])  # the adapters disagree somewhere
        for row, i in enumerate(index):
            np.testing.assert_array_equal(tokens[row], alone[i][row], err_msg=f"row {row}")
    for row, i in enumerate(index):
        alone = np.asarray(model.apply(two[i], ids, mask, decoder_ids))
        # The routed per-row adapter products and one shared adapter's are different fp32
        # dots, and this sharpened model (params x 3, logits up to ~30) amplifies their
        # rounding: with YNNPACK's dots (lora_jax.xla_flags on Intel) they differ by 2e-4 to
        # 4e-4, 1e-5 of the logits' scale. A wrong adapter or prompt moves logits by O(1).
        scale = np.abs(alone[row]).max()
        np.testing.assert_allclose(logits[row], alone[row], atol=1e-4 * scale, rtol=0)


def test_a_checkpoint_without_a_pooler_routes_and_a_head_that_reads_it_is_refused(tmp_path):
    """Sentence-transformers BERTs (the offline MiniLMs) ship no pooler. Heads that do not read
    it route as each adapter alone (the pooler drawn from a seed, as training drew it); a head
    that reads it, with no run to take it from, is refused by name."""
    import dataclasses

    import transformers

    from lora_jax.adapter_bank import RoutedClassifier

    transformers.BertModel(transformers.BertConfig(
        vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=48, max_position_embeddings=40), add_pooling_layer=False
    ).save_pretrained(tmp_path / "base")
    (tmp_path / "base" / "vocab.txt").write_text("\n".join(
        ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *[f"w{i}" for i in range(115)]]))
    pre = load_pretrained(str(tmp_path / "base"))
    assert "pooler/kernel" in pre.missing
    tree = lora.init_lora(jax.random.PRNGKey(3), {"encoder": pre.encoder},
                          lora.LoRASpec(r=2, alpha=4.0, targets=("query", "value")))["encoder"]
    tree = jax.tree_util.tree_map_with_path(
        lambda p, x: x if p[-1].key == "alpha" else np.asarray(
            x + 0.3 * jax.random.normal(jax.random.PRNGKey(8), x.shape)), tree)
    rng = np.random.default_rng(0)
    head = {"kernel": rng.normal(0, 0.3, (32, 2)).astype(np.float32),
            "bias": rng.normal(0, 0.3, (2,)).astype(np.float32)}
    task = custom_task({"name": "m", "text_keys": ["text"], "num_labels": 2})
    adapter = NamedAdapter("m", task, tree, head, "linear", "mean", 16, "test")
    routed = RoutedClassifier.build(str(tmp_path / "base"), [adapter], batch_size=8)
    batch = _batch([0, 0, 0], vocab=120)
    alone = SequenceClassifier(pre.config, 2).apply(
        {"params": {"encoder": routed.encoder_params, "head": head},
         "lora": {"encoder": tree}}, batch["input_ids"], batch["attention_mask"],
        batch["token_type_ids"])
    ours = routed.bank.logits_fn(routed.encoder)(routed.encoder_params, batch)
    np.testing.assert_allclose(np.asarray(ours), np.asarray(alone), atol=1e-5)
    with pytest.raises(UserError, match="reads BERT's pooler"):
        RoutedClassifier.build(str(tmp_path / "base"),
                               [dataclasses.replace(adapter, pooling="pooler")])
