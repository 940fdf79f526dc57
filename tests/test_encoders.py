"""Parity of the Flax encoders with transformers' PyTorch classes (fp32, 1e-4)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lora_jax.models import Encoder
from lora_jax.models.hf_import import load_pretrained

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

SMALL = dict(vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
             intermediate_size=48, max_position_embeddings=40)


def _random_torch_model(kind: str):
    torch.manual_seed(0)
    if kind == "bert":
        return transformers.BertModel(transformers.BertConfig(**SMALL, type_vocab_size=2))
    if kind == "electra":
        return transformers.ElectraModel(transformers.ElectraConfig(**SMALL, embedding_size=32))
    if kind == "electra_proj":
        return transformers.ElectraModel(transformers.ElectraConfig(**SMALL, embedding_size=16))
    if kind == "distilbert":
        return transformers.DistilBertModel(transformers.DistilBertConfig(
            vocab_size=120, dim=32, n_layers=2, n_heads=4, hidden_dim=48,
            max_position_embeddings=40))
    raise ValueError(kind)


def _inputs(batch=3, length=11, vocab=120):
    rng = np.random.default_rng(0)
    ids = rng.integers(1, vocab, (batch, length))
    mask = np.ones((batch, length), np.int64)
    mask[1, 7:] = 0  # padded rows
    mask[2, 4:] = 0
    types = np.zeros_like(ids)
    types[:, 5:] = 1
    return ids, mask, types


def _torch_hidden(model, kind, ids, mask, types):
    model.eval()
    kw = dict(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask))
    if kind != "distilbert":
        kw["token_type_ids"] = torch.tensor(types)
    with torch.no_grad():
        return model(**kw).last_hidden_state.numpy()


@pytest.mark.parametrize("kind", ["bert", "distilbert", "electra", "electra_proj"])
def test_last_hidden_state_matches_pytorch(kind, tmp_path):
    model = _random_torch_model(kind)
    model.save_pretrained(tmp_path)
    ids, mask, types = _inputs()
    expected = _torch_hidden(model, kind, ids, mask, types)

    _, config, params, missing, _ = load_pretrained(str(tmp_path))
    assert missing == []
    hidden, _ = Encoder(config).apply({"params": params}, jnp.asarray(ids), jnp.asarray(mask),
                                      jnp.asarray(types))
    valid = mask.astype(bool)
    np.testing.assert_allclose(np.asarray(hidden)[valid], expected[valid], atol=1e-4, rtol=1e-4)


def test_bert_pooler_matches_pytorch(tmp_path):
    model = _random_torch_model("bert")
    model.save_pretrained(tmp_path)
    ids, mask, types = _inputs()
    with torch.no_grad():
        model.eval()
        expected = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                         token_type_ids=torch.tensor(types)).pooler_output.numpy()
    _, config, params, _, _ = load_pretrained(str(tmp_path))
    _, pooled = Encoder(config).apply({"params": params}, jnp.asarray(ids), jnp.asarray(mask),
                                      jnp.asarray(types))
    np.testing.assert_allclose(np.asarray(pooled), expected, atol=1e-4, rtol=1e-4)


def test_pytorch_bin_checkpoint_loads(tmp_path):
    model = _random_torch_model("bert")
    model.config.save_pretrained(tmp_path)  # transformers 5 writes only safetensors
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    ids, mask, types = _inputs()
    expected = _torch_hidden(model, "bert", ids, mask, types)
    _, config, params, _, _ = load_pretrained(str(tmp_path))
    hidden, _ = Encoder(config).apply({"params": params}, ids, mask, types)
    np.testing.assert_allclose(np.asarray(hidden)[mask.astype(bool)], expected[mask.astype(bool)],
                               atol=1e-4)


def test_real_minilm_l3_matches_pytorch(minilm_l3):
    tok = transformers.AutoTokenizer.from_pretrained(str(minilm_l3))
    batch = tok(["A man is playing a guitar.", "The stock market fell sharply today, again."],
                padding=True, return_tensors="np")
    ref = transformers.BertModel.from_pretrained(str(minilm_l3))
    expected = _torch_hidden(ref, "bert", batch["input_ids"], batch["attention_mask"],
                             batch["token_type_ids"])
    _, config, params, missing, _ = load_pretrained(str(minilm_l3))
    assert missing == ["pooler/bias", "pooler/kernel"]  # the export has no pooler
    params = dict(params, pooler=jax.tree_util.tree_map(
        np.zeros_like, {"kernel": np.zeros((384, 384)), "bias": np.zeros(384)}))
    hidden, _ = Encoder(config).apply({"params": params}, batch["input_ids"],
                                      batch["attention_mask"], batch["token_type_ids"])
    valid = batch["attention_mask"].astype(bool)
    np.testing.assert_allclose(np.asarray(hidden)[valid], expected[valid], atol=1e-4)


def test_bf16_compute_close_to_fp32(tmp_path):
    model = _random_torch_model("bert")
    model.save_pretrained(tmp_path)
    ids, mask, types = _inputs()
    _, config, params, _, _ = load_pretrained(str(tmp_path))
    h32, _ = Encoder(config).apply({"params": params}, ids, mask, types)
    h16, _ = Encoder(config, dtype=jnp.bfloat16).apply({"params": params}, ids, mask, types)
    assert h16.dtype == jnp.bfloat16
    valid = mask.astype(bool)
    err = np.abs(np.asarray(h16, np.float32) - np.asarray(h32))[valid]
    assert err.max() < 0.1, err.max()


def test_hub_id_offline_is_a_one_line_error(monkeypatch):
    from lora_jax.errors import UserError
    from lora_jax.models.hf_import import resolve_model_dir

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match=r"could not get model 'bert-base-uncased' .*--config.model="):
        resolve_model_dir("bert-base-uncased")
    with pytest.raises(UserError, match="does not exist"):
        resolve_model_dir("./no/such/folder")


def test_a_model_folder_under_home_is_found_by_its_tilde_path(tmp_path, monkeypatch):
    """As ../shared/tools/get-minilm-l6.sh leaves it: ~/.cache/offline-models/<name>."""
    from lora_jax.models.hf_import import resolve_model_dir

    folder = tmp_path / ".cache" / "offline-models" / "m"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert resolve_model_dir("~/.cache/offline-models/m") == str(folder)


def test_task_checkpoint_reports_unexpected_and_missing_keys(tmp_path, caplog):
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(transformers.BertConfig(**SMALL))
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("bert.pooler")}
    state["cls.predictions.bias"] = torch.zeros(SMALL["vocab_size"])  # a pre-training head
    model.config.save_pretrained(tmp_path)
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "model.safetensors")
    with caplog.at_level("WARNING"):
        _, _, params, missing, head = load_pretrained(str(tmp_path))
    assert missing == ["pooler/bias", "pooler/kernel"]
    assert "were not used: cls.predictions.bias" in caplog.text
    # The sequence-classification head is read as the checkpoint's head, not reported unused.
    np.testing.assert_array_equal(head["classifier"]["kernel"], state["classifier.weight"].numpy().T)
    assert "newly initialized: pooler/bias, pooler/kernel" in caplog.text
    np.testing.assert_array_equal(params["layer_1"]["attention"]["query"]["kernel"],
                                  state["bert.encoder.layer.1.attention.self.query.weight"].numpy().T)


def test_shape_mismatch_names_the_tensor(tmp_path):
    from lora_jax.errors import UserError

    model = _random_torch_model("bert")
    model.save_pretrained(tmp_path)
    cfg = (tmp_path / "config.json").read_text().replace('"intermediate_size": 48',
                                                          '"intermediate_size": 64')
    (tmp_path / "config.json").write_text(cfg)
    with pytest.raises(UserError,
                       match=r"intermediate\.dense\.(weight|bias) has shape .* does not match"):
        load_pretrained(str(tmp_path))


def test_bf16_compute_keeps_layernorm_statistics_and_logits_in_fp32():
    """dtype=bfloat16: the matmuls run in bf16 and the logits come out fp32 (encoder classifier
    and T5); LayerNorm statistics are fp32: on inputs near 1000 that differ by a few bf16 steps
    (where a bf16 E[x^2] - E[x]^2 cancels to garbage) the normalised output matches an fp32
    LayerNorm of the same inputs."""
    from lora_jax.models.encoder import Embeddings
    from t5_hybrid.model import T5ForConditionalGeneration
    from tests.helpers import primitive_dtypes, tiny_batch, tiny_model
    from tests.test_t5_hybrid import TINY as T5_TINY

    ids, mask, types = tiny_batch()
    model = tiny_model(dtype=jnp.bfloat16)
    params = model.init(jax.random.PRNGKey(0), ids, mask, types)
    t5 = T5ForConditionalGeneration(T5_TINY, dtype=jnp.bfloat16)
    t5_params = t5.init(jax.random.PRNGKey(0), ids, mask, ids)
    for fn, args in ((lambda p: model.apply(p, ids, mask, types), (params,)),
                     (lambda p: t5.apply(p, ids, mask, ids), (t5_params,))):
        assert jax.eval_shape(fn, *args).dtype == jnp.float32
        dots = primitive_dtypes(fn, ("dot_general",), *args)
        assert sum(out == "bfloat16" for _, out in dots) > len(dots) // 2

    cfg = model.config
    emb = Embeddings(cfg, dtype=jnp.bfloat16)
    variables = emb.init(jax.random.PRNGKey(0), ids, types, True)
    zero = jax.tree_util.tree_map(jnp.zeros_like, variables)  # no positions / token types
    zero["params"]["LayerNorm"] = variables["params"]["LayerNorm"]  # scale 1, bias 0
    steps = np.random.default_rng(0).integers(-3, 4, (4, 9, cfg.embedding_size))
    x = jnp.asarray(1000.0 + 4.0 * steps, jnp.bfloat16)  # exact in bf16 (spacing 4 at 1000)
    out = emb.apply(zero, ids, types, True, inputs_embeds=x)
    x32 = np.asarray(x, np.float32)
    ref = (x32 - x32.mean(-1, keepdims=True)) / np.sqrt(x32.var(-1, keepdims=True)
                                                        + cfg.layer_norm_eps)
    np.testing.assert_allclose(np.asarray(out, np.float32), ref, atol=0.05)


def test_exact_gelu_matches_torch_values_and_gradient():
    """`gelu_exact` (the erf form the encoders use for "gelu") against torch's exact GELU, on
    values from the far tails to 0, and its gradient against autograd's."""
    from lora_jax.models.layers import ACTIVATIONS, gelu_exact

    assert ACTIVATIONS["gelu"] is gelu_exact
    x = np.concatenate([np.linspace(-12, 12, 4001), [-1e-6, 0.0, 1e-6, -40.0, 40.0]])
    x = x.astype(np.float32)
    tx = torch.tensor(x, requires_grad=True)
    expected = torch.nn.functional.gelu(tx)
    expected.sum().backward()
    got, grad = jax.value_and_grad(lambda v: gelu_exact(v).sum())(jnp.asarray(x))
    np.testing.assert_allclose(np.asarray(gelu_exact(jnp.asarray(x))),
                               expected.detach().numpy(), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(grad), tx.grad.numpy(), rtol=1e-5, atol=1e-6)
    assert np.isclose(float(got), float(expected.sum()), rtol=1e-5)


