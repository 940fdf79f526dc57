"""Generation speed of the Flax T5 against transformers' PyTorch `generate` (with its cache):
greedy and beam search, same random model, batch and lengths, one run.

    python -m benchmarks.t5_generate --batch 16 --source 64 --new 64 --beams 4

The model is a random T5 v1.1 (d_model 256, 4+4 layers, 32128-token vocabulary: the FLAN-T5
embedding size); EOS is disabled so every call decodes exactly `--new` tokens. Timed after
warm-up (JAX compilation excluded) in alternating rounds; medians of generated tokens/s (beam
search: tokens of the returned sequences, batch * new), and each side's FLOP/s
(`roofline.t5_decode_flops`) as a fraction of a large GEMM's rate measured in the same run.
Decoding a batch of 16 does about as few FLOPs per byte it reads as the machine's balance
(GEMM rate over memory rate): expect small fractions of the GEMM rate. The memory roofline:
the least bytes a cached decode must read (`roofline.t5_decode_bytes`: the decoder weights and
LM head every step, the K/V caches) over the same calls, as a fraction of the rate of reading a
large array measured in the same run.
Greedy decoding without the KV cache is checked to give the same tokens (not timed).
"""

from __future__ import annotations

import sys

import numpy as np

from benchmarks.common import alternating_rounds, comparison, emit_measured, require_positive
from benchmarks.roofline import (
    best_gemm_rate,
    best_memory_rate,
    gemm_fields,
    gemm_rates,
    memory_fields,
    memory_rates,
    t5_decode_bytes,
    t5_decode_flops,
)
from lora_jax.cli import ArgumentParser, fail

CONFIG = dict(vocab_size=32128, d_model=256, d_kv=32, d_ff=1024, num_layers=4,
              num_decoder_layers=4, num_heads=8, feed_forward_proj="gated-gelu",
              tie_word_embeddings=False, dropout_rate=0.0, eos_token_id=32127,
              pad_token_id=0, decoder_start_token_id=0)


def random_t5(config: dict = CONFIG, **model_kwargs):
    """(transformers model in eval mode, our config, our model, our variables), same weights;
    `model_kwargs` go to our `T5ForConditionalGeneration` (lora_dropout, dtype)."""
    import jax
    import jax.numpy as jnp
    import torch
    import transformers

    from t5_hybrid.config import T5Config
    from t5_hybrid.hf_import import convert_state_dict
    from t5_hybrid.model import T5ForConditionalGeneration

    torch.manual_seed(0)
    tm = transformers.T5ForConditionalGeneration(transformers.T5Config(**config)).eval()
    cfg = T5Config.from_hf(tm.config.to_dict())
    params = convert_state_dict({k: v.numpy() for k, v in tm.state_dict().items()}, cfg)
    variables = {"params": jax.tree_util.tree_map(jnp.asarray, params)}
    return tm, cfg, T5ForConditionalGeneration(cfg, **model_kwargs), variables


def measure(batch: int, source: int, new: int, rounds: int, beams: int = 4,
            dtype: str = "float32", gemm_size: int = 2048) -> dict:
    """The benchmark's figures (see the module docstring): one comparison for greedy decoding
    and one for beam search with `beams` beams. PyTorch runs on CUDA when there is one, its
    model cast to bf16 when `dtype` is bfloat16; `gemm_size` is the side of the roofline's
    square matmul."""
    import jax
    import jax.numpy as jnp
    import torch

    from lora_jax.lora import DTYPES
    from t5_hybrid.generate import make_generate

    gemm, memory = [gemm_rates(dtype, gemm_size)], [memory_rates()]
    tm, cfg, model, variables = random_t5(dtype=DTYPES[dtype])
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tm = tm.to(device, getattr(torch, dtype))
    rng = np.random.default_rng(0)
    ids = rng.integers(2, 32000, (batch, source))
    mask = np.ones_like(ids)
    jids, jmask = jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32)
    tids, tmask = (torch.tensor(x, device=device) for x in (ids, mask))
    ours = {n: make_generate(model, new, num_beams=n) for n in (1, beams)}

    def theirs(n):
        out = tm.generate(input_ids=tids, attention_mask=tmask, max_new_tokens=new,
                          min_new_tokens=new, do_sample=False, num_beams=n,
                          **(dict(length_penalty=1.0, early_stopping=True) if n > 1 else {}))
        return out.cpu()  # waits for the GPU

    runs = {}
    for n in (1, beams):
        runs[f"jax_{n}"] = lambda n=n: jax.block_until_ready(ours[n](variables, jids, jmask))
        runs[f"torch_{n}"] = lambda n=n: theirs(n)
    with torch.no_grad():
        first = {k: np.asarray(f()) for k, f in runs.items()}  # warm-up (and compile)
        uncached = make_generate(model, new, use_cache=False)(variables, jids, jmask)
        np.testing.assert_array_equal(first["jax_1"], np.asarray(uncached))
        seconds = alternating_rounds(runs, rounds)
    gemm.append(gemm_rates(dtype, gemm_size))
    memory.append(memory_rates())
    rows = []
    for n in (1, beams):
        flops = t5_decode_flops(batch, source, new, cfg.d_model, cfg.num_heads * cfg.d_kv,
                                cfg.d_ff, cfg.num_layers, cfg.num_decoder_layers,
                                cfg.vocab_size, beams=n)
        what = "T5 greedy decoding" if n == 1 else f"T5 beam search, {n} beams"
        row = comparison(f"{what}, batch {batch}, {source} + {new} tokens", "tokens/s",
                         batch * new, seconds[f"jax_{n}"], seconds[f"torch_{n}"],
                         ours_label=f"JAX {dtype}, KV cache",
                         peer_label=f"transformers generate, {dtype}",
                         flops=flops, gemm_flops_per_s=best_gemm_rate(gemm),
                         bytes_moved=t5_decode_bytes(
                             batch, source, new, cfg.d_model, cfg.num_heads * cfg.d_kv,
                             cfg.d_ff, cfg.num_decoder_layers, cfg.vocab_size, beams=n,
                             itemsize=jnp.dtype(DTYPES[dtype]).itemsize),
                         memory_bytes_per_s=best_memory_rate(memory))
        # theirs starts with the decoder start token
        row["same_tokens_as_transformers"] = bool(np.array_equal(first[f"jax_{n}"],
                                                                 first[f"torch_{n}"][:, 1:]))
        rows.append(row)
    return {"benchmark": "t5_generation", "config": CONFIG, "dtype": dtype, "batch": batch,
            "source_tokens": source, "new_tokens": new, "beams": beams, "rounds": rounds,
            "comparisons": rows, **gemm_fields(gemm), **memory_fields(memory)}


def main() -> int:
    p = ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--source", type=int, default=64, help="source tokens")
    p.add_argument("--new", type=int, default=64, help="generated tokens")
    p.add_argument("--beams", type=int, default=4, help="beams of the beam-search comparison")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--out", default="")
    a = p.parse_args()
    require_positive(a, "batch", "source", "new", "rounds")
    if a.beams < 2:
        fail(f"--beams must be >= 2 (1 is the greedy comparison), got {a.beams}")
    emit_measured(measure(a.batch, a.source, a.new, a.rounds, a.beams, a.dtype), a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
