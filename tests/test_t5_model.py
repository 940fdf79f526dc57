"""Flax T5 against transformers' PyTorch T5 (v1.0 and v1.1 on small random configs): encoder
states and teacher-forced logits (1e-4), greedy tokens equal `generate`, cached decoding equals
uncached, beam search against `generate(num_beams=...)`, and the HF name map round trip."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from t5_hybrid.config import T5Config
from t5_hybrid.generate import (
    beam_search,
    greedy_search,
    grow_self_cache,
    make_generate,
    segment_ends,
    strip_after_eos,
)
from t5_hybrid.hf_import import convert_state_dict, hf_name_map, to_hf_state_dict
from t5_hybrid.model import (
    T5ForConditionalGeneration,
    read_cache_rows,
    relative_position_bucket,
)

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

SMALL = dict(vocab_size=97, d_model=32, d_kv=8, d_ff=40, num_layers=2, num_decoder_layers=3,
             num_heads=4, relative_attention_num_buckets=8, relative_attention_max_distance=20,
             dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
VARIANTS = {"v1.0": dict(feed_forward_proj="relu", tie_word_embeddings=True),
            "v1.1": dict(feed_forward_proj="gated-gelu", tie_word_embeddings=False)}


def _torch_t5(variant: str, seed: int = 0):
    torch.manual_seed(seed)
    model = transformers.T5ForConditionalGeneration(
        transformers.T5Config(**SMALL, **VARIANTS[variant]))
    return model.eval()


def _flax(torch_model):
    cfg = T5Config.from_hf(torch_model.config.to_dict())
    state = {k: v.detach().numpy() for k, v in torch_model.state_dict().items()}
    params = jax.tree_util.tree_map(jnp.asarray, convert_state_dict(state, cfg))
    return T5ForConditionalGeneration(cfg), {"params": params}


def _inputs(batch=3, length=10, vocab=97, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(2, vocab, (batch, length))
    mask = np.ones((batch, length), np.int64)
    mask[1, 6:] = 0
    mask[2, 3:] = 0
    ids[mask == 0] = 0
    return ids, mask


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_encoder_and_teacher_forced_logits_match_torch(variant):
    tm = _torch_t5(variant)
    model, variables = _flax(tm)
    ids, mask = _inputs()
    dec = np.random.default_rng(1).integers(2, 97, (3, 7))
    dec[:, 0] = 0
    with torch.no_grad():
        out = tm(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                 decoder_input_ids=torch.tensor(dec))
    states, _ = model.apply(variables, jnp.asarray(ids), jnp.asarray(mask), method=model.encode)
    valid = mask.astype(bool)
    np.testing.assert_allclose(np.asarray(states)[valid],
                               out.encoder_last_hidden_state.numpy()[valid], atol=1e-4)
    logits = model.apply(variables, jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(dec))
    np.testing.assert_allclose(np.asarray(logits), out.logits.numpy(), atol=1e-4, rtol=1e-4)


def test_segment_ends_split_the_decoding_loop_evenly():
    assert segment_ends(64) == [16, 32, 48, 64]
    assert segment_ends(50) == [17, 34, 50]
    assert segment_ends(40) == [20, 40]
    assert segment_ends(12) == [12] and segment_ends(1) == [1]
    assert segment_ends(1000)[-1] == 1000 and len(segment_ends(1000)) == 4


def test_decoding_through_a_growing_cache_matches_teacher_forcing():
    """One position at a time with the self-attention cache grown from 4 to 10 positions after
    step 3 (as the segmented loop does): every step's logits equal the uncached decoder's."""
    model, variables = _flax(_torch_t5("v1.1", seed=11))
    ids, mask = (jnp.asarray(a) for a in _inputs(seed=12))
    states, enc_mask = model.apply(variables, ids, mask, method=model.encode)
    dec = np.random.default_rng(13).integers(2, 97, (3, 10))
    dec[:, 0] = 0
    full, _ = model.apply(variables, jnp.asarray(dec), states, enc_mask, method=model.decode)
    cache = model.apply(variables, states, 0, method=model.init_cache)
    for i in range(10):
        if i in (0, 4):
            cache = grow_self_cache(cache, 4 if i == 0 else 10)
        logits, cache = model.apply(variables, jnp.asarray(dec[:, i:i + 1]), states, enc_mask,
                                    cache=cache, cache_index=i, method=model.decode)
        np.testing.assert_allclose(np.asarray(logits[:, 0]), np.asarray(full[:, i]), atol=1e-5,
                                   err_msg=f"position {i}")


def test_a_row_table_reads_the_cache_as_reordering_it_would():
    """Beam search's row table (`read_cache_rows`): each step's logits equal those of a cache
    whose rows are physically reordered the same way, through reorders with repeated and
    dropped rows and a cache growth."""
    rng = np.random.default_rng(21)
    cache = rng.standard_normal((4, 2, 5, 3)).astype(np.float32)
    rows = rng.integers(0, 4, (4, 5))
    expected = np.stack([np.stack([cache[rows[b, t], :, t] for t in range(5)], 1)
                         for b in range(4)])
    np.testing.assert_array_equal(np.asarray(read_cache_rows(jnp.asarray(cache),
                                                             jnp.asarray(rows))), expected)

    model, variables = _flax(_torch_t5("v1.1", seed=11))
    ids, mask = (jnp.asarray(a) for a in _inputs(seed=12))
    states, enc_mask = model.apply(variables, ids, mask, method=model.encode)
    n = states.shape[0]
    moved = model.apply(variables, states, 0, method=model.init_cache)
    tabled = {**moved, "rows": jnp.zeros((n, 0), jnp.int32)}
    dec = rng.integers(2, 97, (n, 8))
    for i in range(8):
        if i in (0, 5):
            moved, tabled = (grow_self_cache(c, 5 if i == 0 else 8) for c in (moved, tabled))
        step = jnp.asarray(dec[:, i:i + 1])
        ours, tabled = model.apply(variables, step, states, enc_mask, cache=tabled,
                                   cache_index=i, method=model.decode)
        ref, moved = model.apply(variables, step, states, enc_mask, cache=moved,
                                 cache_index=i, method=model.decode)
        np.testing.assert_allclose(np.asarray(ours), np.asarray(ref), atol=1e-6,
                                   err_msg=f"step {i}")
        parents = jnp.asarray(rng.integers(0, n, n))  # beams reselected, some twice
        moved = {**moved, "self": jax.tree_util.tree_map(lambda c, p=parents: c[p], moved["self"])}
        tabled = {**tabled, "rows": tabled["rows"][parents]}


@pytest.mark.parametrize("variant,n", [("v1.0", 12), ("v1.1", 12), ("v1.1", 40)])
def test_greedy_matches_transformers_generate_and_cache_matches_no_cache(variant, n):
    """n = 40: two loop segments, the self-attention cache growing from 20 to 40 positions."""
    tm = _torch_t5(variant, seed=3)
    model, variables = _flax(tm)
    ids, mask = _inputs(seed=4)
    with torch.no_grad():
        ref = tm.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                          max_new_tokens=n, do_sample=False, num_beams=1,
                          use_cache=False).numpy()[:, 1:]
    cached = np.asarray(make_generate(model, n)(variables, jnp.asarray(ids), jnp.asarray(mask)))
    uncached = np.asarray(greedy_search(model, variables, jnp.asarray(ids), jnp.asarray(mask), n,
                                        use_cache=False))
    np.testing.assert_array_equal(cached, uncached)
    ref = np.pad(ref, ((0, 0), (0, n - ref.shape[1])))  # HF stops when every row has ended
    np.testing.assert_array_equal(cached, ref)
    first = segment_ends(n)[0]  # with two segments, a row must decode past the first
    assert first == n or (cached[:, first:] != 0).any()


def test_greedy_stops_at_eos_and_pads_after_it():
    tm = _torch_t5("v1.1", seed=5)
    model, variables = _flax(tm)
    ids, mask = (jnp.asarray(a) for a in _inputs(seed=6))
    free = np.asarray(greedy_search(model, variables, ids, mask, 9))
    # declare the third token of row 0 the EOS: each row must stop at its first occurrence
    eos = int(free[0, 2])
    stopping = T5ForConditionalGeneration(dataclasses.replace(model.config, eos_token_id=eos))
    tokens = np.asarray(make_generate(stopping, 9)(variables, ids, mask))
    for row, free_row in zip(tokens.tolist(), free.tolist(), strict=True):
        end = free_row.index(eos) + 1 if eos in free_row else 9
        assert row == free_row[:end] + [0] * (9 - end)
    assert tokens[0, 3:].tolist() == [0] * 6
    assert strip_after_eos(np.asarray([[5, 6, 1, 0], [7, 0, 0, 0]]), 1, 0) == [[5, 6], [7]]


@pytest.mark.parametrize("variant,n", [("v1.0", 8), ("v1.1", 8), ("v1.1", 40)])
def test_beam_search_matches_transformers_and_cache(variant, n):
    tm = _torch_t5(variant, seed=7)
    model, variables = _flax(tm)
    ids, mask = _inputs(seed=8)
    k = 3
    with torch.no_grad():
        ref = tm.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                          max_new_tokens=n, num_beams=k, do_sample=False, length_penalty=1.0,
                          early_stopping=True, use_cache=False).numpy()[:, 1:]
    ours = np.asarray(make_generate(model, n, num_beams=k)(variables, jnp.asarray(ids),
                                                           jnp.asarray(mask)))
    uncached = np.asarray(beam_search(model, variables, jnp.asarray(ids), jnp.asarray(mask), n,
                                      k, use_cache=False))
    np.testing.assert_array_equal(ours, uncached)
    assert strip_after_eos(ours, 1, 0) == strip_after_eos(ref, 1, 0)
    first = segment_ends(n)[0]  # with two segments, a hypothesis must run past the first
    assert first == n or (ours[:, first:] != 0).any()


def test_one_beam_is_greedy():
    model, variables = _flax(_torch_t5("v1.1", seed=9))
    ids, mask = (jnp.asarray(a) for a in _inputs(seed=10))
    np.testing.assert_array_equal(beam_search(model, variables, ids, mask, 6, 1),
                                  greedy_search(model, variables, ids, mask, 6))


def test_relative_position_bucket_matches_torch():
    from transformers.models.t5.modeling_t5 import T5Attention

    rel = np.arange(-200, 200)[None, :]
    for bidirectional in (True, False):
        ref = T5Attention._relative_position_bucket(torch.tensor(rel), bidirectional, 32, 128)
        ours = relative_position_bucket(jnp.asarray(rel), bidirectional, 32, 128)
        np.testing.assert_array_equal(np.asarray(ours), ref.numpy())


def test_hf_state_dict_round_trip_and_name_map_covers_torch():
    tm = _torch_t5("v1.1")
    model, variables = _flax(tm)
    cfg = model.config
    names = set(tm.state_dict()) - {"encoder.embed_tokens.weight", "decoder.embed_tokens.weight"}
    assert set(hf_name_map(cfg)) == names
    back = to_hf_state_dict(variables["params"], cfg)
    for name, value in back.items():
        np.testing.assert_array_equal(value, tm.state_dict()[name].numpy())


def test_bfloat16_compute_is_close_to_float32():
    tm = _torch_t5("v1.1")
    model, variables = _flax(tm)
    bf16 = T5ForConditionalGeneration(model.config, dtype=jnp.bfloat16)
    ids, mask = (jnp.asarray(a) for a in _inputs())
    dec = jnp.zeros((3, 4), jnp.int32)
    ref = model.apply(variables, ids, mask, dec)
    low = bf16.apply(variables, ids, mask, dec)
    assert low.dtype == jnp.float32  # logits come back in float32
    assert float(jnp.max(jnp.abs(low - ref))) < 0.1 * float(jnp.max(jnp.abs(ref)))


def test_bf16_stored_weights_run_the_fp32_model_and_give_close_logits():
    """param_dtype=bfloat16 as `trainer.run_experiment` applies it: the pretrained weights are
    stored in bf16, the compute stays fp32 (logits fp32), the logits move by bf16 rounding only."""
    from lora_jax.lora import frozen_in_dtype

    model, variables = _flax(_torch_t5("v1.1"))
    ids, mask = _inputs(seed=3)
    dec = np.asarray(ids)[:, :5]
    stored = frozen_in_dtype(variables, jnp.bfloat16)
    assert {x.dtype for x in jax.tree_util.tree_leaves(stored["params"])} == {jnp.dtype("bfloat16")}
    full = model.apply(variables, ids, mask, dec)
    half = model.apply(stored, ids, mask, dec)
    assert half.dtype == jnp.float32
    scale = float(jnp.abs(full).max())
    diff = float(jnp.abs(half - full).max())
    assert 0 < diff < 0.05 * scale, (diff, scale)
