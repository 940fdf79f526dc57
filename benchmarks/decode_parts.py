"""Where a T5 greedy decoding step's time goes: its matmuls, weight by weight, against PyTorch's.

    python -m benchmarks.decode_parts                  # batch 16, 64 + 64 tokens
    python -m benchmarks.decode_parts --batch 64 --out-dir results

A profile, not a target: it shows how much of the greedy row of `benchmarks.run` (T5 decoding,
`benchmarks.t5_generate`) is its matmuls, and how fast XLA:CPU runs them against PyTorch on
this machine. The model is `benchmarks.t5_generate`'s random T5 v1.1 (d_model 256, 4 decoder
layers, gated-GELU feed-forward 1024, 32128-token LM head), float32. A decoding step applies
each decoder weight to `--batch` rows (one new token per row) and reads the whole weight to do
it; per decoder layer: the self-attention q, k, v, o and the cross-attention q, o (the
cross-attention k and v of the source are computed once per call), the feed-forward wi_0,
wi_1 and wo; then the LM head once. One row per distinct weight shape, on layer 0's weights:

  ours  `LoRADense` without an adapter (the layer the model runs), `--calls` times in one
        jitted loop, each call on a changed input: as in the decode program, one compiled
        loop, no dispatch per matmul
  peer  the transformers module's own `nn.Linear` (`T5Attention.q`, ..., `lm_head`) `--calls`
        times in Python, as `generate` calls it

Each pair is checked equal (1e-4 of the output's scale) before timing. The step rows: a whole
greedy call of each side (`t5_hybrid.generate.make_generate` with its KV cache against
transformers' `generate`, `--new` tokens after a `--source`-token prompt, EOS disabled, same
tokens required) over its new tokens, so the encoder pass is spread over the steps; and each
side's matmuls per step (every part's time times its count per step) as a share of that.
Alternating rounds after warm-up, medians; the matmuls' FLOP/s as a fraction of a large GEMM's
rate measured in the same run (`benchmarks.roofline`). A part's weight stays in cache through
its loop, while a decoding step reads every weight in turn, so one more view from inside the
step: one of our greedy calls traced with `jax.profiler`, its op time per step by XLA op kind.
Writes
results/decode_parts_<machine>.json and .md.
"""

from __future__ import annotations

import os
import sys

import numpy as np

from benchmarks.common import (
    alternating_rounds,
    comparison,
    measure_and_write,
    require_positive,
)
from benchmarks.roofline import best_gemm_rate, gemm_fields, gemm_rates
from lora_jax.cli import ArgumentParser
from lora_jax.results import add_allow_dirty

# part -> (our parameter path under decoder/blocks_0 or the top level, the transformers
# module's attribute path, times per decoder layer, or None: once per step)
PARTS = {
    "attention q/k/v/o": (("decoder", "blocks_0", "self_attention", "q"),
                          "decoder.block.0.layer.0.SelfAttention.q", 6),
    "feed-forward wi_0/wi_1": (("decoder", "blocks_0", "mlp", "wi_0"),
                               "decoder.block.0.layer.2.DenseReluDense.wi_0", 2),
    "feed-forward wo": (("decoder", "blocks_0", "mlp", "wo"),
                        "decoder.block.0.layer.2.DenseReluDense.wo", 1),
    "LM head": (("lm_head",), "lm_head", None),
}


TRACED_OPS_SHOWN = 8  # op kinds of the traced call named in the .md; the others summed


def per_step(part: str, decoder_layers: int) -> int:
    """How many times a decoding step applies the weight of `part` (its shape's count)."""
    per_layer = PARTS[part][2]
    return 1 if per_layer is None else per_layer * decoder_layers


def our_matmuls(params: dict, rows: np.ndarray, calls: int):
    """A jitted fn(kernel params, x) running `LoRADense` `calls` times in one loop, each on x
    plus the loop counter (so no call can be hoisted out of the loop), returning the sum of
    the outputs' first columns."""
    import jax
    import jax.numpy as jnp

    from lora_jax.models.layers import LoRADense

    width = params["kernel"].shape[1]
    dense = LoRADense(width, use_bias=False)

    def run(params, x):
        def body(i, total):
            y = dense.apply({"params": params}, x + i.astype(x.dtype), True)
            return total + y[:, 0].sum()
        return jax.lax.fori_loop(0, calls, body, jnp.zeros((), x.dtype))

    return jax.jit(run), (params, jnp.asarray(rows))


