"""AttEns: stacked multi-adapter features and the combiner module."""

from __future__ import annotations

import contextlib
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ensemble import features as features_lib
from ensemble.combiner import (
    AGGREGATIONS,
    AttEnsCombiner,
    MixCombiner,
    module_weights,
)
from ensemble.features import (
    aggregate_tokens,
    compute_split_features,
    fold_adapters,
    make_feature_fn,
    stack_heads,
    stack_trees,
    with_base_slot,
)
from lora_jax import lora
from lora_jax.data import Encoded
from lora_jax.distributed import map_encoded
from lora_jax.models import Encoder
from tests.helpers import TINY, tiny_batch

K = 3


def _modules():
    ids, mask, types = tiny_batch()
    params = Encoder(TINY).init(jax.random.PRNGKey(0), ids)["params"]
    spec = lora.LoRASpec(r=2, alpha=4.0, targets=("query", "value", "intermediate"))
    adapters = []
    for i in range(K):  # modules trained elsewhere may differ in alpha: 2, 4, 8
        spec_i = lora.LoRASpec(r=2, alpha=2.0 * 2**i, targets=spec.targets)
        a = lora.init_lora(jax.random.PRNGKey(10 + i), {"encoder": params}, spec_i)["encoder"]
        adapters.append(jax.tree_util.tree_map_with_path(
            lambda path, x, i=i: x if path[-1].key == "alpha" else
            x + 0.2 * jax.random.normal(jax.random.PRNGKey(20 + i), x.shape), a))
    heads = [{"kernel": jax.random.normal(jax.random.PRNGKey(30 + i), (16, c)),
              "bias": jnp.arange(c, dtype=jnp.float32)} for i, c in enumerate((2, 3, 1))]
    batch = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}
    return params, adapters, heads, batch


def test_split_features_run_with_large_blocks_mapped_and_match_one_batch(monkeypatch):
    """The whole batched pass runs inside `host_malloc.large_blocks_mapped` (its large
    temporary would otherwise grow the kept heap), and the split's rows come back in order."""
    params, adapters, heads, batch = _modules()
    events = []

    @contextlib.contextmanager
    def recording():
        events.append("enter")
        yield
        events.append("exit")

    def watched_map(*args, **kwargs):
        events.append("batches start")
        out = map_encoded(*args, **kwargs)
        events.append("batches end")
        return out

    monkeypatch.setattr(features_lib.host_malloc, "large_blocks_mapped", recording)
    monkeypatch.setattr(features_lib, "map_encoded", watched_map)
    feature_fn = make_feature_fn(Encoder(TINY))
    ids, mask = np.asarray(batch["input_ids"]), np.asarray(batch["attention_mask"])
    rows = [ids[i][mask[i] > 0] for i in range(len(ids))]
    enc = Encoded(rows, [np.zeros_like(r) for r in rows], np.zeros(len(rows), np.int64))
    stacked = with_base_slot(stack_trees(adapters))
    modules, base = compute_split_features(feature_fn, params, stacked, (), enc, batch_size=2,
                                           buckets=(ids.shape[1],), pad_id=0, progress=False)
    assert events == ["enter", "batches start", "batches end", "exit"]
    want, want_base = jax.jit(feature_fn)(params, stacked, (), batch)
    np.testing.assert_allclose(modules, np.asarray(want), atol=1e-5)
    np.testing.assert_allclose(base, np.asarray(want_base), atol=1e-5)


@pytest.mark.parametrize("agg1", ["mean", "max", "min", "sum"])
def test_stacked_pass_equals_separate_passes(agg1):
    """Each module is scaled by its own alpha inside the one stacked pass (the modules here have
    alpha 2, 4 and 8; one model-wide alpha would mis-scale two of them)."""
    params, adapters, heads, batch = _modules()
    enc = Encoder(TINY)
    fn = jax.jit(make_feature_fn(enc, agg1=agg1))
    modules, base = fn(params, with_base_slot(stack_trees(adapters)), stack_heads(heads), batch)
    assert modules.shape == (4, K, 16) and base.shape == (4, 16)
    mask = batch["attention_mask"]
    for i, a in enumerate(adapters):
        hidden, _ = enc.apply({"params": params, "lora": a}, batch["input_ids"], mask)
        np.testing.assert_allclose(np.asarray(modules[:, i]),
                                   np.asarray(aggregate_tokens(hidden, mask, agg1)), atol=1e-5)
    plain, _ = Encoder(TINY).apply({"params": params}, batch["input_ids"], mask)
    np.testing.assert_allclose(np.asarray(base), np.asarray(aggregate_tokens(plain, mask, "mean")),
                               atol=1e-6)


