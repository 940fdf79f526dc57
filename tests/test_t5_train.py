"""End-to-end FLAN-T5 hybrid training on a small random T5 (ByT5 bytes, offline): it learns a
synthetic classification task, writes metrics/checkpoints/samples, resumes exactly, and bad
input is a one-line error."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from lora_jax.checkpoint import restore_trainable
from lora_jax.experiments import load_config
from t5_hybrid.synthetic import make_keyword_task
from t5_hybrid.train import train_t5
from tests.helpers import (
    assert_kill9_resume_is_exact,
    assert_short_train_batches_shrink,
    assert_two_processes_equal_one,
    override,
)

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs" / "t5_hybrid_cpu.py")


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("t5data")
    make_keyword_task(str(root), n_train=1200, n_validation=100)
    return str(root)


def t5_config(data_dir: str, variant: str = "prompt_lora", **overrides):
    _, c = load_config(f"{CONFIG}:{variant}")
    c.task, c.data_dir, c.progress = "synth_keyword", data_dir, False
    c.num_epochs, c.batch_size, c.selection_size = 1, 32, 100
    c.optimizer.learning_rate, c.optimizer.warmup_steps = 1e-2, 5
    c.log_every_steps = 5
    return override(c, **overrides)


@pytest.fixture(scope="module")
def prompt_lora_run(synth_dir, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("prompt_lora")
    return workdir, train_t5(t5_config(synth_dir), str(workdir))


def test_prompt_lora_learns_the_task_and_writes_everything(prompt_lora_run):
    tmp_path, results = prompt_lora_run
    assert results["metrics"]["validation"]["accuracy"] >= 0.9
    assert results["trainable_params"] == 30 * 64 + 2 * 3 * 2 * 4 * (64 + 64)
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    losses = [x["train/loss"] for x in lines if "train/loss" in x]
    assert losses[-1] < 0.5 * losses[0]
    samples = [json.loads(x) for x in
               (tmp_path / "samples_validation.jsonl").read_text().splitlines()]
    assert len(samples) == 100 and {"source", "target", "prediction"} <= set(samples[0])
    assert sum(s["prediction"] == s["target"] for s in samples) >= 90
    trainable, meta = restore_trainable(str(tmp_path))
    assert set(trainable) == {"lora", "prompt"} and meta["variant"] == "prompt_lora"


def test_predict_on_the_run_gives_its_reported_metrics(prompt_lora_run, synth_dir, tmp_path,
                                                      capsys):
    from lora_jax import predict as predict_cli

    workdir, results = prompt_lora_run
    rows = pathlib.Path(synth_dir, "synth", "keyword", "validation.jsonl.gz")
    out = tmp_path / "p.jsonl"
    assert predict_cli.main(["--workdir", str(workdir), "--input", str(rows), "--output",
                             str(out), "--evaluate", "--no-progress"]) == 0
    printed = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert printed["metrics"] == results["metrics"]["validation"]
    samples = [json.loads(x)["prediction"] for x in
               (workdir / "samples_validation.jsonl").read_text().splitlines()]
    assert [json.loads(x)["prediction"] for x in out.read_text().splitlines()] == samples


def test_export_merged_and_peft_run_in_pytorch_with_our_logits(prompt_lora_run, tmp_path):
    """merged: a transformers T5 with the LoRA folded in, plus the prompt as a PEFT adapter;
    peft: LORA + PROMPT_TUNING adapters loaded by the documented recipe. Teacher-forced logits
    of both equal ours."""
    import jax.numpy as jnp

    peft = pytest.importorskip("peft")
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from lora_jax import export as export_cli
    from lora_jax.runs import load_run
    from t5_hybrid.train import RANDOM_MODELS, T5ForConditionalGeneration

    workdir, _ = prompt_lora_run
    for fmt in ("merged", "peft"):
        assert export_cli.main(["--workdir", str(workdir), "--format", fmt, "--out",
                                str(tmp_path / fmt)]) == 0
    run = load_run(str(workdir))
    rng = np.random.default_rng(0)
    ids = rng.integers(3, 300, (2, 12))
    mask = np.ones_like(ids)
    mask[1, 8:] = 0
    dec = rng.integers(3, 300, (2, 5))
    dec[:, 0] = 0
    ours = np.asarray(run.model.apply(run.variables, jnp.asarray(ids), jnp.asarray(mask),
                                      jnp.asarray(dec)))
    inputs = dict(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                  decoder_input_ids=torch.tensor(dec))
    merged = transformers.T5ForConditionalGeneration.from_pretrained(tmp_path / "merged")
    merged = peft.PeftModel.from_pretrained(merged, str(tmp_path / "merged" / "prompt")).eval()
    # The peft export on the base weights (the random model's, rebuilt here as the run did).
    base_dir = tmp_path / "base"
    base = T5ForConditionalGeneration(RANDOM_MODELS["tiny"])
    from lora_jax.export import write_hf_folder
    from t5_hybrid.hf_import import to_hf_state_dict

    write_hf_folder(str(base_dir), to_hf_state_dict(run.variables["params"], base.config),
                    base.config.to_hf(), None)
    hybrid = transformers.T5ForConditionalGeneration.from_pretrained(base_dir)
    hybrid = peft.PeftModel.from_pretrained(hybrid, str(tmp_path / "peft" / "lora"))
    hybrid = peft.PeftModel.from_pretrained(hybrid.merge_and_unload(),
                                            str(tmp_path / "peft" / "prompt")).eval()
    with torch.no_grad():
        for model in (merged, hybrid):
            np.testing.assert_allclose(ours, model(**inputs).logits.numpy(), atol=1e-4, rtol=1e-4)


def test_base_variant_only_evaluates_and_full_finetune_trains_params(synth_dir, tmp_path):
    base = train_t5(t5_config(synth_dir, "base"), str(tmp_path / "base"))
    assert base["total_steps"] == 0 and base["trainable_params"] == 0
    full = train_t5(t5_config(synth_dir, "full_finetune", max_steps=3),
                    str(tmp_path / "full"))
    assert full["trainable_params"] == full["total_params"]
    source = json.loads((tmp_path / "full" / "samples_validation.jsonl").read_text()
                        .splitlines()[0])["source"]
    assert source.startswith("has a zebra: ")  # the full row gets the hand-written prefix


def test_early_stopping_after_patience_evaluations_without_a_new_best(synth_dir, tmp_path):
    # lr 0: the selection score never changes, so the best stays at the first evaluation
    # (step 2) and the run stops `patience` evaluations later, long before its 38 steps.
    c = t5_config(synth_dir, max_train_examples=600, eval_every_steps=2,
                  early_stopping_patience=2, num_epochs=2, max_eval_examples=20)
    c.optimizer.learning_rate = 0.0
    results = train_t5(c, str(tmp_path))
    assert results["stopped_early"] and results["total_steps"] == 38
    assert (results["best_step"], results["last_step"]) == (2, 6)
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines if "selection/accuracy" in x] == [2, 4, 6]



def test_a_short_train_batch_is_shrunk_and_trains_as_the_padded_one(synth_dir, tmp_path,
                                                                    monkeypatch):
    """12 train rows in batches of 32 run as 16 rows (prompt + LoRA, dropout on): the same
    run as with the batches padded to 32."""
    import t5_hybrid.train

    config = t5_config(synth_dir, max_train_examples=12, selection_size=8, max_eval_examples=8,
                       num_epochs=3, eval_every_steps=1)
    assert config.lora.dropout > 0
    assert_short_train_batches_shrink(lambda workdir: train_t5(config, workdir), tmp_path,
                                      monkeypatch, t5_hybrid.train, rows=12, shrunk=16,
                                      padded=32)

def test_stopped_early_survives_a_resume(synth_dir, tmp_path):
    """A run that stopped early and is resumed (e.g. killed before results.json) does not train
    on: it reports the same last step, best step and metrics."""
    c = t5_config(synth_dir, max_train_examples=320, eval_every_steps=2,
                  early_stopping_patience=2, num_epochs=2, max_eval_examples=20)
    c.optimizer.learning_rate = 0.0
    first = train_t5(c, str(tmp_path))
    (tmp_path / "results.json").unlink()
    c = t5_config(synth_dir, max_train_examples=320, eval_every_steps=2,
                  early_stopping_patience=2, num_epochs=2, max_eval_examples=20, resume=True)
    c.optimizer.learning_rate = 0.0
    again = train_t5(c, str(tmp_path))
    assert again["stopped_early"] and again["last_step"] == first["last_step"] == 6
    assert again["metrics"] == first["metrics"] and again["best_step"] == first["best_step"]


@pytest.mark.slow
def small_run_args(synth_dir) -> list[str]:
    """A prompt+LoRA run of 8 steps (2 epochs of 4), selections at steps 4 and 8 on 32 rows,
    checkpoints every 2 steps."""
    return ["--config", f"{CONFIG}:prompt_lora", f"--config.data_dir={synth_dir}",
            "--config.task=synth_keyword", "--config.progress=False", "--config.num_epochs=2",
            "--config.batch_size=32", "--config.selection_size=32",
            "--config.max_train_examples=128", "--config.max_eval_examples=16",
            "--config.eval_batch_size=16", "--config.eval_every_steps=4",
            "--config.checkpoint_every_steps=2", "--config.optimizer.learning_rate=0.01",
            "--config.optimizer.warmup_steps=2"]


@pytest.fixture(scope="module")
def small_runs(synth_dir, tmp_path_factory):
    """`small_run_args` in one process (two devices) and in two processes, compared."""
    return assert_two_processes_equal_one(small_run_args(synth_dir),
                                          tmp_path_factory.mktemp("t5_small"))


def test_two_processes_equal_one(small_runs):
    """lora_jax.launch --processes 2 and one process, no other setting: the same selection,
    metrics, logged lines and trees (compared in the fixture), and the same samples files."""
    one, two = small_runs
    assert ((one / "samples_validation.jsonl").read_text()
            == (two / "samples_validation.jsonl").read_text())
    assert len((two / "samples_validation.jsonl").read_text().splitlines()) == 16


def test_kill_9_then_resume_equals_uninterrupted(synth_dir, small_runs, tmp_path):
    one, _ = small_runs
    assert_kill9_resume_is_exact(small_run_args(synth_dir), one, tmp_path / "killed", at=2)


DP_SCRIPT = """
import json, sys, jax, numpy as np
sys.path.insert(0, {root!r})
from tests.test_t5_train import t5_config
from t5_hybrid.train import train_t5
from lora_jax.checkpoint import restore_trainable
r = train_t5(t5_config({data!r}, max_steps=4, max_eval_examples=16, eval_batch_size=16),
             {workdir!r})
