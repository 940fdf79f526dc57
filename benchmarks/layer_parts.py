"""Where one encoder layer's forward time goes, part by part, against transformers' own layer.

    python -m benchmarks.layer_parts                      # MiniLM-L3, batch 32 x 128
    python -m benchmarks.layer_parts --model DIR --batch 32 --length 64 --out-dir results

A profile, not a target: it names the parts where XLA:CPU (or a GPU) is slower than PyTorch on
this machine, so that a missed speed target in `benchmarks.run` can be traced to its ops. The
first layer of `--model` (a BERT-architecture folder), in eval mode and float32, on one random
batch of hidden states (no padding); each part is our code against the transformers module that
does the same work, on the same weights:

  projections  the four d x d dense layers of attention (query, key, value, output):
               `LoRADense` without an adapter against `BertSelfAttention.query` ... `nn.Linear`
  attention    scores, mask, softmax and weighted values from q, k, v (B, T, H, Dh):
               `encoder.attention_probs` + `attention_context` against transformers'
               attention function for the model's `_attn_implementation` (sdpa by default,
               `torch.nn.functional.scaled_dot_product_attention`), given q, k, v as
               `BertSelfAttention` passes them
  feed_forward intermediate dense, GELU, output dense: `LoRADense`, the encoder's activation,
               `LoRADense` against `BertIntermediate` and `BertOutput.dense`
  layer_norms  the layer's two LayerNorms (`flax.linen.LayerNorm` against `nn.LayerNorm`)
  layer        the whole layer (`encoder.TransformerLayer` against `BertLayer`); its time minus
               the parts' sum is what a side spends outside those ops (residual adds, reshapes,
               dispatch between ops), or saves by fusing across them when negative

Every part's outputs are checked equal to the peer's (1e-4 of their scale) before timing.

Alternating rounds of `--calls` calls per side after warm-up, medians; the matmul parts' FLOP/s
as a fraction of a large GEMM's rate measured in the same run (`benchmarks.roofline`). Writes
results/layer_parts_<machine>.json and .md.
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
from lora_jax.cli import ArgumentParser, fail
from lora_jax.errors import UserError
from lora_jax.results import add_allow_dirty

PARTS = ("projections", "attention", "feed_forward", "layer_norms", "layer")


def part_flops(batch: int, length: int, hidden: int, intermediate: int) -> dict[str, float]:
    """Matmul FLOPs (2 per multiply-add) of each part of one layer's forward; None where a part
    has no matmul."""
    rows = batch * length
    proj = 4 * 2 * rows * hidden * hidden
    attn = 2 * 2 * batch * length * length * hidden
    ffn = 2 * 2 * rows * hidden * intermediate
    return {"projections": proj, "attention": attn, "feed_forward": ffn, "layer_norms": None,
            "layer": proj + attn + ffn}


def jax_parts(model_dir: str, x: np.ndarray) -> dict:
    """name -> (jitted fn, args): our code for each part, on layer 0 of `model_dir`."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from lora_jax.models.encoder import TransformerLayer, attention_context, attention_probs
    from lora_jax.models.hf_import import load_pretrained
    from lora_jax.models.layers import ACTIVATIONS, LoRADense

    pretrained = load_pretrained(model_dir)
    cfg = pretrained.config
    p = jax.tree_util.tree_map(jnp.asarray, pretrained.encoder["layer_0"])
    att = p["attention"]
    b, t, d = x.shape
    xs = jnp.asarray(x)
    mask = jnp.ones((b, t), jnp.int32)
    heads = lambda y: y.reshape(b, t, cfg.num_heads, cfg.head_dim)
    dense = lambda width, params, y: LoRADense(width).apply({"params": params}, y, True)
    norm = lambda params, y: nn.LayerNorm(epsilon=cfg.layer_norm_eps).apply({"params": params}, y)
    act = ACTIVATIONS[cfg.hidden_act]

    def projections(att, y):
        return [dense(d, att[n], y) for n in ("query", "key", "value", "output")]

    def attention(q, k, v):
        return attention_context(attention_probs(q, k, mask), v)

    def feed_forward(p, y):
        return dense(d, p["output"], act(dense(cfg.intermediate_size, p["intermediate"], y)))

    def layer_norms(p, y):
        return norm(p["output_norm"], norm(p["attention_norm"], y))

    def layer(p, y):
        return TransformerLayer(cfg).apply({"params": p}, y, mask, True)

    qkv = [heads(dense(d, att[n], xs)) for n in ("query", "key", "value")]
    return {"projections": (jax.jit(projections), (att, xs)),
            "attention": (jax.jit(attention), tuple(qkv)),
            "feed_forward": (jax.jit(feed_forward), (p, xs)),
            "layer_norms": (jax.jit(layer_norms), (p, xs)),
            "layer": (jax.jit(layer), (p, xs))}