def test_eval_pass_folds_every_adapter_but_those_reading_the_embeddings():
    """The eval pass runs x W_i for every module with a per-slot input (W_i = lora.merge of
    slot i; the base slot keeps W exactly) and x W + x A B only where x is the embeddings."""
    params, adapters, _, _ = _modules()
    folded, axes, kept = fold_adapters(params, with_base_slot(stack_trees(adapters)))
    flat_kept = jax.tree_util.tree_flatten_with_path(kept)[0]
    assert sorted({"/".join(p.key for p in path[:-1]) for path, _ in flat_kept}) == [
        "layer_0/attention/query", "layer_0/attention/value"]
    for module in (("layer_0", "intermediate"), ("layer_1", "attention", "query"),
                   ("layer_1", "attention", "value"), ("layer_1", "intermediate")):
        get = lambda tree, m=module: functools.reduce(lambda t, k: t[k], m, tree)["kernel"]
        assert get(axes) == 0 and get(folded).shape == (K + 1, *get(params).shape)
        for i, a in enumerate(adapters):
            np.testing.assert_allclose(np.asarray(get(folded)[i]),
                                       np.asarray(get(lora.merge(params, a))), rtol=1e-6)
        np.testing.assert_array_equal(np.asarray(get(folded)[K]), np.asarray(get(params)))
    assert axes["layer_0"]["attention"]["query"]["kernel"] is None
    assert folded["layer_0"]["attention"]["query"]["kernel"].shape == (16, 16)
    assert axes["layer_1"]["attention"]["key"]["kernel"] is None  # not adapted


def test_logits_output_is_each_head_on_its_module_zero_padded():
    params, adapters, heads, batch = _modules()
    enc = Encoder(TINY)
    fn = make_feature_fn(enc, output="logits", agg1="mean")
    modules, _ = fn(params, with_base_slot(stack_trees(adapters)), stack_heads(heads), batch)
    assert modules.shape == (4, K, 3)
    mask = batch["attention_mask"]
    for i, (a, h) in enumerate(zip(adapters, heads, strict=True)):
        hidden, _ = enc.apply({"params": params, "lora": a}, batch["input_ids"], mask)
        expect = aggregate_tokens(hidden, mask, "mean") @ h["kernel"] + h["bias"]
        c = h["kernel"].shape[1]
        np.testing.assert_allclose(np.asarray(modules[:, i, :c]), np.asarray(expect), atol=1e-4)
        np.testing.assert_array_equal(np.asarray(modules[:, i, c:]), 0)


def test_padding_quirk_and_dropout_quirk_change_features():
    params, adapters, heads, batch = _modules()
    enc = Encoder(TINY)
    stacked, h = with_base_slot(stack_trees(adapters)), stack_heads(heads)
    clean = make_feature_fn(enc)(params, stacked, h, batch)[0]
    padded = make_feature_fn(enc, count_padding=True)(params, stacked, h, batch)[0]
    # row 1 has padding: the plain mean differs there, rows without padding are equal
    assert not np.allclose(np.asarray(clean[1]), np.asarray(padded[1]))
    np.testing.assert_allclose(np.asarray(clean[0]), np.asarray(padded[0]), atol=1e-6)
    dropped = make_feature_fn(enc)(params, stacked, h, batch, jax.random.PRNGKey(0))[0]
    assert not np.allclose(np.asarray(clean), np.asarray(dropped))