def parts(tm, variables: dict, batch: int, calls: int) -> dict:
    """part -> (our timed fn, its args, the peer's timed fn, the largest output difference over
    the output's scale)."""
    import torch
    from flax import traverse_util

    flat = traverse_util.flatten_dict(variables["params"])
    out = {}
    for i, (part, (path, module_path, _)) in enumerate(PARTS.items()):
        params = {"kernel": flat[(*path, "kernel")]}
        module = tm.get_submodule(module_path)
        x = np.random.default_rng(i).standard_normal(
            (batch, params["kernel"].shape[0])).astype(np.float32)
        tx = torch.from_numpy(x)
        fn, args = our_matmuls(params, x, calls)
        with torch.no_grad():
            ref = module(tx).numpy()
        scale = max(float(np.abs(ref).max()), 1e-12)
        difference = float(np.abs(np.asarray(our_single(params, x)) - ref).max()) / scale
        one_call, one_args = our_matmuls(params, x, 1)  # the timed loop's work, once
        if abs(float(one_call(*one_args)) - float(ref[:, 0].sum())) > 1e-4 * scale * len(ref):
            raise AssertionError(f"{part}: our timed loop does not compute the peer's matmul")

        def peer(module=module, tx=tx):
            with torch.no_grad():
                for _ in range(calls):
                    module(tx)

        out[part] = (fn, args, peer, difference)
    return out


def our_single(params: dict, x: np.ndarray):
    """One `LoRADense` call of `params` on x (the equality check's output)."""
    from lora_jax.models.layers import LoRADense

    return LoRADense(params["kernel"].shape[1], use_bias=False).apply({"params": params}, x,
                                                                      True)


def traced_op_seconds(fn) -> dict[str, float]:
    """Seconds per op kind (XLA's op names less their numeric suffix: "ynn_fusion", "dot",
    "subtract_exponential_fusion", ...) in one call of `fn` traced with `jax.profiler`, summed
    over the threads that ran them (XLA:CPU runs independent ops side by side, so the sum can
    exceed the call's wall time). Host-side events (Python, the executor's own) are left out."""
    import collections
    import glob
    import re
    import tempfile

    import jax

    seconds = collections.Counter()
    with tempfile.TemporaryDirectory() as folder:
        with jax.profiler.trace(folder):
            fn()
        (path,) = glob.glob(os.path.join(folder, "**", "*.xplane.pb"), recursive=True)
        for plane in jax.profiler.ProfileData.from_file(path).planes:
            for line in plane.lines:
                if "python" in line.name.lower():
                    continue
                for event in line.events:
                    if event.name.startswith(("ThunkExecutor", "end:", "Threadpool", "Slinky")):
                        continue
                    seconds[re.sub(r"\.\d+$", "", event.name)] += event.duration_ns / 1e9
    return dict(seconds.most_common())


def measure(batch: int, source: int, new: int, calls: int, rounds: int,
            gemm_size: int = 2048) -> dict:
    """The profile's record: one comparison row per part (matmuls/s; microseconds per matmul
    in the .md) and one for the greedy call (steps/s)."""
    import jax
    import jax.numpy as jnp
    import torch

    from benchmarks.t5_generate import random_t5
    from t5_hybrid.generate import make_generate

    tm, cfg, model, variables = random_t5()
    timed = parts(tm, variables, batch, calls)
    differences = {part: t[3] for part, t in timed.items()}
    if max(differences.values()) > 1e-4:
        raise AssertionError(f"our matmuls differ from transformers' ({differences}, relative "
                             "to each output's scale): they would not time the same work")
    ids = np.random.default_rng(0).integers(2, 32000, (batch, source))
    jids, jmask = jnp.asarray(ids, jnp.int32), jnp.ones((batch, source), jnp.int32)
    tids = torch.from_numpy(ids)
    generate = make_generate(model, new)

    def ours_step():
        return jax.block_until_ready(generate(variables, jids, jmask))

    def peer_step():
        with torch.no_grad():
            return tm.generate(input_ids=tids, attention_mask=torch.ones_like(tids),
                               max_new_tokens=new, min_new_tokens=new, do_sample=False,
                               num_beams=1)

    if not np.array_equal(np.asarray(ours_step()), peer_step().numpy()[:, 1:]):
        raise AssertionError("our greedy tokens differ from transformers' generate")
    runs = {"ours/step": ours_step, "peer/step": peer_step}
    for part, (fn, args, peer, _) in timed.items():
        jax.block_until_ready(fn(*args))  # compile
        peer()  # warm-up
        runs[f"ours/{part}"] = lambda fn=fn, args=args: jax.block_until_ready(fn(*args))
        runs[f"peer/{part}"] = peer
    gemm = [gemm_rates("float32", gemm_size)]
    seconds = alternating_rounds(runs, rounds)
    gemm.append(gemm_rates("float32", gemm_size))
    rate = best_gemm_rate(gemm)
    rows = []
    for part, (_, (params, _), _, _) in timed.items():
        k, n = params["kernel"].shape
        row = comparison(part, "matmuls/s", calls, seconds[f"ours/{part}"],
                         seconds[f"peer/{part}"], ours_label="ours (LoRADense in a jitted loop)",
                         peer_label="transformers nn.Linear", flops=2.0 * batch * k * n * calls,
                         gemm_flops_per_s=rate)
        row.update(weight_shape=[k, n], per_step=per_step(part, cfg.num_decoder_layers),
                   ours_us=1e6 / row["ours"], peer_us=1e6 / row["peer"])
        rows.append(row)
    ops = traced_op_seconds(ours_step)
    step = comparison("greedy step", "steps/s", new, seconds["ours/step"], seconds["peer/step"],
                      ours_label="make_generate, KV cache", peer_label="transformers generate")
    step["ours_ms"], step["peer_ms"] = 1e3 / step["ours"], 1e3 / step["peer"]
    matmul_ms = {side: sum(r[f"{side}_us"] * r["per_step"] for r in rows) / 1e3
                 for side in ("ours", "peer")}
    return {"benchmark": "decode_parts", "batch": batch, "source_tokens": source,
            "new_tokens": new, "calls": calls, "rounds": rounds,
            "relative_differences": differences, "comparisons": rows, "step": step,
            "matmul_ms_per_step": matmul_ms,
            "our_op_ms_per_step": {name: 1e3 * t / new for name, t in ops.items()},
            "matmul_share_of_step": {side: matmul_ms[side] / step[f"{side}_ms"]
                                     for side in ("ours", "peer")},
            "gemm_size": gemm_size, **gemm_fields(gemm)}


