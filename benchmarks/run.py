"""Every benchmark in one run, written to results/bench_<machine>.json and .md.

    python -m benchmarks.run            # 9 to 14 minutes on 2 CPU cores
    python -m benchmarks.run --quick    # fewer steps, rounds and rows, same shapes
    python -m benchmarks.run --model random-bert-base --dtype bfloat16   # on a GPU

Each figure is a ratio against its peer measured in the same process (medians of alternating
rounds; the .md also gives each side's slowest and fastest round), with each side's FLOP/s as
a fraction of a large GEMM's rate measured in the same run (see benchmarks/roofline.py):

  train_l64, train_l128   LoRA train step vs PyTorch + PEFT (batch 32; r=4 on query/key/value,
                          dropout on, AdamW), benchmarks/train_throughput.py
  t5_train                T5 prompt + LoRA train step vs PyTorch + PEFT (random T5 v1.1, batch
                          16, 30 + 64 -> 16 tokens), benchmarks/t5_train.py
  t5_generate             greedy and 4-beam decoding with the KV cache vs transformers
                          `generate` (random T5 v1.1, batch 16, 64 + 64 tokens),
                          benchmarks/t5_generate.py
  attens_features         stacked k = 6 adapter features vs 7 sequential single passes
                          (PyTorch + PEFT, and our own encoder)
  attens_end_to_end       our AttEns run (features once, 20 combiner epochs) vs the authors'
                          structure in PyTorch + PEFT (k + 1 encoder passes every step):
                          theirs once, ours as a first run and as a later one (compiled
                          programs from the persistent cache), benchmarks/attens.py
  routing                 one batch of 32 x 128 whose rows name n = 1, 4, 16 adapters: our
                          per-row routed pass vs PEFT's mixed batch (adapter_names) and vs our
                          one-adapter batch, benchmarks/routing.py

`--model random-bert-base` benchmarks a randomly initialised BERT-base (written to a temporary
folder with a WordPiece vocabulary of the synthetic task; no download), for machines without the
shared weights. `--smoke` runs tiny shapes in seconds to check the command itself; its figures
mean nothing. Run it on a quiet machine: another process on the same cores distorts both sides,
PyTorch's thread pool far more than XLA's.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time

from benchmarks import attens, routing, t5_generate, t5_train, train_throughput
from benchmarks.common import checked_code_state, environment, write_result_files
from lora_jax.cli import ArgumentParser, fail
from lora_jax.results import add_allow_dirty

# train (steps per round, rounds, shapes); t5 train (batch, source, target, steps);
# t5 generation (batch, source, new, rounds): a round is one call per side (0.25-2 s on 2 cores)
# and single greedy calls in one process ran at 3620-4772 tokens/s, so it takes more rounds;
# attens (k, train rows, validation rows, epochs, length, feature batch, feature length);
# routing (adapter counts, batch, length, rounds); gemm: the side of the roofline's square matmul
SCALES = {
    "full": dict(steps=20, rounds=3, shapes=((32, 64), (32, 128)), t5_train=(16, 64, 16, 10),
                 t5_generate=(16, 64, 64, 9), attens=(6, 512, 256, 20, 64, 32, 128),
                 routing=((1, 4, 16), 32, 128, 5), gemm=2048),
    "quick": dict(steps=8, rounds=3, shapes=((32, 64), (32, 128)), t5_train=(16, 64, 16, 4),
                  t5_generate=(16, 64, 64, 3), attens=(6, 192, 96, 20, 64, 32, 128),
                  routing=((1, 4, 16), 32, 128, 3), gemm=2048),
    "smoke": dict(steps=2, rounds=2, shapes=((4, 16),), t5_train=(2, 8, 4, 2),
                  t5_generate=(2, 8, 4, 2), attens=(2, 32, 16, 2, 16, 4, 16),
                  routing=((1, 2), 4, 16, 2), gemm=256),
}


def random_bert_base(folder: str) -> str:
    """Write a randomly initialised BERT-base (transformers' default BertConfig) to `folder`,
    with a WordPiece tokenizer of the synthetic task's words."""
    import torch
    import transformers

    from lora_jax.synthetic import build_wordpiece, make_sentiment_task

    torch.manual_seed(0)
    transformers.BertModel(transformers.BertConfig()).save_pretrained(folder)
    build_wordpiece(make_sentiment_task(os.path.join(folder, "synthetic_data")), folder)
    return folder


def shown(x: float, places: int = 2) -> str:
    """A stored (unrounded) figure as the table shows it: rounded to `places` decimals, without
    trailing zeros. The JSON keeps full precision; only the markdown rounds."""
    return f"{round(x, places):g}"


def ratio_text(ratio: float) -> str:
    return f"**{ratio:.2f}x**"


def spread(rounds: list[float]) -> str:
    return f"{shown(min(rounds))}-{shown(max(rounds))}" if len(rounds) > 1 else "one round"


def percent(row: dict, side: str) -> str:
    value = row.get(f"{side}_fraction_of_gemm")
    return "-" if value is None else f"{100 * value:.0f}%"


def markdown(results: dict) -> str:
    rows = ["| benchmark | ours | peer | ours / peer | ours, % of GEMM | peer, % of GEMM |",
            "|---|---|---|---|---|---|"]
    for name, bench in results["benchmarks"].items():
        for r in bench["comparisons"]:
            rows.append(
                f"| {name}: {r['what']} | {shown(r['ours'])} {r['unit']} "
                f"[{spread(r['ours_rounds'])}] {r['ours_label']} | {shown(r['peer'])} "
                f"[{spread(r['peer_rounds'])}] {r['peer_label']} | {ratio_text(r['ratio'])} "
                f"| {percent(r, 'ours')} "
                f"| {percent(r, 'peer')} |")
    notes = []
    generation = results["benchmarks"].get("t5_generate")
    if generation and "memory_gbytes_per_s" in generation:
        parts = [f"{r['what'].split(',')[0]} {shown(r['gbytes_per_call'], 3)} GB per call, ours "
                 f"{100 * r['ours_fraction_of_memory']:.0f}% and the peer "
                 f"{100 * r['peer_fraction_of_memory']:.0f}%"
                 for r in generation["comparisons"]]
        notes += ["", "Memory roofline of T5 decoding (every step reads each decoder weight and "
                  "the LM head for a few rows): the least bytes a cached decode reads "
                  "(benchmarks/roofline.py `t5_decode_bytes`) per second, as a share of reading "
                  f"a large array ({shown(generation['memory_gbytes_per_s'], 1)} GB/s in this "
                  "run): "
                  f"{'; '.join(parts)}."]
    e2e = results["benchmarks"].get("attens_end_to_end")
    if e2e:
        notes += ["", f"AttEns end to end: {shown(e2e['seconds']['ours'], 1)} s (a first "
                 f"run), {shown(e2e['seconds']['ours_repeat'], 1)} s (a later run, compiled "
                 "programs from the persistent cache) against "
                 f"{shown(e2e['seconds']['authors_structure'], 1)} s; validation accuracy "
                 f"{shown(e2e['validation_accuracy']['ours'], 4)} (ours) and "
                 f"{shown(e2e['validation_accuracy']['authors_structure'], 4)} (authors' "
                 "structure, "
                 "same initial combiner and batches); same prediction on "
                 f"{e2e['validation_paired']['same_predictions']:.1%} of validation rows, "
                 f"{e2e['validation_paired']['only_ours_right']} right only ours and "
                 f"{e2e['validation_paired']['only_theirs_right']} only theirs, McNemar exact "
                 f"p = {shown(e2e['validation_paired']['mcnemar_p'], 4)}; features equal to "
                 f"{e2e['max_feature_difference']:.1e}."]
    env = results["environment"]
    return "\n".join([
        f"# Benchmarks on {env['machine']}" + (f" ({env['cpu']})" if env.get('cpu') else ""), "",
        f"`{env['command']}` at commit {env['git_commit']}, {env['date']}, "
        f"{results['wall_s']} s; peer = PyTorch {env['torch']} (+ PEFT), ours = JAX {env['jax']}, "
        f"{results['dtype']}. Medians of alternating rounds [slowest-fastest round]; % of GEMM = "
        "achieved matmul FLOP/s over a large GEMM's rate measured in the same run "
        "(benchmarks/roofline.py).", "", *rows, *notes, "", settings(env), ""]
        + ([f"CPU vector extensions: {', '.join(env['cpu_vector_extensions']) or 'none'}.", ""]
           if "cpu_vector_extensions" in env else []))


def settings(env: dict) -> str:
    """The process settings both sides ran under, and the process's peak memory."""
    malloc = ("glibc malloc keeps freed heap memory (lora_jax/host_malloc.py)"
              if env.get("malloc_keeps_heap") else "glibc malloc defaults")
    return (f"Process settings for both sides: XLA_FLAGS `{env.get('xla_flags') or '(none)'}`; "
            f"{malloc}"
            + (f"; JAX default matmul precision `{env['jax_default_matmul_precision']}`"
               if env.get("jax_default_matmul_precision") else "")
            + ". Peak resident memory of the benchmark process (both sides, every "
            f"model): {env.get('peak_rss_mb', '?')} MB.")


def progress(start: float, text: str) -> None:
    """One progress line on stderr with the seconds since `start`: a run stopped by a time
    limit still shows which benchmark took the time."""
    print(f"[{time.perf_counter() - start:.0f} s] {text}", file=sys.stderr, flush=True)


def full_fp32_matmuls() -> None:
    """On a GPU, float32 matmuls at full precision, as PyTorch's are by default
    (``torch.backends.cuda.matmul.allow_tf32`` is False): XLA's default there rounds their inputs
    to TF32, which would compare unequal work and break the rows' 1e-4 parity checks. bfloat16
    matmuls are unaffected; a CPU computes float32 in full either way. The environment records
    the setting."""
    import jax

    if jax.default_backend() != "cpu":
        jax.config.update("jax_default_matmul_precision", "highest")


def main() -> int:
    p = ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="../shared/models/paraphrase-MiniLM-L3-v2",
                   help="encoder folder for the train-step benchmarks, or random-bert-base")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    scale = p.add_mutually_exclusive_group()
    scale.add_argument("--quick", action="store_true", help="fewer steps and rounds")
    scale.add_argument("--smoke", action="store_true", help="tiny shapes, to test the command")
    p.add_argument("--out-dir", default="results", help="folder for the JSON and markdown "
                   "(created if missing)")
    add_allow_dirty(p)
    a = p.parse_args()
    if a.model != "random-bert-base" and not os.path.isdir(a.model):
        fail(f"model folder {a.model!r} does not exist; pass --model (or random-bert-base)")
    # before the benchmarks, not after 20 minutes of them
    code = checked_code_state(a.out_dir, "bench", a.allow_dirty)
    full_fp32_matmuls()
    scale = SCALES["smoke" if a.smoke else "quick" if a.quick else "full"]
    steps, rounds, gemm = scale["steps"], scale["rounds"], scale["gemm"]
    start = time.perf_counter()
    benchmarks = {}
    with tempfile.TemporaryDirectory() as tmp:
        model = random_bert_base(tmp) if a.model == "random-bert-base" else a.model
        for batch, length in scale["shapes"]:
            progress(start, f"train step, batch {batch}, length {length} ...")
            benchmarks[f"train_l{length}"] = train_throughput.measure(
                model, batch, length, steps, rounds, a.dtype, gemm)
        progress(start, "T5 train step ...")
        batch, source, target, t5_steps = scale["t5_train"]
        benchmarks["t5_train"] = t5_train.measure(batch, source, target, t5_steps, rounds,
                                                  a.dtype, gemm)
        progress(start, "T5 generation ...")
        benchmarks["t5_generate"] = t5_generate.measure(*scale["t5_generate"], dtype=a.dtype,
                                                        gemm_size=gemm)
        progress(start, "AttEns features and end to end ...")
        k, n_train, n_val, epochs, length, f_batch, f_length = scale["attens"]
        benchmarks["attens_features"], benchmarks["attens_end_to_end"] = attens.measure(
            model, k, n_train, n_val, epochs, length, f_batch, f_length, rounds, gemm)
        progress(start, "per-row adapter routing ...")
        ns, r_batch, r_length, r_rounds = scale["routing"]
        benchmarks["routing"] = routing.measure(model, ns, r_batch, r_length, r_rounds, gemm)
    results = {"benchmarks": benchmarks, "model": a.model, "dtype": a.dtype, "scale": scale,
               "wall_s": round(time.perf_counter() - start),
               "environment": {**environment(), **code}}
    write_result_files(a.out_dir, "bench", results, markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