def test_aggregate_tokens_ignores_padding():
    x = jnp.array([[[1.0], [3.0], [100.0]]])
    mask = jnp.array([[1, 1, 0]])
    assert float(aggregate_tokens(x, mask, "mean")[0, 0]) == 2.0
    assert float(aggregate_tokens(x, mask, "max")[0, 0]) == 3.0
    assert float(aggregate_tokens(x, mask, "min")[0, 0]) == 1.0
    assert float(aggregate_tokens(x, mask, "sum")[0, 0]) == 4.0
    assert float(aggregate_tokens(x, mask, "mean", count_padding=True)[0, 0]) == pytest.approx(104 / 3)


def _inputs(b=5, k=4, d=16, seed=0):
    r = np.random.default_rng(seed)
    return jnp.asarray(r.normal(size=(b, k, d)), jnp.float32), jnp.asarray(r.normal(size=(b, d)),
                                                                          jnp.float32)


@pytest.mark.parametrize("agg2", sorted(AGGREGATIONS))
def test_combiner_shapes_and_attention_weights(agg2):
    modules, base = _inputs()
    model = AttEnsCombiner(num_classes=3, agg2=agg2)
    params = model.init(jax.random.PRNGKey(0), modules, base)
    logits, weights = model.apply(params, modules, base, return_attention=True)
    assert logits.shape == (5, 3) and logits.dtype == jnp.float32
    assert weights.shape == (5, 4, 4, 4)  # (B, heads, k, k): attention across modules
    np.testing.assert_allclose(np.asarray(weights.sum(-1)), 1.0, atol=1e-5)


def test_each_agg2_gives_a_different_model():
    modules, base = _inputs()
    outs = {}
    for agg2 in AGGREGATIONS:
        m = AttEnsCombiner(num_classes=2, agg2=agg2)
        outs[agg2] = np.asarray(m.apply(m.init(jax.random.PRNGKey(0), modules, base), modules,
                                        base))
    for a, b in (("mean", "max"), ("mean", "min"), ("max", "min")):
        assert not np.allclose(outs[a], outs[b]), (a, b)
    # LN_a follows Agg2, and a LayerNorm cancels the factor k: sum == mean up to its epsilon
    np.testing.assert_allclose(outs["sum"], outs["mean"], atol=1e-4)


def test_attention_runs_across_modules_not_examples():
    modules, base = _inputs()
    model = AttEnsCombiner(num_classes=2)
    params = model.init(jax.random.PRNGKey(0), modules, base)
    full = np.asarray(model.apply(params, modules, base))
    # each example's output depends on that example only
    alone = np.asarray(model.apply(params, modules[:1], base[:1]))
    np.testing.assert_allclose(full[:1], alone, atol=1e-5)
    # permuting the modules leaves a mean over modules unchanged (attention is permutation-equivariant)
    perm = np.asarray(model.apply(params, modules[:, ::-1], base))
    np.testing.assert_allclose(full, perm, atol=1e-5)


def test_batch_axis_quirk_mixes_examples():
    modules, base = _inputs()
    model = AttEnsCombiner(num_classes=2, attend_across_batch=True)
    params = model.init(jax.random.PRNGKey(0), modules, base)
    full, weights = model.apply(params, modules, base, return_attention=True)
    assert weights.shape == (4, 4, 5, 5)  # (k, heads, B, B): across the examples
    alone = model.apply(params, modules[:1], base[:1])
    assert not np.allclose(np.asarray(full[:1]), np.asarray(alone))
    # the same parameters without the quirk give other outputs
    clean = AttEnsCombiner(num_classes=2).apply(params, modules, base)
    assert not np.allclose(np.asarray(full), np.asarray(clean))