def markdown(result: dict) -> str:
    from benchmarks.run import percent, ratio_text

    env = result["environment"]
    step, share, ms = (result["step"], result["matmul_share_of_step"],
                       result["matmul_ms_per_step"])
    lines = [f"# One T5 greedy decoding step by its matmuls, on {env['machine']}"
             + (f" ({env['cpu']})" if env.get("cpu") else ""), "",
             f"`{env['command']}` at commit {env['git_commit']}, {env['date']}: the random T5 "
             f"of benchmarks.t5_generate, batch {result['batch']} (one new token per row), "
             f"{result['source_tokens']} + {result['new_tokens']} tokens, float32; ours = JAX "
             f"{env['jax']}, peer = transformers' modules on PyTorch {env['torch']}. Medians of "
             f"{result['rounds']} alternating rounds of {result['calls']} matmuls per part; "
             f"every part agrees with the peer's to "
             f"{max(result['relative_differences'].values()):.1e} of its scale.", "",
             "| part (weight) | per step | ours, us | peer, us | ours / peer (speed) "
             "| ours, % of GEMM | peer, % of GEMM |", "|---|---|---|---|---|---|---|"]
    for r in result["comparisons"]:
        k, n = r["weight_shape"]
        lines.append(f"| {r['what']} ({k} x {n}) | {r['per_step']} | {r['ours_us']:.1f} | "
                     f"{r['peer_us']:.1f} | {ratio_text(r['ratio'])} | {percent(r, 'ours')} | "
                     f"{percent(r, 'peer')} |")
    lines += ["", "| per greedy step | ours, ms | peer, ms | ours / peer (speed) |",
              "|---|---|---|---|",
              f"| the step's matmuls (each part x its count) | {ms['ours']:.2f} | "
              f"{ms['peer']:.2f} | {ratio_text(ms['peer'] / ms['ours'])} |",
              f"| the whole step (a greedy call over its new tokens) | {step['ours_ms']:.2f} | "
              f"{step['peer_ms']:.2f} | {ratio_text(step['ratio'])} |", "",
              f"The matmuls take {100 * share['ours']:.0f}% of our step and "
              f"{100 * share['peer']:.0f}% of the peer's (the rest: attention over the cache, "
              "norms, sampling, dispatch; for the peer also Python).", "",
              "Our greedy call traced (`jax.profiler`), op time per step summed over the "
              "threads that ran the ops (independent ops run side by side, so the sum can "
              "exceed the step); on XLA:CPU `ynn_fusion` is a dot run by YNNPACK (lone dots on "
              "Intel CPUs, `lora_jax.xla_flags`) and `dot` one run by Eigen:", "",
              "| op kind | thread-ms per step | share |", "|---|---|---|"]
    ops = result["our_op_ms_per_step"]
    total = sum(ops.values())
    shown = list(ops.items())[:TRACED_OPS_SHOWN]
    rest = total - sum(op_ms for _, op_ms in shown)
    for name, op_ms in [*shown, *([("all other ops", rest)] if len(ops) > len(shown) else [])]:
        lines.append(f"| {name} | {op_ms:.3f} | {100 * op_ms / total:.0f}% |")
    lines += ["", "A "
              f"{result['gemm_size']}-square float32 GEMM, before and after the rounds, in "
              "GFLOP/s: " + "; ".join(", ".join(f"{lib} {rate:.0f}" for lib, rate in r.items())
                                     for r in result["gemm_gflops_measured"]) + ".", ""]
    return "\n".join(lines)


def main() -> int:
    p = ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=16, help="rows decoded together")
    p.add_argument("--source", type=int, default=64, help="prompt tokens")
    p.add_argument("--new", type=int, default=64, help="generated tokens")
    p.add_argument("--calls", type=int, default=200, help="matmuls per part in a round")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--out-dir", default="results", help="folder for the JSON and markdown")
    add_allow_dirty(p)
    a = p.parse_args()
    require_positive(a, "batch", "source", "new", "calls", "rounds")
    return measure_and_write(a.out_dir, "decode_parts", a.allow_dirty,
                             lambda: measure(a.batch, a.source, a.new, a.calls, a.rounds), markdown)


if __name__ == "__main__":
    sys.exit(main())