def test_init_around_equals_a_full_init_with_the_checkpoint_placed(tmp_path):
    """`init_around` (one jitted apply) gives every leaf a jitted full `init` followed by
    `place_pretrained` gives, bit for bit: the checkpoint's leaves as read and the missing
    pooler and the new head drawn from the same streams; a leaf of the wrong shape is refused."""
    import flax
    from flax import traverse_util

    from lora_jax.models import SequenceClassifier
    from lora_jax.models.hf_import import init_around, place_pretrained

    model = _random_torch_model("bert")
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("pooler")}
    model.config.save_pretrained(tmp_path)
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "model.safetensors")
    _, config, encoder, missing, _ = load_pretrained(str(tmp_path))
    assert missing == ["pooler/bias", "pooler/kernel"]
    net = SequenceClassifier(config, 3)
    ids = jnp.zeros((1, 8), jnp.int32)
    rng = jax.random.PRNGKey(7)

    # (jitted, as XLA fuses the initialisers' arithmetic: an eager init differs in the last ulp)
    full = jax.jit(net.init)(rng, ids, ids, ids)["params"]
    full["encoder"] = place_pretrained(full["encoder"], encoder)
    around = init_around(net, {"encoder": encoder}, rng, ids, ids, ids)

    flat_full, flat_around = (traverse_util.flatten_dict(t) for t in (full, around))
    assert flat_full.keys() == flat_around.keys()
    for path, value in flat_full.items():
        np.testing.assert_array_equal(flat_around[path], value, err_msg="/".join(path))
    for path, value in traverse_util.flatten_dict(encoder).items():
        np.testing.assert_array_equal(flat_around[("encoder", *path)], value)
    # The seeded leaves are real draws, not zeros left behind.
    assert np.abs(np.asarray(around["encoder"]["pooler"]["kernel"])).max() > 0

    bad = flax.core.unfreeze(encoder)
    bad["layer_0"]["attention"]["query"]["kernel"] = np.zeros((32, 16), np.float32)
    with pytest.raises(Exception, match="shape"):
        init_around(net, {"encoder": bad}, rng, ids, ids, ids)