def test_shared_layernorm_quirk_has_one_norm():
    modules, base = _inputs()
    shared = AttEnsCombiner(num_classes=2, shared_layernorm=True)
    p_shared = shared.init(jax.random.PRNGKey(0), modules, base)["params"]
    p_clean = AttEnsCombiner(num_classes=2).init(jax.random.PRNGKey(0), modules, base)["params"]
    assert [k for k in p_shared if "layernorm" in k or k.startswith("ln_")] == ["layernorm"]
    assert sorted(k for k in p_clean if k.startswith("ln_")) == [
        "ln_attention", "ln_base", "ln_modules", "ln_out"]
    # with non-trivial norm parameters the two models differ
    p_clean = jax.tree_util.tree_map(lambda x: x, p_clean)
    for name in ("ln_attention", "ln_base", "ln_modules", "ln_out"):
        p_clean[name] = {"scale": p_clean[name]["scale"] * (2 + len(name)),
                         "bias": p_clean[name]["bias"] + len(name)}
    p_shared = {**{k: v for k, v in p_clean.items() if not k.startswith("ln_")},
                "layernorm": p_clean["ln_out"]}
    a = AttEnsCombiner(num_classes=2).apply({"params": p_clean}, modules, base)
    b = shared.apply({"params": p_shared}, modules, base)
    assert not np.allclose(np.asarray(a), np.asarray(b))


def test_regression_head_and_logit_lift():
    modules, base = _inputs(d=16)
    model = AttEnsCombiner(num_classes=1, lift_dim=16)
    small = modules[..., :3]  # module logits of width 3
    params = model.init(jax.random.PRNGKey(0), small, base)
    out = model.apply(params, small, base)
    assert out.shape == (5, 1)
    assert params["params"]["lift"]["kernel"].shape == (3, 16)


def test_dropout_only_when_training():
    modules, base = _inputs()
    model = AttEnsCombiner(num_classes=2, dropout=0.5)
    params = model.init(jax.random.PRNGKey(0), modules, base)
    a = model.apply(params, modules, base)
    b = model.apply(params, modules, base, deterministic=False,
                    rngs={"dropout": jax.random.PRNGKey(1)})
    assert not np.allclose(np.asarray(a), np.asarray(b))


def test_row_cache_computes_each_example_once(tmp_path):
    import os

    from ensemble.features import FeatureStore, cached_features

    calls = []

    def make_compute(texts):
        def compute(idx):
            calls.append([texts[i][0] for i in idx])
            mods = np.stack([np.full((2, 3), len(texts[i][0]), np.float32) for i in idx])
            return mods, np.stack([np.full(4, ord(texts[i][0][0]), np.float32) for i in idx])
        return compute

    settings = {"model": "m", "agg1": "mean"}
    first = [("aa",), ("bbb",), ("aa",)]  # a duplicate row is computed once
    m, b, seconds, n_new = cached_features(str(tmp_path), settings, first, make_compute(first))
    assert calls == [["aa", "bbb"]] and n_new == 2 and seconds > 0
    np.testing.assert_array_equal(m[:, 0, 0], [2, 3, 2])
    second = [("bbb",), ("cccc",)]  # overlaps: only the new row is computed
    m, b, seconds, n_new = cached_features(str(tmp_path), settings, second, make_compute(second))
    assert calls[-1] == ["cccc"] and n_new == 1
    np.testing.assert_array_equal(m[:, 0, 0], [3, 4])
    np.testing.assert_array_equal(b[:, 0], [ord("b"), ord("c")])
    m, _, seconds, n_new = cached_features(str(tmp_path), settings, second, make_compute(second))
    assert n_new == 0 and seconds == 0.0 and len(calls) == 2
    cached_features(str(tmp_path), {**settings, "agg1": "max"}, second, make_compute(second))
    assert calls[-1] == ["bbb", "cccc"]  # other settings: another store
    # a part another process is still writing (its temporary file) is not read
    store_dir = FeatureStore(str(tmp_path), settings).dir
    with open(os.path.join(store_dir, "part-00009-123.npz.tmp.npz"), "wb") as f:
        f.write(b"half a file")
    m, _, _, n_new = cached_features(str(tmp_path), settings, second, make_compute(second))
    assert n_new == 0
    np.testing.assert_array_equal(m[:, 0, 0], [3, 4])


def test_all_padding_rows_aggregate_to_zero_not_infinity():
    x = jnp.array([[[1.0], [3.0]], [[5.0], [7.0]]])
    mask = jnp.array([[1, 1], [0, 0]])  # row 1 only fills the batch
    for how in ("mean", "max", "min", "sum"):
        out = np.asarray(aggregate_tokens(x, mask, how))
        assert np.isfinite(out).all() and out[1, 0] == 0.0, how


