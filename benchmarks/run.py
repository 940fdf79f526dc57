"""Every benchmark in one run, written to results/bench_<machine>.json and .md.

    python -m benchmarks.run            # about 10 minutes on 2 CPU cores
    python -m benchmarks.run --quick    # fewer steps and rounds, same shapes
    python -m benchmarks.run --model random-bert-base --dtype bfloat16   # on a GPU

Each figure is a ratio against its peer measured in the same process, in alternating rounds
(medians; the .md also gives each side's slowest and fastest round), with each side's FLOP/s as
a fraction of a large GEMM's rate measured in the same run (see benchmarks/roofline.py):

  train_l64, train_l128   LoRA train step vs PyTorch + PEFT (batch 32; r=4 on query/key/value,
                          dropout on, AdamW), benchmarks/train_throughput.py
  t5_greedy               greedy decoding with the KV cache vs transformers `generate`
                          (random T5 v1.1, batch 16, 64 + 64 tokens), benchmarks/t5_generate.py

`--model random-bert-base` benchmarks a randomly initialised BERT-base (written to a temporary
folder; no download), for machines without the shared weights. `--smoke` runs tiny shapes in
seconds to check the command itself; its figures mean nothing.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time

from benchmarks import t5_generate, train_throughput
from benchmarks.common import emit, environment, machine_slug
from lora_jax.cli import ArgumentParser, fail

SCALES = {  # (train steps per round, rounds, train shapes, (T5 batch, source, new))
    "full": (20, 3, ((32, 64), (32, 128)), (16, 64, 64)),
    "quick": (8, 3, ((32, 64), (32, 128)), (16, 64, 64)),
    "smoke": (2, 2, ((4, 16),), (2, 8, 4)),
}


def random_bert_base(folder: str) -> str:
    """Write a randomly initialised BERT-base (transformers' default BertConfig) to `folder`."""
    import torch
    import transformers

    torch.manual_seed(0)
    transformers.BertModel(transformers.BertConfig()).save_pretrained(folder)
    return folder


def spread(rounds: list[float]) -> str:
    return f"{min(rounds):.1f}-{max(rounds):.1f}"


def markdown(results: dict) -> str:
    rows = ["| benchmark | ours | peer | ours / peer | ours, % of GEMM | peer, % of GEMM |",
            "|---|---|---|---|---|---|"]
    for name, r in results["benchmarks"].items():
        if r["benchmark"] == "lora_train_throughput":
            ours = f"{r['jax_examples_per_s']} ex/s [{spread(r['jax_rounds'])}]"
            peer = f"{r['torch_peft_examples_per_s']} ex/s [{spread(r['torch_rounds'])}]"
            ratio, fo, fp = (r["ratio_jax_over_torch"], r["jax_fraction_of_gemm"],
                             r["torch_fraction_of_gemm"])
            what = f"{name}: LoRA train step, batch {r['batch']}, length {r['length']}"
        else:
            t, rr = r["tokens_per_s"], r["tokens_per_s_rounds"]
            ours = f"{t['jax_cached']} tok/s [{spread(rr['jax_cached'])}]"
            peer = f"{t['torch_generate']} tok/s [{spread(rr['torch_generate'])}]"
            ratio, fo, fp = (r["ratio_jax_cached_over_torch"], r["jax_cached_fraction_of_gemm"],
                             r["torch_generate_fraction_of_gemm"])
            what = f"{name}: T5 greedy decoding, batch {r['batch']}"
        rows.append(f"| {what} | {ours} | {peer} | **{ratio}x** | {100 * fo:.0f}% "
                    f"| {100 * fp:.0f}% |")
    env = results["environment"]
    return "\n".join([
        f"# Benchmarks on {env['machine']}", "",
        f"`{env['command']}` at commit {env['git_commit']}, {env['date']}, "
        f"{results['wall_s']} s; peer = PyTorch {env['torch']} (+ PEFT), ours = JAX {env['jax']}, "
        f"{results['dtype']}. Medians of {results['rounds']} alternating rounds "
        "[slowest-fastest round]; % of GEMM = achieved matmul FLOP/s over a large GEMM's rate "
        "measured in the same run (benchmarks/roofline.py).", "", *rows, ""])


def main() -> int:
    p = ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="../shared/models/paraphrase-MiniLM-L3-v2",
                   help="encoder folder for the train-step benchmarks, or random-bert-base")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    scale = p.add_mutually_exclusive_group()
    scale.add_argument("--quick", action="store_true", help="fewer steps and rounds")
    scale.add_argument("--smoke", action="store_true", help="tiny shapes, to test the command")
    p.add_argument("--out-dir", default="results")
    a = p.parse_args()
    if a.model != "random-bert-base" and not os.path.isdir(a.model):
        fail(f"model folder {a.model!r} does not exist; pass --model (or random-bert-base)")
    if not os.path.isdir(a.out_dir):
        fail(f"--out-dir {a.out_dir!r} is not a folder")
    steps, rounds, shapes, (t5_batch, source, new) = SCALES[
        "smoke" if a.smoke else "quick" if a.quick else "full"]
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        model = random_bert_base(tmp) if a.model == "random-bert-base" else a.model
        benchmarks = {}
        for batch, length in shapes:
            print(f"train step, batch {batch}, length {length} ...", file=sys.stderr)
            benchmarks[f"train_l{length}"] = train_throughput.measure(
                model, batch, length, steps, rounds, a.dtype)
    print("T5 greedy decoding ...", file=sys.stderr)
    benchmarks["t5_greedy"] = t5_generate.measure(t5_batch, source, new, rounds)
    results = {"benchmarks": benchmarks, "model": a.model, "dtype": a.dtype, "rounds": rounds,
               "wall_s": round(time.perf_counter() - start), "environment": environment()}
    stem = os.path.join(a.out_dir, f"bench_{machine_slug()}")
    emit(results, stem + ".json")
    with open(stem + ".md", "w") as f:
        f.write(markdown(results))
    print(f"wrote {stem}.json and {stem}.md", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
