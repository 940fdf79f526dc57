"""The machine's limits that the benchmarks report against, measured in the same run: a large
GEMM's rate for every benchmark, with the FLOPs of the work being timed, and (decoding, which
reads every weight once per token for only a few rows) the rate of reading a large array from
memory, with the least bytes the work must read.

    achieved FLOP/s = flops_per_step * steps / seconds;  fraction = achieved / gemm_rate
    achieved B/s    = bytes_per_call * calls / seconds;  fraction = achieved / memory_rate
"""

from __future__ import annotations

import time

import numpy as np


def _median_seconds(fn, rounds: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def gemm_rates(dtype: str = "float32", size: int = 2048, rounds: int = 5) -> dict[str, float]:
    """FLOP/s of a (size x size) @ (size x size) matmul (2 * size**3 FLOPs) in JAX (jitted, with
    this process's XLA flags) and in PyTorch, on the default device, medians of `rounds` calls.
    The machine's rate is the larger: neither library's choice of GEMM kernel sets the bar."""
    import jax
    import jax.numpy as jnp

    key_a, key_b = jax.random.split(jax.random.PRNGKey(0))
    a = jax.random.normal(key_a, (size, size), jnp.dtype(dtype))
    b = jax.random.normal(key_b, (size, size), jnp.dtype(dtype))
    matmul = jax.jit(jnp.dot)
    rates = {"jax": 2.0 * size**3 / _median_seconds(
        lambda: matmul(a, b).block_until_ready(), rounds)}
    try:
        import torch
    except ImportError:
        return rates
    device = "cuda" if torch.cuda.is_available() else "cpu"
    ta, tb = (torch.tensor(np.asarray(x, np.float32), device=device).to(getattr(torch, dtype))
              for x in (a, b))

    def torch_matmul():
        torch.matmul(ta, tb)
        if device == "cuda":
            torch.cuda.synchronize()

    rates["torch"] = 2.0 * size**3 / _median_seconds(torch_matmul, rounds)
    return rates


def memory_rates(megabytes: int = 256, rounds: int = 5) -> dict[str, float]:
    """Bytes/s of reading a float32 array of `megabytes` (far larger than any cache) once: a
    jitted sum in JAX and `torch.sum` in PyTorch, on the default device, medians of `rounds`
    calls. The machine's rate is the larger, as in `gemm_rates`."""
    import jax
    import jax.numpy as jnp

    n = megabytes * 2**20 // 4
    x = jnp.ones((n,), jnp.float32)
    total = jax.jit(jnp.sum)
    rates = {"jax": 4.0 * n / _median_seconds(lambda: total(x).block_until_ready(), rounds)}
    try:
        import torch
    except ImportError:
        return rates
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tx = torch.ones(n, dtype=torch.float32, device=device)
    rates["torch"] = 4.0 * n / _median_seconds(lambda: float(tx.sum()), rounds)
    return rates


def lora_encoder_step_flops(batch: int, length: int, hidden: int, intermediate: int,
                            layers: int, rank: int,
                            adapted: tuple[str, ...] = ("query", "key", "value"),
                            last_layer_rows: int | None = None) -> float:
    """FLOPs of one train step of a frozen encoder with LoRA adapters on the `adapted` ones of
    the query, key and value projections of every layer (matmuls only; the embeddings frozen).

    A layer computes R rows per example past its keys and values: R = T = length, except the
    last layer when `last_layer_rows` is set (1 when the head reads [CLS] only, `Encoder`'s
    ``cls_only``; PyTorch computes every row). With N = batch * T tokens, M = batch * R rows,
    d = hidden, f = intermediate, per layer:
      forward dense      2 N 2 d^2 + 2 M (2 d^2 + 2 d f)   k, v; q, attention output, FFN
      forward attention  2 * 2 B R T d                     Q K^T and P V over all heads
      backward dense     the same as forward dense         activation gradients only:
                                                           dX = dY W^T; frozen kernels get no
                                                           weight gradient
      backward attention 4 * 2 B R T d                     dP, dV, dQ, dK
      LoRA (each adapted d x d module over its rows: N for k and v, M for q)
                         6 * 2 rows r d                    forward x A and (x A) B; backward
                                                           dB, d(x A), dA and dx
    The first layer's input (the frozen embeddings) needs no gradient: its backward has no
    dX = dY W^T for q, k and v and its adapters no dx (2 rows r d each).
    Elementwise work (softmax, LayerNorm, GELU, dropout) and the pooler and head are not
    counted (tests/test_benchmarks.py checks the sum against the matmuls of the step's jaxpr).
    """
    unknown = set(adapted) - {"query", "key", "value"}
    if unknown:
        raise ValueError(f"adapted modules {sorted(unknown)} are not query, key or value")
    d, f, n = hidden, intermediate, batch * length
    total = 0.0
    for i in range(layers):
        m = batch * (last_layer_rows if last_layer_rows and i == layers - 1 else length)
        rows = {"query": m, "key": n, "value": n}
        forward_dense = 2 * n * 2 * d * d + 2 * m * (2 * d * d + 2 * d * f)
        attention = (2 + 4) * 2 * m * length * d
        lora = sum(6 * 2 * rows[name] * rank * d for name in adapted)
        total += 2 * forward_dense + attention + lora
        if i == 0:  # no gradient for the frozen embeddings
            total -= 2 * d * d * sum(rows.values())
            total -= sum(2 * rows[name] * rank * d for name in adapted)
    return float(total)


def encoder_forward_flops(batch: int, length: int, hidden: int, intermediate: int,
                          layers: int, last_layer_rows: int | None = None) -> float:
    """FLOPs of one forward pass of an encoder (matmuls only; the forward terms of
    `lora_encoder_step_flops`, LoRA's few left out): per layer 2 N 2 d^2 + 2 M (2 d^2 + 2 d f)
    + 2 * 2 B R T d with N = batch * T tokens and M = batch * R rows, R = T except the last
    layer when `last_layer_rows` is set (1 for `Encoder`'s ``cls_only``)."""
    d, f, n = hidden, intermediate, batch * length
    total = 0.0
    for i in range(layers):
        rows = last_layer_rows if last_layer_rows and i == layers - 1 else length
        m = batch * rows
        total += 2 * n * 2 * d * d + 2 * m * (2 * d * d + 2 * d * f) + 4 * m * length * d
    return float(total)


def t5_decode_flops(batch: int, source: int, new: int, d_model: int, inner: int, d_ff: int,
                    enc_layers: int, dec_layers: int, vocab: int, beams: int = 1,
                    gated: bool = True) -> float:
    """FLOPs of encoding `source` tokens once per example and decoding `new` tokens for each of
    `beams` hypotheses with a KV cache (greedy: beams = 1; matmuls only; inner = heads * d_kv,
    one FFN input matmul more when gated).

      encoder, per source token and layer   2 (4 d inner + m d ff) + 2 * 2 S inner
      cross K/V, per source token and layer 2 * 2 d inner           (once per example)
      decoder, per new token, hypothesis    2 (6 d inner + m d ff)  self q,k,v,o; cross q,o
        and layer                           + 2 * 2 (t + S) inner   attention over cache
      LM head, per new token and hypothesis 2 d vocab
    with m = 3 for gated FFNs, 2 otherwise; t runs over 1..new.
    """
    m = 3 if gated else 2
    enc = batch * source * enc_layers * (2 * (4 * d_model * inner + m * d_model * d_ff)
                                         + 4 * source * inner)
    cross_kv = batch * source * dec_layers * 4 * d_model * inner
    steps = sum(2 * (6 * d_model * inner + m * d_model * d_ff) + 4 * (t + source) * inner
                for t in range(1, new + 1))
    dec = batch * beams * (dec_layers * steps + new * 2 * d_model * vocab)
    return float(enc + cross_kv + dec)


def t5_decode_bytes(batch: int, source: int, new: int, d_model: int, inner: int, d_ff: int,
                    dec_layers: int, vocab: int, beams: int = 1, gated: bool = True,
                    itemsize: int = 4) -> float:
    """The least bytes that decoding `new` tokens for each of `beams` hypotheses with a KV cache
    must read from memory, when nothing stays in cache from one step to the next (the LM head
    alone, d * vocab, is larger than these machines' caches). Per new token t = 1..new:

      every decoder weight used at a step   dec_layers (6 d inner + m d ff)   (m as in
                                                                               `t5_decode_flops`)
      the LM head                           d vocab
      cross K/V, once per example           dec_layers * 2 B S inner          (shared by beams)
      self K/V of each hypothesis' prefix   dec_layers * 2 B beams t inner

    times `itemsize` bytes. The encoder (run once, bound by arithmetic), activations, logits
    and beam bookkeeping are not counted, so the true traffic is larger than this."""
    m = 3 if gated else 2
    weights = dec_layers * (6 * d_model * inner + m * d_model * d_ff) + d_model * vocab
    cross = dec_layers * 2 * batch * source * inner
    self_kv = sum(dec_layers * 2 * batch * beams * t * inner for t in range(1, new + 1))
    return float(itemsize * (new * (weights + cross) + self_kv))


def best_memory_rate(measured: list[dict[str, float]]) -> float:
    """The machine's memory rate: the best of the `memory_rates` measurements of a run, B/s."""
    return max(rate for rates in measured for rate in rates.values())


def memory_fields(measured: list[dict[str, float]]) -> dict:
    """The memory-rate measurements of a run as recorded in its JSON (GB/s)."""
    return {"memory_gbytes_per_s": best_memory_rate(measured) / 1e9,
            "memory_gbytes_per_s_measured": [{k: v / 1e9 for k, v in r.items()}
                                             for r in measured]}


def t5_train_step_flops(batch: int, source: int, target: int, d_model: int, inner: int,
                        d_ff: int, enc_layers: int, dec_layers: int, vocab: int, rank: int,
                        gated: bool = True) -> float:
    """FLOPs of one teacher-forced train step of a frozen T5 with LoRA on q and v of every
    attention (matmuls only). `source` counts the soft-prompt tokens too. With Ne = B S encoder
    tokens, Nd = B T decoder tokens and m as in `t5_decode_flops`, forward:

      encoder layer   2 Ne (4 d inner + m d ff) + 2 * 2 B S^2 inner
      decoder layer   2 Nd (6 d inner + m d ff) + 2 Ne (2 d inner)     cross K/V of the encoder
                      + 2 * 2 B T^2 inner + 2 * 2 B T S inner          self and cross attention
      LM head         2 Nd d vocab
    Backward: activation gradients only (dX = dY W^T, as many FLOPs as the forward matmul; no
    weight gradient for frozen kernels), two for each attention matmul (dP and dV, dQ and dK).
    LoRA, per adapted (d -> inner) projection over N tokens: 3 * 2 N r (d + inner).
    The first decoder layer's input (the frozen embeddings of the shifted labels) needs no
    gradient: no dX for its self-attention q, k and v (-3 * 2 Nd d inner), no dK (its keys get
    no adapter: -2 B T^2 inner) and no dx for its two adapters (-2 * 2 Nd r d). The encoder's
    input does need one: the soft prompt is trained. tests/test_benchmarks.py checks the sum
    against the matmuls of the step's jaxpr.
    """
    m = 3 if gated else 2
    ne, nd, b, s, t = batch * source, batch * target, batch, source, target
    dense = (enc_layers * 2 * ne * (4 * d_model * inner + m * d_model * d_ff)
             + dec_layers * 2 * (nd * (6 * d_model * inner + m * d_model * d_ff)
                                 + ne * 2 * d_model * inner)
             + 2 * nd * d_model * vocab)
    attention = (enc_layers * 4 * b * s * s * inner
                 + dec_layers * 4 * b * (t * t + t * s) * inner)
    adapted_tokens = enc_layers * 2 * ne + dec_layers * (2 * nd + nd + ne)  # self q,v; cross q,v
    lora = adapted_tokens * 3 * 2 * rank * (d_model + inner)
    first_decoder_input_grad = (3 * 2 * nd * d_model * inner + 2 * b * t * t * inner
                                + 2 * 2 * nd * rank * d_model)
    return float(2 * dense + 3 * attention + lora - first_decoder_input_grad)


def best_gemm_rate(gemm: list[dict[str, float]]) -> float:
    """The machine's rate: the best of the `gemm_rates` measurements taken in a run (each
    library, before and after the timed rounds), FLOP/s."""
    return max(rate for rates in gemm for rate in rates.values())


def gemm_fields(gemm: list[dict[str, float]]) -> dict:
    """The GEMM measurements of a run as recorded in its JSON (GFLOP/s)."""
    return {"gemm_gflops": best_gemm_rate(gemm) / 1e9,
            "gemm_gflops_measured": [{k: v / 1e9 for k, v in r.items()} for r in gemm]}