def test_batch_axis_quirk_never_attends_to_padding_rows():
    """Rows that only fill the last batch (zeros at eval, copies in training) must not change
    the real rows' outputs: the authors' code never sees such rows."""
    modules, base = _inputs(b=5)
    model = AttEnsCombiner(num_classes=2, attend_across_batch=True)
    params = model.init(jax.random.PRNGKey(0), modules, base)
    real = np.asarray(model.apply(params, modules[:3], base[:3]))
    keep = jnp.array([True, True, True, False, False])
    for fill in (jnp.zeros_like, lambda x: jnp.concatenate([x[:3], x[:2]])):  # zeros, copies
        padded_m = jnp.concatenate([modules[:3], fill(modules)[3:]])
        padded_b = jnp.concatenate([base[:3], fill(base)[3:]])
        out = np.asarray(model.apply(params, padded_m, padded_b, row_mask=keep))
        np.testing.assert_allclose(out[:3], real, atol=1e-5)
        unmasked = np.asarray(model.apply(params, padded_m, padded_b))
        assert not np.allclose(unmasked[:3], real, atol=1e-5)


torch = pytest.importorskip("torch")


def _torch_mha(params, d, heads):
    mha = torch.nn.MultiheadAttention(d, heads, bias=True, batch_first=True)
    p = jax.device_get(params)
    with torch.no_grad():
        mha.in_proj_weight.copy_(torch.tensor(np.asarray(p["in_proj"]["kernel"]).T))
        mha.in_proj_bias.copy_(torch.tensor(np.asarray(p["in_proj"]["bias"])))
        mha.out_proj.weight.copy_(torch.tensor(np.asarray(p["out_proj"]["kernel"]).T))
        mha.out_proj.bias.copy_(torch.tensor(np.asarray(p["out_proj"]["bias"])))
    return mha.eval()


@pytest.mark.parametrize("batch_first", [True, False])
def test_attention_equals_torch_multihead_attention(batch_first):
    """Our combiner attention against torch.nn.MultiheadAttention with the same weights.

    batch_first=True: attention across the k modules of each example (the paper's text);
    batch_first=False: a (B, k, d) tensor read as (L=B, N=k, d), as the authors' code does,
    i.e. our ``attend_across_batch`` quirk (with a key padding mask for fill rows)."""
    from ensemble.combiner import MultiHeadSelfAttention

    b, k, d, heads = 5, 4, 16, 4
    x, _ = _inputs(b=b, k=k, d=d, seed=3)
    layer = MultiHeadSelfAttention(heads)
    params = layer.init(jax.random.PRNGKey(1), x)["params"]
    params = jax.tree_util.tree_map(  # non-zero biases, so their layout is checked too
        lambda v: v + 0.1 * jax.random.normal(jax.random.PRNGKey(2), v.shape), params)
    mha = _torch_mha(params, d, heads)
    mha.batch_first = batch_first
    xt = torch.tensor(np.asarray(x))
    keep = np.array([True, True, True, True, False])
    with torch.no_grad():
        if batch_first:
            ref, ref_w = mha(xt, xt, xt, need_weights=True, average_attn_weights=False)
            out, w = layer.apply({"params": params}, x)
        else:  # torch reads (L=B, N=k, d); key_padding_mask (N, L) is True where ignored
            pad = torch.tensor(np.broadcast_to(~keep[None, :], (k, b)).copy())
            ref, ref_w = mha(xt, xt, xt, key_padding_mask=pad, need_weights=True,
                             average_attn_weights=False)
            xs = jnp.swapaxes(x, 0, 1)  # (k, B, d)
            out, w = layer.apply({"params": params}, xs, True,
                                 jnp.broadcast_to(jnp.asarray(keep)[None, :], (k, b)))
            out = jnp.swapaxes(out, 0, 1)
    np.testing.assert_allclose(np.asarray(out), ref.numpy(), atol=1e-5)
    np.testing.assert_allclose(np.asarray(w), ref_w.numpy(), atol=1e-6)


