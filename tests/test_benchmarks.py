"""The benchmark scripts run and print one JSON line with their figures."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys
import time

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_benchmark_bad_model_is_one_line_error(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "benchmarks.train_throughput",
                           "--model", str(tmp_path / "nope")], capture_output=True, text=True,
                          timeout=120, cwd=ROOT)
    assert proc.returncode == 2 and proc.stderr.startswith("error: model folder")


def _matmul_flops(closed_jaxpr) -> float:
    """2 * (output size) * (contracted size) summed over every dot_general of a jaxpr and the
    jaxprs nested in it (a scan's body counted once per iteration): the matmuls the program asks
    XLA to run, counted by JAX's own shapes rather than by the formulas under test."""
    import math

    from tests.helpers import jaxpr_equations

    total = 0.0
    for eqn, times in jaxpr_equations(closed_jaxpr.jaxpr):
        if eqn.primitive.name == "dot_general":
            (contracting, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            total += times * 2.0 * math.prod(eqn.outvars[0].aval.shape) * math.prod(
                lhs[i] for i in contracting)
    return total


def test_matmul_count_sees_nested_calls_and_every_scan_iteration():
    """The reference count itself: a jitted matmul inside a 3-step scan counts 3 times."""
    import jax
    import jax.numpy as jnp

    square = jax.jit(jnp.dot)
    f = lambda x: jax.lax.scan(lambda c, _: (square(c, c), None), x, None, length=3)[0]
    assert _matmul_flops(jax.make_jaxpr(f)(jnp.ones((4, 4)))) == 3 * 2 * 4**3


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_lora_step_flops_formula_counts_the_steps_matmuls(pooling):
    """The formula in benchmarks/roofline.py against the matmuls of a MiniLM-shaped train
    step's jaxpr (random weights), exactly. The formula leaves out only the pooler (traced,
    unused) and the frozen head's forward and input gradient; it must not count work the step
    does not do (the first layer's input gradient; with [CLS] pooling, the last layer's other
    rows)."""
    import jax
    import optax

    from benchmarks.roofline import lora_encoder_step_flops
    from lora_jax import lora
    from lora_jax.classifier import make_loss_fn
    from lora_jax.models import EncoderConfig, SequenceClassifier
    from lora_jax.trainer import make_train_step

    cfg = EncoderConfig(vocab_size=1000, hidden_size=96, num_layers=2, num_heads=4,
                        intermediate_size=384, max_position_embeddings=64, embedding_size=96)
    model = SequenceClassifier(cfg, 2, pooling=pooling, lora_dropout=0.1)
    batch, length = 4, 32
    ids = jax.numpy.ones((batch, length), jax.numpy.int32)
    params = model.init(jax.random.PRNGKey(0), ids, ids, ids * 0)["params"]
    variables = {"params": params, "lora": lora.init_lora(
        jax.random.PRNGKey(1), params, lora.LoRASpec(r=4, alpha=8.0))}
    trainable, frozen = lora.split(variables, lora.trainable_mask(variables, ("^lora/",)))
    tx = optax.adamw(1e-3)
    step = make_train_step(make_loss_fn(model, False), tx, jax.random.PRNGKey(2))
    b = dict(input_ids=ids, attention_mask=ids, token_type_ids=ids * 0,
             labels=ids[:, 0] * 0, weights=ids[:, 0] * 1.0)
    counted = _matmul_flops(jax.make_jaxpr(step)(trainable, tx.init(trainable), 0, frozen, b))
    ours = lora_encoder_step_flops(batch, length, 96, 384, 2, 4, ("query", "key", "value"),
                                   1 if pooling == "cls" else None)
    pooler, head = 2 * batch * 96 * 96, 2 * (2 * batch * 96 * 2)
    assert counted == ours + pooler + head, (ours, counted)


@pytest.mark.parametrize("cls_only", [False, True])
def test_encoder_forward_flops_formula_counts_the_forwards_matmuls(cls_only):
    """`encoder_forward_flops` (the routing and AttEns rows) against the matmuls of a BERT-shaped
    encoder forward's jaxpr, exactly: every layer's rows, or with ``cls_only`` the last layer's
    [CLS] row alone (its keys and values still over every token); the pooler is not counted."""
    import jax

    from benchmarks.roofline import encoder_forward_flops
    from lora_jax.models import Encoder, EncoderConfig

    cfg = EncoderConfig(vocab_size=1000, hidden_size=96, num_layers=3, num_heads=4,
                        intermediate_size=384, max_position_embeddings=64, embedding_size=96)
    encoder, batch, length = Encoder(cfg), 4, 32
    ids = jax.numpy.ones((batch, length), jax.numpy.int32)
    params = encoder.init(jax.random.PRNGKey(0), ids)["params"]
    forward = lambda p: encoder.apply({"params": p}, ids, cls_only=cls_only)
    counted = _matmul_flops(jax.make_jaxpr(forward)(params))
    pooler = 2 * batch * 96 * 96
    assert counted == encoder_forward_flops(batch, length, 96, 384, 3,
                                            1 if cls_only else None) + pooler


def test_t5_train_step_flops_formula_counts_the_steps_matmuls():
    """`t5_train_step_flops` against the matmuls of the jaxpr of a prompt + LoRA step of a
    small random T5 v1.1 with two layers each side: the formula counts every matmul, the LM
    head's included, and none the step skips (the first decoder layer's input gradient)."""
    import jax
    import jax.numpy as jnp
    import optax

    from benchmarks.roofline import t5_train_step_flops
    from lora_jax import lora
    from lora_jax.trainer import make_train_step
    from t5_hybrid import adapters
    from t5_hybrid.config import T5Config
    from t5_hybrid.model import T5ForConditionalGeneration
    from t5_hybrid.train import make_loss_fn

    cfg = T5Config(vocab_size=512, d_model=64, d_kv=16, d_ff=256, num_layers=2,
                   num_decoder_layers=2, num_heads=4, feed_forward_proj="gated-gelu",
                   tie_word_embeddings=False)
    model = T5ForConditionalGeneration(cfg, lora_dropout=0.05)
    batch, source, target, prompt = 4, 24, 8, 6
    ids, labels = jnp.ones((batch, source), jnp.int32), jnp.ones((batch, target), jnp.int32)
    spec = lora.LoRASpec(r=4, alpha=4.0, targets=("q", "v"))
    variables = jax.jit(lambda key: adapters.init_variables(  # one compile, not one per op
        key, model.init(key, ids, ids, labels)["params"], "prompt_lora", spec, prompt))(
        jax.random.PRNGKey(0))
    trainable, frozen = lora.split(variables, lora.trainable_mask(
        variables, adapters.trainable_patterns("prompt_lora")))
    tx = optax.adamw(1e-3)
    step = make_train_step(make_loss_fn(model), tx, jax.random.PRNGKey(2))
    b = {"input_ids": ids, "attention_mask": ids, "labels": labels,
         "label_mask": jnp.ones(labels.shape)}
    counted = _matmul_flops(jax.make_jaxpr(step)(trainable, tx.init(trainable), 0, frozen, b))
    ours = t5_train_step_flops(batch, source + prompt, target, 64, 64, 256, 2, 2, 512, 4)
    assert ours == pytest.approx(counted, rel=1e-9), (ours, counted)


def test_t5_decode_bytes_formula_counts_the_models_own_arrays():
    """`t5_decode_bytes` against the arrays a cached decoding step of a small random T5 v1.1
    reads: every decoder kernel but the cross K/V projections (used once, at `init_cache`),
    the LM head, the cross K/V cache, and each hypothesis' self K/V up to its position."""
    import jax
    import jax.numpy as jnp

    from benchmarks.roofline import t5_decode_bytes
    from t5_hybrid.config import T5Config
    from t5_hybrid.model import T5ForConditionalGeneration

    cfg = T5Config(vocab_size=512, d_model=64, d_kv=16, d_ff=256, num_layers=1,
                   num_decoder_layers=2, num_heads=4, feed_forward_proj="gated-gelu",
                   tie_word_embeddings=False)
    model = T5ForConditionalGeneration(cfg)
    batch, source, new, beams = 3, 10, 7, 2
    ids = jnp.ones((batch, source), jnp.int32)
    params = model.init(jax.random.PRNGKey(0), ids, ids, ids[:, :1])["params"]
    states = jnp.zeros((batch, source, cfg.d_model))
    cache = jax.eval_shape(lambda: model.apply({"params": params}, states, new,
                                               method=model.init_cache))
    kernels = {"/".join(str(getattr(k, "key", k)) for k in path): x.size
               for path, x in jax.tree_util.tree_flatten_with_path(params)[0]
               if getattr(path[-1], "key", None) == "kernel"}
    per_step = sum(size for name, size in kernels.items() if name.startswith(("decoder", "lm_head"))
                   and not name.endswith(("cross_attention/k/kernel", "cross_attention/v/kernel")))
    cross = sum(x.size for x in jax.tree_util.tree_leaves(cache["cross"]))
    self_full = sum(x.size for x in jax.tree_util.tree_leaves(cache["self"]))  # batch rows
    expected = 4 * (new * (per_step + cross)
                    + sum(beams * self_full * t // new for t in range(1, new + 1)))
    assert t5_decode_bytes(batch, source, new, 64, 64, 256, 2, 512, beams=beams) == expected


@pytest.mark.slow
def test_benchmark_run_smoke_writes_json_and_table(minilm_l3, tmp_path):
    """Every benchmark of `python -m benchmarks.run` on tiny shapes: figures consistent with
    their own rounds and the roofline, tokens equal to transformers', features equal to the
    PyTorch side's, one table row per comparison."""
    pytest.importorskip("peft")
    from benchmarks.run import ratio_text, shown

    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "benchmarks.run", "--smoke", "--model",
                           str(minilm_l3), "--out-dir", str(tmp_path / "new")],
                          capture_output=True, text=True, timeout=900, cwd=ROOT)
    wall = time.perf_counter() - start
    assert proc.returncode == 0, proc.stderr[-2000:]
    (json_file,) = (tmp_path / "new").glob("bench_*.json")  # the folder was created
    results = json.loads(json_file.read_text())
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == results
    benches = results["benchmarks"]
    assert set(benches) == {"train_l16", "t5_train", "t5_generate", "attens_features",
                            "attens_end_to_end", "routing"}
    env = results["environment"]
    assert env["command"].startswith("python -m benchmarks.run --smoke")
    assert env["git_commit"] and env["machine"] and env["cpu"] and env["date"]
    table = json_file.with_suffix(".md").read_text()
    # the CPU is named in the file's name and its table, with its vector extensions
    from benchmarks.common import cpu_family_slug, cpu_vector_extensions, vector_level

    assert json_file.stem.endswith("_".join(
        p for p in (cpu_family_slug(env["cpu"]), vector_level(env["cpu_vector_extensions"])) if p))
    assert env["cpu_vector_extensions"] == cpu_vector_extensions()
    assert f"CPU vector extensions: {', '.join(env['cpu_vector_extensions']) or 'none'}." in table
    for name, bench in benches.items():
        for row in bench["comparisons"]:
            assert f"| {name}: {row['what']} |" in table and ratio_text(row["ratio"]) in table
            # every round timed some work; the ratio is of the medians, stored unrounded (only
            # the markdown rounds), so the identities below hold to float precision
            assert all(r > 0 for r in row["ours_rounds"] + row["peer_rounds"]), row
            assert row["ours"] == np.median(row["ours_rounds"])
            assert row["ratio"] == pytest.approx(row["ours"] / row["peer"], rel=1e-12)
    train = benches["train_l16"]["comparisons"][0]
    # 2 rounds of 2 steps of 4 examples within the wall time: a rate below 8 / wall would mean
    # the timer counted something else
    assert len(train["ours_rounds"]) == 2 and min(train["ours_rounds"]) >= 8 / wall
    # the roofline: FLOP/s = FLOPs per call * calls/s, and its fraction of the GEMM rate
    calls_per_s = train["ours"] / (4 * 2)
    assert train["ours_gflops"] == pytest.approx(train["gflop_per_call"] * calls_per_s, rel=1e-12)
    assert train["ours_fraction_of_gemm"] == pytest.approx(
        train["ours_gflops"] / benches["train_l16"]["gemm_gflops"], rel=1e-12)
    assert f"{100 * train['ours_fraction_of_gemm']:.0f}%" in table
    routing = benches["routing"]
    # per n: routed vs PEFT's mixed batch, PEFT mixed vs PEFT single, routed vs ours single;
    # the routed logits were checked against PEFT's before timing
    assert len(routing["comparisons"]) == 3 * len(routing["adapters"]) == 6
    assert max(routing["max_logit_difference_vs_peft"].values()) < 1e-4
    greedy, beam = benches["t5_generate"]["comparisons"]
    assert greedy["same_tokens_as_transformers"] is True, greedy
    assert len(greedy["ours_rounds"]) == benches["t5_generate"]["rounds"] == results["scale"][
        "t5_generate"][3]
    assert "beam" in beam["what"] and beam["gflop_per_call"] > greedy["gflop_per_call"]
    # the memory roofline: bytes per call * calls/s, as a share of the measured memory rate
    memory = benches["t5_generate"]["memory_gbytes_per_s"]
    assert greedy["ours_gbytes_per_s"] == pytest.approx(
        greedy["gbytes_per_call"] * greedy["ours"] / (2 * 4), rel=1e-12)  # batch 2, 4 new tokens
    assert greedy["ours_fraction_of_memory"] == pytest.approx(
        greedy["ours_gbytes_per_s"] / memory, rel=1e-12)
    assert f"({shown(memory, 1)} GB/s in this run)" in table
    features = benches["attens_features"]["comparisons"]
    assert [r["peer_label"].rsplit(", ", 1)[1] for r in features] == ["PyTorch + PEFT",
                                                                       "our encoder"]
    assert features[0]["ours_rounds"] == features[1]["ours_rounds"]  # one stacked side
    e2e = benches["attens_end_to_end"]
    assert e2e["max_feature_difference"] < 1e-3
    assert e2e["seconds"]["ours"] > 0 and e2e["seconds"]["authors_structure"] > 0
    first, later = e2e["comparisons"]  # a first run and a later one, against one PyTorch run
    assert "first run" in first["what"] and "persistent cache" in later["what"]
    assert first["ours"] == pytest.approx(3600 / e2e["seconds"]["ours"])
    assert later["ours"] == pytest.approx(3600 / e2e["seconds"]["ours_repeat"])
    assert first["peer"] == later["peer"]
    # both sides start from one combiner; the paired counts fit the accuracies
    assert e2e["start_logit_difference"] < 1e-4
    paired, acc = e2e["validation_paired"], e2e["validation_accuracy"]
    rows = e2e["validation_rows"]
    assert paired["only_ours_right"] - paired["only_theirs_right"] == round(
        (acc["ours"] - acc["authors_structure"]) * rows)  # unrounded accuracies: exact counts
    assert f"McNemar exact p = {shown(paired['mcnemar_p'], 4)}" in table


def test_cpu_family_slug_names_vendor_and_family():
    """Result files are named per machine kind: two vendors' 2-core machines never share one."""
    from benchmarks.common import cpu_family_slug

    assert cpu_family_slug("Intel(R) Xeon(R) Processor") == "intel_xeon"
    assert cpu_family_slug("Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz") == "intel_xeon"
    assert cpu_family_slug("AMD EPYC 7B13 64-Core Processor") == "amd_epyc"
    assert cpu_family_slug("unknown") == ""


def test_vector_level_names_the_widest_vector_unit():
    """Two machines of one vendor and family, one with AVX-512 and one without, never share a
    result file; the extension lists are those /proc/cpuinfo gave on the project's machines."""
    from benchmarks.common import vector_level

    sapphire_rapids = ["sse4_2", "avx", "avx2", "fma", "avx512f", "avx512bw", "avx512vl",
                       "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16"]
    assert vector_level(sapphire_rapids) == "avx512"
    assert vector_level(["sse4_2", "avx", "avx2", "fma"]) == "avx2"  # an AMD EPYC of this project
    assert vector_level(["asimd", "sve", "sve2"]) == "sve"
    assert vector_level(["asimd"]) == "neon"
    assert vector_level([]) == ""


def test_paired_accuracy_counts_discordant_rows_and_mcnemars_exact_p():
    """3 rows right only on the PyTorch side, none only on ours: p = 2 * 0.5**3."""
    from benchmarks.attens import paired_accuracy

    labels = np.array([0, 1, 1, 0, 1, 0, 1, 1])
    ours = np.array([0, 1, 0, 1, 0, 0, 0, 1])
    theirs = np.array([0, 1, 1, 0, 1, 0, 0, 1])
    assert paired_accuracy(ours, theirs, labels) == {
        "same_predictions": 0.625, "only_ours_right": 0, "only_theirs_right": 3,
        "mcnemar_p": 0.25}
    assert paired_accuracy(ours, ours, labels)["mcnemar_p"] == 1.0


@pytest.mark.slow
def test_authors_structure_without_dropout_trains_our_combiner(minilm_l3, tmp_path):
    """The end-to-end comparison's PyTorch side (torch.nn combiner, PEFT adapters, k + 1 passes
    per step) started from our initial combiner on our batches: with dropout off it must end
    with our best combiner's predictions, row for row."""
    pytest.importorskip("peft")
    from benchmarks import attens
    from lora_jax.synthetic import make_sentiment_task

    make_sentiment_task(tmp_path / "data", n_train=72, n_validation=48)
    names = attens.random_module_set(str(minilm_l3), str(tmp_path / "modules"), 2, 32)
    adapter_dirs = attens.export_adapters(str(minilm_l3), str(tmp_path / "modules"), names,
                                          str(tmp_path / "peft"))
    e2e = attens.measure_end_to_end(str(minilm_l3), str(tmp_path / "data"),
                                    str(tmp_path / "modules"), names, adapter_dirs, 64, 48, 3,
                                    32, str(tmp_path), combiner_dropout=0.0)
    assert e2e["start_logit_difference"] < 1e-5
    assert e2e["validation_paired"]["same_predictions"] == 1.0, e2e
    assert e2e["validation_accuracy"]["ours"] == e2e["validation_accuracy"]["authors_structure"]
    assert e2e["selection_accuracy"]["ours"] == e2e["selection_accuracy"]["authors_structure"]


def test_layer_parts_count_their_matmuls_and_match_transformers(minilm_l3):
    """benchmarks.layer_parts: each of our parts does the matmuls `part_flops` counts (exactly,
    from its jaxpr) and gives transformers' module's outputs, so the profile times like work."""
    import jax

    from benchmarks.layer_parts import PARTS, jax_parts, part_differences, part_flops, torch_parts

    batch, length = 2, 8
    x = np.random.default_rng(1).standard_normal((batch, length, 384)).astype(np.float32)
    ours, (theirs, _) = jax_parts(str(minilm_l3), x), torch_parts(str(minilm_l3), x)
    flops = part_flops(batch, length, 384, 1536)
    for name in PARTS:
        fn, args = ours[name]
        assert _matmul_flops(jax.make_jaxpr(fn)(*args)) == (flops[name] or 0), name
    differences = part_differences(ours, theirs)
    assert set(differences) == set(PARTS) and max(differences.values()) < 1e-4, differences


@pytest.mark.slow
def test_layer_parts_writes_one_row_per_part(minilm_l3, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "benchmarks.layer_parts", "--model",
                           str(minilm_l3), "--batch", "2", "--length", "8", "--calls", "1",
                           "--rounds", "2", "--out-dir", str(tmp_path)],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (json_file,) = tmp_path.glob("layer_parts_*.json")
    result = json.loads(json_file.read_text())
    table = json_file.with_suffix(".md").read_text()
    assert result["environment"]["command"].startswith("python -m benchmarks.layer_parts")
    for row in result["comparisons"]:
        assert len(row["ours_rounds"]) == 2 and row["ours"] == np.median(row["ours_rounds"])
        assert row["ours_ms"] == pytest.approx(1e3 / row["ours"], rel=1e-12)
        assert f"| {row['what']} | {row['ours_ms']:.2f} | {row['peer_ms']:.2f} |" in table
    assert [r["what"] for r in result["comparisons"]] == list(result["relative_differences"])


def test_decode_parts_time_every_weight_a_decoding_step_reads():
    """benchmarks.decode_parts: the parts' counts per step are the decoder's kernels by shape (less
    the cross-attention k and v, computed once per call from the source) plus the LM head; each
    timed loop asks for exactly `calls` matmuls of its weight (its jaxpr), and each part gives
    transformers' module's output."""
    import collections

    import jax
    from flax import traverse_util

    from benchmarks import decode_parts
    from benchmarks.t5_generate import random_t5

    tm, cfg, _, variables = random_t5()
    read = collections.Counter(
        v.shape for k, v in traverse_util.flatten_dict(variables["params"]).items()
        if k[-1] == "kernel" and k[0] in ("decoder", "lm_head")
        and k[-3:-1] not in (("cross_attention", "k"), ("cross_attention", "v")))
    batch, calls = 3, 4
    counted = collections.Counter()
    for name, (fn, args, _, difference) in decode_parts.parts(tm, variables, batch,
                                                              calls).items():
        k, n = args[0]["kernel"].shape
        counted[(k, n)] += decode_parts.per_step(name, cfg.num_decoder_layers)
        assert _matmul_flops(jax.make_jaxpr(fn)(*args)) == calls * 2 * batch * k * n, name
        # and XLA keeps the whole product (the loop reads one column of it)
        compiled = fn.lower(*args).compile().as_text()
        assert any(f"f32[{batch},{n}]" in line and ("dot(" in line or "fusion(" in line)
                   for line in compiled.splitlines()), name
        assert difference < 1e-4, (name, difference)
    assert counted == read


@pytest.mark.slow
def test_decode_parts_writes_one_row_per_part_and_the_step(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "benchmarks.decode_parts", "--batch", "2",
                           "--source", "4", "--new", "2", "--calls", "2", "--rounds", "2",
                           "--out-dir", str(tmp_path), "--allow-dirty"],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (json_file,) = tmp_path.glob("decode_parts_*.json")
    result = json.loads(json_file.read_text())
    table = json_file.with_suffix(".md").read_text()
    assert result["environment"]["command"].startswith("python -m benchmarks.decode_parts")
    rows = result["comparisons"]
    assert [r["what"] for r in rows] == list(result["relative_differences"])
    for row in rows:
        assert len(row["ours_rounds"]) == 2 and row["ours"] == np.median(row["ours_rounds"])
        assert row["ours_us"] == pytest.approx(1e6 / row["ours"], rel=1e-12)
        assert f"| {row['per_step']} | {row['ours_us']:.1f} | {row['peer_us']:.1f} |" in table
    ops = result["our_op_ms_per_step"]
    assert ops and min(ops.values()) >= 0 and sum(ops.values()) > 0
    name, op_ms = next(iter(ops.items()))  # the largest
    assert op_ms == max(ops.values()) and f"| {name} | {op_ms:.3f} |" in table
    for side in ("ours", "peer"):
        step_ms = sum(r[f"{side}_us"] * r["per_step"] for r in rows) / 1e3
        assert result["matmul_ms_per_step"][side] == pytest.approx(step_ms, rel=1e-12)
        assert result["matmul_share_of_step"][side] == pytest.approx(
            step_ms / result["step"][f"{side}_ms"], rel=1e-12)


@pytest.mark.parametrize("command", [["benchmarks.decode_parts"],
                                     ["benchmarks.run", "--model", "random-bert-base"]])
def test_benchmark_records_refuse_an_out_dir_that_is_a_file(tmp_path, command):
    """`benchmarks.common.checked_code_state`, the check each record-writing script makes
    before measuring: one error line, exit 2, nothing measured or written."""
    out = tmp_path / "taken"
    out.write_text("")
    proc = subprocess.run([sys.executable, "-m", *command, "--out-dir", str(out)],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip() == f"error: --out-dir {str(out)!r} is a file, not a folder"
    assert proc.stdout == "" and sorted(tmp_path.iterdir()) == [out]


def test_layer_parts_refuses_a_model_that_is_not_bert(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "t5"}))
    proc = subprocess.run([sys.executable, "-m", "benchmarks.layer_parts", "--model",
                           str(tmp_path), "--out-dir", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 2 and proc.stderr.startswith("error: --model ")
    assert "model_type 't5'" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()
