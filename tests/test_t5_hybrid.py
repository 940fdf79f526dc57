"""Soft prompt + LoRA on T5: parameter counts against PEFT and the paper, the prompt's effect,
frozen weights bit-identical after training, tasks and metrics, load from a saved folder."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lora_jax import lora as lora_lib
from lora_jax.errors import UserError
from lora_jax.trainer import make_train_step
from t5_hybrid import adapters
from t5_hybrid import metrics as t5_metrics
from t5_hybrid.config import T5Config
from t5_hybrid.hf_import import load_pretrained, param_shapes
from t5_hybrid.model import T5ForConditionalGeneration, shift_right
from t5_hybrid.tasks import get_seq2seq_task as get_task
from t5_hybrid.tasks import pairs_from_rows
from t5_hybrid.train import make_loss_fn, token_loss
from tests.helpers import adamw, dot_dtypes

FLAN_T5_BASE = T5Config(vocab_size=32128, d_model=768, d_kv=64, d_ff=2048, num_layers=12,
                        num_decoder_layers=12, num_heads=12, feed_forward_proj="gated-gelu",
                        tie_word_embeddings=False)
TINY = T5Config(vocab_size=101, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_decoder_layers=2,
                num_heads=4, relative_attention_num_buckets=8, dropout_rate=0.1)
SPEC = lora_lib.LoRASpec(r=4, alpha=4.0, dropout=0.05, targets=("q", "v"))


def _abstract_variables(config: T5Config, variant: str) -> dict:
    params = param_shapes(config)
    return jax.eval_shape(lambda p: adapters.init_variables(jax.random.PRNGKey(0), p, variant,
                                                            SPEC, 30), params)


def _torch_tiny(torch, transformers):
    """transformers' PyTorch T5 with TINY's architecture, seeded weights."""
    torch.manual_seed(0)
    hf_cfg = transformers.T5Config(**{k: v for k, v in TINY.to_hf().items()
                                      if k not in ("model_type", "architectures")})
    return transformers.T5ForConditionalGeneration(hf_cfg)


def test_flan_t5_base_prompt_lora_count_is_the_papers_465408():
    variables = _abstract_variables(FLAN_T5_BASE, "prompt_lora")  # shapes only, no memory
    mask = lora_lib.trainable_mask(variables, adapters.trainable_patterns("prompt_lora"))
    trainable, _ = lora_lib.split(variables, mask)
    assert lora_lib.count_params(trainable) == 465_408
    assert lora_lib.count_params(trainable["prompt"]) == 30 * 768
    assert len(jax.tree_util.tree_leaves(trainable["lora"])) == 3 * 72  # A, B, alpha of q, v x 36


def test_flan_t5_base_full_count_is_the_papers_247577856():
    assert lora_lib.count_params(param_shapes(FLAN_T5_BASE)) == 247_577_856


def test_lora_count_equals_peft_on_the_same_t5():
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    peft_model = peft.get_peft_model(
        _torch_tiny(torch, transformers),
        peft.LoraConfig(r=4, lora_alpha=4, lora_dropout=0.05, target_modules=["q", "v"],
                        task_type="SEQ_2_SEQ_LM"))
    peft_trainable, _ = peft_model.get_nb_trainable_parameters()
    variables = _abstract_variables(TINY, "lora_only")
    assert lora_lib.count_params(variables["lora"]) == peft_trainable


def test_prompt_is_initialised_from_vocabulary_rows_and_changes_the_output():
    model = T5ForConditionalGeneration(TINY)
    ids = jnp.asarray(np.random.default_rng(0).integers(2, 101, (2, 7)), jnp.int32)
    mask = jnp.ones_like(ids)
    params = model.init(jax.random.PRNGKey(0), ids, mask, ids)["params"]
    prompt = adapters.init_prompt(jax.random.PRNGKey(1), params["shared"]["embedding"], 5)
    table = np.asarray(params["shared"]["embedding"])
    for row in np.asarray(prompt["embedding"]):
        assert np.any(np.all(table == row, axis=1))  # each soft token is a vocabulary row
    states, full_mask = model.apply({"params": params, "prompt": prompt}, ids, mask,
                                    method=model.encode)
    assert states.shape == (2, 12, 32) and full_mask.shape == (2, 12)
    plain = model.apply({"params": params}, ids, mask, ids)
    prompted = model.apply({"params": params, "prompt": prompt}, ids, mask, ids)
    assert not np.allclose(plain, prompted)
    with pytest.raises(UserError, match="num_tokens"):
        adapters.init_prompt(jax.random.PRNGKey(1), params["shared"]["embedding"], 500)


def test_zero_lora_b_equals_base_and_training_keeps_frozen_bit_identical():
    model = T5ForConditionalGeneration(TINY, lora_dropout=0.05)
    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(2, 101, (4, 9)), jnp.int32)
    labels = jnp.asarray(rng.integers(2, 101, (4, 5)), jnp.int32)
    params = model.init(jax.random.PRNGKey(0), ids, jnp.ones_like(ids), labels)["params"]
    variables = adapters.init_variables(jax.random.PRNGKey(1), params, "prompt_lora", SPEC, 6)
    base = model.apply({"params": params, "prompt": variables["prompt"]}, ids,
                       jnp.ones_like(ids), labels)
    np.testing.assert_array_equal(model.apply(variables, ids, jnp.ones_like(ids), labels), base)

    mask = lora_lib.trainable_mask(variables, adapters.trainable_patterns("prompt_lora"))
    trainable, frozen = lora_lib.split(variables, mask)
    before = jax.tree_util.tree_map(np.array, frozen)
    first_trainable = jax.tree_util.tree_map(np.array, trainable)
    tx = adamw(1e-2)
    step = jax.jit(make_train_step(make_loss_fn(model), tx, jax.random.PRNGKey(2)))
    opt_state = tx.init(trainable)
    batch = dict(input_ids=ids, attention_mask=jnp.ones_like(ids), labels=labels,
                 label_mask=jnp.ones_like(labels))
    decoder_inputs = shift_right(labels, TINY.decoder_start_token_id, TINY.pad_token_id)
    clean_loss = jax.jit(lambda t: token_loss(model.apply(
        lora_lib.combine(t, frozen), ids, jnp.ones_like(ids), decoder_inputs), labels,
        jnp.ones_like(labels)))
    first_loss = float(clean_loss(trainable))
    for i in range(5):
        trainable, opt_state, _ = step(trainable, opt_state, i, frozen, batch)
    assert float(clean_loss(trainable)) < first_loss  # without dropout noise in the comparison
    for a, b in zip(jax.tree_util.tree_leaves(before), jax.tree_util.tree_leaves(frozen),
                    strict=True):
        np.testing.assert_array_equal(a, np.asarray(b))
    changed = jax.tree_util.tree_map_with_path(
        lambda path, a, b: path[-1].key == "alpha" or not np.array_equal(a, np.asarray(b)),
        first_trainable, trainable)
    assert all(jax.tree_util.tree_leaves(changed))  # every adapter leaf moved (B from zero)


def test_tasks_build_sources_and_targets_and_reject_bad_rows():
    sst2 = get_task("sst2")
    assert pairs_from_rows([{"sentence": "a fine film", "label": 1}], sst2, "f") == (
        ["a fine film"], ["positive"])
    wikisql = get_task("wikisql")
    row = {"question": "who won?", "table": {"header": ["Player", "Year"]},
           "sql": {"human_readable": "SELECT Player FROM table WHERE Year = 1990"}}
    assert pairs_from_rows([row], wikisql, "f", prefix="p: ") == (
        ["p: who won? table: Player | Year"], ["SELECT Player FROM table WHERE Year = 1990"])
    with pytest.raises(UserError, match="no table header"):
        pairs_from_rows([{**row, "table": {"header": []}}], wikisql, "f")
    samsum_rows = [{"dialogue": "  ", "summary": "x"}, {"dialogue": "A: hi", "summary": "hi"}]
    with pytest.raises(UserError, match="empty dialogue.*skip_empty_rows=True"):
        pairs_from_rows(samsum_rows, get_task("samsum"), "f")
    assert pairs_from_rows(samsum_rows, get_task("samsum"), "f", skip_empty=True) == (
        ["A: hi"], ["hi"])
    with pytest.raises(UserError, match="unknown t5 task 'sst3'"):
        get_task("sst3")
    with pytest.raises(UserError, match="no rows"):
        pairs_from_rows([], sst2, "f")


def test_metrics_exact_match_and_rouge():
    pytest.importorskip("rouge_score")
    assert t5_metrics.exact_match(["positive ", "negative"], ["positive", "positive"]) == 0.5
    scores = t5_metrics.compute(("rougeL", "rouge1", "rouge2"), ["the cats sat on a mat"],
                                ["the cat sat on the mat"])
    assert scores["rouge1"] == pytest.approx(5 / 6)  # stemming: cats -> cat
    assert scores["rouge2"] == pytest.approx(3 / 5)
    assert set(scores) == {"rougeL", "rouge1", "rouge2"}


def test_load_pretrained_from_a_saved_transformers_folder(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    tm = _torch_tiny(torch, transformers).eval()
    tm.save_pretrained(tmp_path)
    _, config, params = load_pretrained(str(tmp_path))
    assert config == TINY
    ids = np.random.default_rng(0).integers(2, 101, (2, 6))
    with torch.no_grad():
        ref = tm(input_ids=torch.tensor(ids), decoder_input_ids=torch.tensor(ids)).logits.numpy()
    model = T5ForConditionalGeneration(config)
    ours = model.apply({"params": params}, jnp.asarray(ids), jnp.ones((2, 6), jnp.int32),
                       jnp.asarray(ids))
    np.testing.assert_allclose(np.asarray(ours), ref, atol=1e-4, rtol=1e-4)
    with pytest.raises(UserError, match="does not exist"):
        load_pretrained(str(tmp_path / "missing/model"))


def test_report_tables_have_the_papers_shape():
    from t5_hybrid.report import markdown_table

    def result(variant, task, metrics, seed=0):
        return {"experiment": "t5_hybrid", "variant": variant, "task": task, "seed": seed,
                "metrics": {"test": metrics}, "trainable_params": 10, "model": "random:tiny",
                "sizes": {"train": 5}, "protocol": "p", "data_sources": {"train": "f"},
                "machine": "cpu", "config": {"dtype": "float32", "num_beams": 1,
                                             "num_epochs": 2, "early_stopping_patience": 3,
                                             "batch_size": 16, "optimizer": {
                                                 "learning_rate": 1e-3, "warmup_steps": 5}}}

    results = [result("prompt_lora", "sst2", {"accuracy": 0.9}),
               result("prompt_lora", "sst2", {"accuracy": 0.8}, seed=1),
               result("base", "samsum", {"rouge1": 0.5, "rouge2": 0.25, "rougeL": 0.4})]
    text = markdown_table(None, results, "cmd")
    assert "| Prompt Tuning + LoRA | 10 | – | – | 85.0 ± 7.1 |" in text
    assert "| Base Model | 50.0 / 25.0 / 40.0 | – | – |" in text
    assert "| Fully Fine-Tuned Model | – | – | – | – |" in text


def test_bf16_train_step_keeps_float32_adapters():
    model = T5ForConditionalGeneration(TINY, dtype=jnp.bfloat16)
    ids = jnp.asarray(np.random.default_rng(0).integers(2, 101, (2, 6)), jnp.int32)
    params = T5ForConditionalGeneration(TINY).init(jax.random.PRNGKey(0), ids, jnp.ones_like(ids),
                                                   ids)["params"]
    variables = adapters.init_variables(jax.random.PRNGKey(1), params, "prompt_lora", SPEC, 4)
    trainable, frozen = lora_lib.split(variables, lora_lib.trainable_mask(
        variables, adapters.trainable_patterns("prompt_lora")))
    tx = adamw(1e-3)
    batch = dict(input_ids=ids, attention_mask=jnp.ones_like(ids), labels=ids,
                 label_mask=jnp.ones_like(ids))
    step = make_train_step(make_loss_fn(model), tx, jax.random.PRNGKey(2))
    new, _, m = jax.jit(step)(trainable, tx.init(trainable), 0, frozen, batch)
    assert np.isfinite(float(m["train/loss"]))
    assert {x.dtype for x in jax.tree_util.tree_leaves(new)} == {jnp.dtype(jnp.float32)}
    # the compute really is bf16: the step's matmuls run in bf16 (an fp32 model has none), and
    # the bf16 forward differs from the fp32 one by rounding, not by a bug
    fp32_step = make_train_step(make_loss_fn(T5ForConditionalGeneration(TINY)), tx,
                                jax.random.PRNGKey(2))
    args = (trainable, tx.init(trainable), 0, frozen, batch)
    bf16_dots, fp32_dots = dot_dtypes(step, *args), dot_dtypes(fp32_step, *args)
    assert bf16_dots.count("bfloat16") > len(bf16_dots) // 2 and "bfloat16" not in fp32_dots
    full = lora_lib.combine(trainable, frozen)
    lo = T5ForConditionalGeneration(TINY, dtype=jnp.bfloat16).apply(full, ids, batch["attention_mask"], ids)
    hi = T5ForConditionalGeneration(TINY).apply(full, ids, batch["attention_mask"], ids)
    diff = float(jnp.abs(lo.astype(jnp.float32) - hi).max())
    assert 0 < diff < 0.1 * float(jnp.abs(hi).max())