def test_feature_cache_key_covers_tokenizer_model_content_and_padding(tmp_path):
    """Two tokenizers, two sets of weights at one path, or two padded lengths must never share
    cached features."""
    from types import SimpleNamespace

    from transformers import AutoTokenizer

    from ensemble.features import feature_settings
    from lora_jax.synthetic import build_wordpiece

    build_wordpiece(["a good film", "a bad plot"], str(tmp_path / "t1"))
    build_wordpiece(["a good film", "a bad plot", "a dull ending"], str(tmp_path / "t2"))
    tok1 = AutoTokenizer.from_pretrained(str(tmp_path / "t1"))
    tok2 = AutoTokenizer.from_pretrained(str(tmp_path / "t2"))
    params, adapters, heads, _ = _modules()
    stacked, h = with_base_slot(stack_trees(adapters)), stack_heads(heads)
    config = SimpleNamespace(
        combiner=SimpleNamespace(output="hidden", agg1="mean", base_pooling="mean"),
        quirks=SimpleNamespace(count_padding=True), dtype="float32")
    key = lambda tok=tok1, p=params, pad=(32,): feature_settings(config, p, tok, stacked, h,
                                                                 ["a", "b", "c"], 32, pad)
    assert key() == key()
    assert key(tok=tok2)["tokenizer"] != key()["tokenizer"]
    other = jax.tree_util.tree_map(lambda x: x + 1e-3, params)  # same path, other weights
    assert key(p=other)["model"] != key()["model"]
    assert key(pad=(16, 32)) != key()


def test_module_saved_without_alpha_gets_its_recorded_alpha():
    from ensemble.modules import with_alpha

    _, adapters, _, _ = _modules()

    def strip(node):  # modules saved before adapters carried alpha had none
        if not isinstance(node, dict):
            return node
        return {k: strip(v) for k, v in node.items() if k != "alpha"}

    filled = with_alpha(strip(adapters[0]), 32.0)
    assert {float(a) for a in lora.adapter_alphas(filled).values()} == {32.0}
    kept = with_alpha(adapters[0], 32.0)  # an adapter with its own alpha keeps it
    assert {float(a) for a in lora.adapter_alphas(kept).values()} == {2.0}


def layer_norm(x, eps=1e-6):
    """flax's LayerNorm at its initial scale 1 and bias 0."""
    x = np.asarray(x, np.float64)
    return (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + eps)


def test_average_and_scalar_combiners_compute_their_formulas():
    rng = np.random.default_rng(0)
    modules = jnp.asarray(rng.normal(size=(5, 3, 8)), jnp.float32)
    base = jnp.asarray(rng.normal(size=(5, 8)), jnp.float32)
    avg = MixCombiner(num_classes=4)
    p = avg.init(jax.random.PRNGKey(0), modules, base)
    w, b = p["params"]["classifier"]["kernel"], p["params"]["classifier"]["bias"]
    np.testing.assert_allclose(avg.apply(p, modules, base), layer_norm(modules.mean(1)) @ w + b,
                               atol=1e-5)
    logits, attention = avg.apply(p, modules, base, return_attention=True)
    assert attention is None and logits.shape == (5, 4)
    np.testing.assert_allclose(avg.apply(p, modules, base + 100.0), logits, atol=1e-5)  # no base

    mix = MixCombiner(num_classes=4, learned_weights=True)
    p = mix.init(jax.random.PRNGKey(0), modules, base)
    assert module_weights(p) == [0.25] * 4  # a plain mean over the 3 modules and the base
    theta = jnp.asarray([2.0, -1.0, 0.5, 0.0])
    p = {"params": {**p["params"], "module_logits": theta}}
    weights = np.exp(theta) / np.exp(theta).sum()
    mixed = np.einsum("m,bmd->bd", weights, np.concatenate([modules, base[:, None]], 1))
    w, b = p["params"]["classifier"]["kernel"], p["params"]["classifier"]["bias"]
    np.testing.assert_allclose(mix.apply(p, modules, base), layer_norm(mixed) @ w + b,
                               atol=1e-5)
    np.testing.assert_allclose(module_weights(p), weights, atol=1e-5)
    assert module_weights(AttEnsCombiner(4).init(jax.random.PRNGKey(0), modules, base)) is None