def torch_parts(model_dir: str, x: np.ndarray) -> tuple[dict, str]:
    """(name -> (fn, args), attention implementation): transformers' own modules of layer 0."""
    import torch
    import transformers
    from transformers.models.bert import modeling_bert

    model = transformers.AutoModel.from_pretrained(model_dir).eval()
    layer = model.encoder.layer[0]
    self_att = layer.attention.self
    implementation = model.config._attn_implementation
    attention_fn = modeling_bert.ALL_ATTENTION_FUNCTIONS.get_interface(
        implementation, modeling_bert.eager_attention_forward)
    xs = torch.from_numpy(x)
    b, t, _ = x.shape
    heads = lambda y: y.view(b, t, -1, self_att.attention_head_size).transpose(1, 2)

    def projections(y):
        return [self_att.query(y), self_att.key(y), self_att.value(y),
                layer.attention.output.dense(y)]

    def attention(q, k, v):
        out, _ = attention_fn(self_att, q, k, v, None, dropout=0.0, scaling=self_att.scaling)
        return out.reshape(b, t, -1)

    def feed_forward(y):
        return layer.output.dense(layer.intermediate(y))

    def layer_norms(y):
        return layer.output.LayerNorm(layer.attention.output.LayerNorm(y))

    with torch.no_grad():
        qkv = tuple(heads(f(xs)) for f in (self_att.query, self_att.key, self_att.value))
    return {"projections": (projections, (xs,)), "attention": (attention, qkv),
            "feed_forward": (feed_forward, (xs,)), "layer_norms": (layer_norms, (xs,)),
            "layer": (lambda y: layer(y, None), (xs,))}, implementation


def part_differences(ours: dict, theirs: dict) -> dict[str, float]:
    """Per part, max |ours - transformers| of its outputs over their max |value|: each pair of
    sides must do the same work for its times to compare."""
    import jax
    import torch

    out = {}
    for name in PARTS:
        fn, args = ours[name]
        mine = jax.tree_util.tree_leaves(jax.block_until_ready(fn(*args)))
        tfn, targs = theirs[name]
        with torch.no_grad():
            ref = tfn(*targs)
        ref = ref if isinstance(ref, list) else [ref]
        scale = max(float(r.abs().max()) for r in ref)
        out[name] = max(float(np.abs(np.asarray(m) - r.numpy()).max())
                        for m, r in zip(mine, ref, strict=True)) / max(scale, 1e-12)
    return out


def measure(model_dir: str, batch: int, length: int, calls: int, rounds: int,
            gemm_size: int = 2048) -> dict:
    """The profile's record: one comparison row per part (calls/s; ms per call in the .md)."""
    import jax
    import torch

    from lora_jax.models.hf_import import load_hf_config

    cfg = load_hf_config(model_dir)[0]
    x = np.random.default_rng(0).standard_normal((batch, length, cfg.hidden_size)).astype(
        np.float32)
    ours, (theirs, implementation) = jax_parts(model_dir, x), torch_parts(model_dir, x)
    differences = part_differences(ours, theirs)
    if max(differences.values()) > 1e-4:
        raise AssertionError(f"our parts differ from transformers' ({differences}, relative "
                             "to each output's scale): they would not time the same work")

    def our_run(name):
        fn, args = ours[name]
        jax.block_until_ready(fn(*args))  # compile
        return lambda: jax.block_until_ready([fn(*args) for _ in range(calls)])

    def their_run(name):
        fn, args = theirs[name]

        def run():
            with torch.no_grad():
                for _ in range(calls):
                    fn(*args)
        run()
        return run

    runs = {}
    for name in PARTS:
        runs[f"ours/{name}"], runs[f"peer/{name}"] = our_run(name), their_run(name)
    gemm = [gemm_rates("float32", gemm_size)]
    seconds = alternating_rounds(runs, rounds)
    gemm.append(gemm_rates("float32", gemm_size))
    rate = best_gemm_rate(gemm)
    flops = part_flops(batch, length, cfg.hidden_size, cfg.intermediate_size)
    rows = []
    for name in PARTS:
        row = comparison(name, "calls/s", calls, seconds[f"ours/{name}"],
                         seconds[f"peer/{name}"], ours_label="ours (JAX)",
                         peer_label=f"transformers ({implementation})",
                         flops=None if flops[name] is None else flops[name] * calls,
                         gemm_flops_per_s=rate)
        row["ours_ms"], row["peer_ms"] = 1e3 / row["ours"], 1e3 / row["peer"]
        rows.append(row)
    by_name = {r["what"]: r for r in rows}
    between = {side: by_name["layer"][f"{side}_ms"] - sum(by_name[n][f"{side}_ms"]
                                                         for n in PARTS[:-1])
               for side in ("ours", "peer")}
    return {"benchmark": "layer_parts", "model": model_dir, "batch": batch, "length": length,
            "calls": calls, "rounds": rounds, "attention_implementation": implementation,
            "relative_differences": differences, "comparisons": rows,
            "layer_minus_parts_ms": between, "gemm_size": gemm_size, **gemm_fields(gemm)}


