"""Greedy generation speed of the Flax T5: KV cache vs no cache vs transformers' PyTorch
`generate` (with its cache), same random model, batch and lengths, one run.

    python -m benchmarks.t5_generate --batch 16 --source 64 --new 64 \
        --out results/bench_t5_generate_cpu.json

The model is a random T5 v1.1 (d_model 256, 4+4 layers, 32128-token vocabulary: the FLAN-T5
embedding size); EOS is disabled so every call decodes exactly `--new` tokens. Timed after
warm-up (JAX compilation excluded) in alternating rounds; medians of generated tokens/s, and
each side's FLOP/s (`roofline.t5_greedy_flops`) as a fraction of a large GEMM's rate measured in
the same run. Decoding a batch of 16 is bound by memory, not arithmetic: expect small fractions.
"""

from __future__ import annotations

import sys
import time

import numpy as np

from benchmarks.common import emit, environment
from benchmarks.roofline import gemm_rates, roofline_fields, t5_greedy_flops
from lora_jax.cli import ArgumentParser

CONFIG = dict(vocab_size=32128, d_model=256, d_kv=32, d_ff=1024, num_layers=4,
              num_decoder_layers=4, num_heads=8, feed_forward_proj="gated-gelu",
              tie_word_embeddings=False, dropout_rate=0.0, eos_token_id=32127,
              pad_token_id=0, decoder_start_token_id=0)


def timed(fn, tokens: int) -> float:
    t0 = time.perf_counter()
    fn()
    return tokens / (time.perf_counter() - t0)


def measure(batch: int, source: int, new: int, rounds: int) -> dict:
    """The benchmark's figures (see the module docstring) as a dict."""
    import jax
    import jax.numpy as jnp
    import torch
    import transformers

    from t5_hybrid.config import T5Config
    from t5_hybrid.generate import make_generate
    from t5_hybrid.hf_import import convert_state_dict
    from t5_hybrid.model import T5ForConditionalGeneration

    gemm_before = gemm_rates()
    torch.manual_seed(0)
    tm = transformers.T5ForConditionalGeneration(transformers.T5Config(**CONFIG)).eval()
    cfg = T5Config.from_hf(tm.config.to_dict())
    params = convert_state_dict({k: v.numpy() for k, v in tm.state_dict().items()}, cfg)
    variables = {"params": jax.tree_util.tree_map(jnp.asarray, params)}
    model = T5ForConditionalGeneration(cfg)
    rng = np.random.default_rng(0)
    ids = rng.integers(2, 32000, (batch, source))
    mask = np.ones_like(ids)
    jids, jmask = jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32)
    cached, uncached = (make_generate(model, new, use_cache=c) for c in (True, False))
    runs = {
        "jax_cached": lambda: jax.block_until_ready(cached(variables, jids, jmask)),
        "jax_uncached": lambda: jax.block_until_ready(uncached(variables, jids, jmask)),
        "torch_generate": lambda: tm.generate(
            input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), max_new_tokens=new,
            min_new_tokens=new, do_sample=False, num_beams=1),
    }
    with torch.no_grad():
        first = {k: np.asarray(f()) for k, f in runs.items()}  # warm-up (and compile)
        np.testing.assert_array_equal(first["jax_cached"], first["jax_uncached"])
        rates = {k: [] for k in runs}
        for _ in range(rounds):
            for k, f in runs.items():
                rates[k].append(timed(f, batch * new))
    med = {k: float(np.median(v)) for k, v in rates.items()}
    ours, theirs = first["jax_cached"], first["torch_generate"][:, 1:]  # theirs: start token first
    same = ours.shape == theirs.shape and bool(np.array_equal(ours, theirs))
    gemm = [gemm_before, gemm_rates()]
    flops = t5_greedy_flops(batch, source, new, cfg.d_model, cfg.num_heads * cfg.d_kv, cfg.d_ff,
                            cfg.num_layers, cfg.num_decoder_layers, cfg.vocab_size)
    return {"benchmark": "t5_greedy_generation", "config": CONFIG, "batch": batch,
            "source_tokens": source, "new_tokens": new, "rounds": rounds,
            "tokens_per_s_rounds": {k: [round(x, 1) for x in v] for k, v in rates.items()},
            "tokens_per_s": {k: round(v, 1) for k, v in med.items()},
            "ratio_cached_over_uncached": round(med["jax_cached"] / med["jax_uncached"], 2),
            "ratio_jax_cached_over_torch": round(med["jax_cached"] / med["torch_generate"], 2),
            "same_tokens_as_transformers": same,
            **roofline_fields(flops, {k: v / (batch * new) for k, v in med.items()}, gemm)}


def main() -> int:
    p = ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--source", type=int, default=64, help="source tokens")
    p.add_argument("--new", type=int, default=64, help="generated tokens")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", default="")
    a = p.parse_args()
    emit({**measure(a.batch, a.source, a.new, a.rounds), **environment()}, a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