t, _ = restore_trainable({workdir!r}, "trainable")
np.savez({out!r}, *[np.asarray(x) for x in jax.tree_util.tree_leaves(t)])
print(json.dumps({{"devices": jax.device_count()}}))
"""


@pytest.mark.slow
def test_data_parallel_on_8_devices_matches_1(synth_dir, tmp_path):
    outs = {}
    for n in (1, 8):
        script = DP_SCRIPT.format(root=str(ROOT), data=synth_dir, workdir=str(tmp_path / f"w{n}"),
                                  out=str(tmp_path / f"p{n}.npz"))
        proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                              timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu",
                                                "XLA_FLAGS": f"--xla_force_host_platform_device_count={n}"})
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert json.loads(proc.stdout.strip().splitlines()[-1])["devices"] == n
        outs[n] = np.load(tmp_path / f"p{n}.npz")
    for key in outs[1].files:
        np.testing.assert_allclose(outs[8][key], outs[1][key], atol=2e-5, rtol=1e-4)


def test_attribute_gives_a_complete_source_by_generated_matrix(prompt_lora_run, tmp_path):
    from t5_hybrid import attribute as t5_attribute

    workdir, _ = prompt_lora_run
    (tmp_path / "rows.jsonl").write_text(json.dumps({"sentence": "the cat sat", "label": 0}) + "\n")
    assert t5_attribute._main(["--workdir", str(workdir), "--input", str(tmp_path / "rows.jsonl"),
                               "--out-dir", str(tmp_path / "ig"), "--steps", "128"]) == 0
    row = json.loads((tmp_path / "ig" / "attributions.json").read_text())["rows"][0]
    generated = len(row["generated_tokens"])
    assert np.shape(row["prompt_scores"]) == (generated, 30)  # the soft prompt, kept apart
    assert np.shape(row["source_scores"]) == (generated, len(row["source_tokens"]))
    assert max(row["completeness_gaps"]) < 0.01  # 64 points leave up to ~1.5% here, 128 ~1e-4
    assert (tmp_path / "ig" / "row_0.png").stat().st_size > 1000