def markdown(result: dict) -> str:
    from benchmarks.run import percent, ratio_text

    env = result["environment"]
    lines = [f"# One encoder layer's forward by its parts, on {env['machine']}"
             + (f" ({env['cpu']})" if env.get("cpu") else ""), "",
             f"`{env['command']}` at commit {env['git_commit']}, {env['date']}: layer 0 of "
             f"{result['model']}, batch {result['batch']} x {result['length']}, float32, eval; "
             f"ours = JAX {env['jax']}, peer = transformers' modules on PyTorch {env['torch']} "
             f"(attention: {result['attention_implementation']}). Medians of "
             f"{result['rounds']} alternating rounds of {result['calls']} calls; every part's "
             f"outputs agree with the peer's to {max(result['relative_differences'].values()):.1e}"
             " of their scale.", "",
             "| part | ours, ms | peer, ms | ours / peer (speed) | ours, % of GEMM "
             "| peer, % of GEMM |", "|---|---|---|---|---|---|"]
    for r in result["comparisons"]:
        lines.append(f"| {r['what']} | {r['ours_ms']:.2f} | {r['peer_ms']:.2f} | "
                     f"{ratio_text(r['ratio'])} | {percent(r, 'ours')} | {percent(r, 'peer')} |")
    between = result["layer_minus_parts_ms"]
    gemm = "; ".join(", ".join(f"{lib} {rate:.0f}" for lib, rate in r.items())
                     for r in result["gemm_gflops_measured"])
    lines += ["", f"The whole layer minus its parts (residual adds, reshapes, dispatch between "
              f"ops; negative where one program fuses across parts): ours "
              f"{between['ours']:.2f} ms, peer {between['peer']:.2f} ms. A "
              f"{result['gemm_size']}-square float32 GEMM, before and after the rounds, in "
              f"GFLOP/s: {gemm}.", ""]
    return "\n".join(lines)


def main() -> int:
    p = ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="../shared/models/paraphrase-MiniLM-L3-v2",
                   help="a BERT-architecture model folder")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--length", type=int, default=128)
    p.add_argument("--calls", type=int, default=10, help="calls per side in a round")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--out-dir", default="results", help="folder for the JSON and markdown")
    add_allow_dirty(p)
    a = p.parse_args()
    require_positive(a, "batch", "length", "calls", "rounds")
    if not os.path.isdir(a.model):
        fail(f"model folder {a.model!r} does not exist; pass --model")
    from lora_jax.models.hf_import import load_hf_config

    try:
        model_type = load_hf_config(a.model)[0].model_type
    except UserError as e:
        fail(f"--model {a.model!r}: {e}")
    if model_type != "bert":
        fail(f"--model {a.model!r} is not a BERT-architecture model; the profile compares with "
             "transformers' BertLayer")
    return measure_and_write(a.out_dir, "layer_parts", a.allow_dirty,
                             lambda: measure(a.model, a.batch, a.length, a.calls, a.rounds), markdown)


if __name__ == "__main__":
    sys.exit(main())
