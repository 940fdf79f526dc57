"""End-to-end: train.py on the shrunken quickstart config, resume, errors, data parallelism."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import traverse_util

from lora_jax.checkpoint import restore_trainable
from lora_jax.classifier import (
    evaluate,
    make_loss_fn,
    make_predict_step,
    prepare,
    train_and_evaluate,
)
from lora_jax.data import make_batch
from lora_jax.errors import UserError
from lora_jax.experiments import load_config
from lora_jax.metrics import unpack_array
from lora_jax.sharding import Placement
from lora_jax.synthetic import make_quickstart_assets
from tests.helpers import assert_short_train_batches_shrink, dot_dtypes, override

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs" / "quickstart.py")


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return make_quickstart_assets(str(tmp_path_factory.mktemp("assets")))


def quick_config(assets, **overrides):
    _, c = load_config(CONFIG)
    c.model, c.data_dir = assets
    c.progress = False
    c.num_epochs = 2
    c.max_train_examples = 600
    return override(c, **overrides)


def above_chance(accuracy: float, rows: int) -> bool:
    """Binary accuracy more than 3 standard errors above chance (0.5) on `rows` examples."""
    return accuracy > 0.5 + 3 * 0.5 / np.sqrt(rows)


def test_end_to_end_writes_everything_and_learns(assets, tmp_path):
    results = train_and_evaluate(quick_config(assets, num_epochs=8), str(tmp_path))
    sizes = results["sizes"]  # zero-shot is 0.5 on both splits
    assert above_chance(results["metrics"]["validation"]["accuracy"], sizes["validation"])
    assert above_chance(results["selection_metrics"]["accuracy"], sizes["selection"])
    assert results["trainable_params"] == 2 * 2 * 3 * 64 * 4 + 64 * 2 + 2
    assert json.loads((tmp_path / "results.json").read_text())["task"] == "synth_sentiment"
    rows = results["predictions"]["validation"]  # per-row outputs, for paired tests
    preds, labels = unpack_array(rows["predictions"]), unpack_array(rows["labels"])
    assert len(preds) == sizes["validation"] and set(np.unique(labels)) == {0, 1}
    assert np.mean(preds == labels) == results["metrics"]["validation"]["accuracy"]
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert any("train/loss" in x for x in lines) and any("selection/accuracy" in x for x in lines)
    assert any(p.name.startswith("events.out.tfevents") for p in (tmp_path / "tensorboard").iterdir())
    trainable, meta = restore_trainable(str(tmp_path))
    assert meta["task"] == "synth_sentiment" and "lora" in trainable and "head" in trainable["params"]


def test_stop_after_steps_then_resume_keeps_the_first_best_of_equal_scores(assets, tmp_path):
    """stop_after_steps ends without results; a second run there needs resume=True; and the
    resumed run keeps the best score exactly (lr 0: every selection score is equal, so the
    first evaluation stays the best; a best score rounded to float32 in the checkpoint made a
    resumed run take a later equal score for a new best)."""
    kw = dict(checkpoint_every_steps=5, eval_every_steps=5, max_eval_examples=100,
              max_train_examples=320, **{"optimizer.learning_rate": 0.0})
    part = train_and_evaluate(quick_config(assets, stop_after_steps=11, **kw), str(tmp_path))
    assert part == {"stopped_at_step": 11, "total_steps": 20}
    assert not (tmp_path / "results.json").exists()
    with pytest.raises(Exception, match="already holds checkpoints"):
        train_and_evaluate(quick_config(assets, **kw), str(tmp_path))
    resumed = train_and_evaluate(quick_config(assets, resume=True, **kw), str(tmp_path))
    assert (resumed["best_step"], resumed["last_step"]) == (5, 20)


def test_a_checkpoint_of_the_old_shard_layout_is_refused(assets, tmp_path):
    """Checkpoints of versions that dealt rows to ``data_shards`` > 1 trained on batches this
    version does not make: resuming them is one error naming the count, not a silent change of
    trajectory (their loop metadata is rewritten here as such a version wrote it)."""
    kw = dict(checkpoint_every_steps=4, max_steps=8, max_eval_examples=32,
              max_train_examples=128)
    part = train_and_evaluate(quick_config(assets, stop_after_steps=4, **kw), str(tmp_path))
    assert part == {"stopped_at_step": 4, "total_steps": 8}
    (meta_file,) = [p for p in (tmp_path / "checkpoints" / "4" / "meta").iterdir()
                    if p.is_file() and p.read_text().startswith("{")]
    meta = json.loads(meta_file.read_text())
    assert meta["loop"]["processes"] == 1
    meta["loop"] = {**meta["loop"], "data_shards": 2}
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(UserError, match=r"written with data_shards=2, a batch order this "
                                        r"version no longer makes"):
        train_and_evaluate(quick_config(assets, resume=True, **kw), str(tmp_path))


def test_ffn_and_zero_shot_train_only_the_head(assets, tmp_path):
    ffn = train_and_evaluate(quick_config(assets, experiment="ffn"), str(tmp_path / "ffn"))
    assert ffn["trainable_params"] == 64 * 2 + 2
    head, _ = restore_trainable(str(tmp_path / "ffn"))
    assert list(traverse_util.flatten_dict(head)) == [("params", "head", "bias"),
                                                       ("params", "head", "kernel")]
    # the encoder stayed frozen: the pretrained encoder from disk with the saved head gives
    # exactly the reported scores (a trained encoder would not)
    setup = prepare(quick_config(assets, experiment="ffn"))
    place = Placement.all_devices()
    predict = jax.jit(make_predict_step(setup.model, False))
    again, _ = evaluate(predict, head, setup.frozen, setup.splits["validation"], setup.task,
                        setup, place.put_batch)
    assert again == ffn["metrics"]["validation"]
    zs = train_and_evaluate(quick_config(assets, experiment="zero_shot", selection_size=0),
                            str(tmp_path / "zs"))
    assert zs["total_steps"] == 0 and "train" not in zs["sizes"]
    assert zs["metrics"]["validation"]["accuracy"] < 0.6  # an untrained head on a random BERT
    assert ffn["metrics"]["validation"]["accuracy"] > zs["metrics"]["validation"]["accuracy"]



def test_a_short_train_batch_is_shrunk_and_trains_as_the_padded_one(assets, tmp_path,
                                                                    monkeypatch):
    """A few-shot train split (12 rows, batch_size 32) runs as 16-row batches: the loss and
    gradients of its real rows do not depend on the padding rows (the weighted mean ignores
    them; every dropout mask's counter leads with the batch row), so the shrunk run ends as
    the padded one; LoRA and classifier dropout on."""
    from lora_jax import data as data_lib

    config = quick_config(assets, max_train_examples=12, selection_size=8, max_eval_examples=40,
                          num_epochs=3, eval_every_steps=1)
    assert_short_train_batches_shrink(lambda workdir: train_and_evaluate(config, workdir),
                                      tmp_path, monkeypatch, data_lib, rows=12, shrunk=16,
                                      padded=32)



@pytest.mark.parametrize("rows, steps_per_epoch, shrink, padded_to", [
    (12, 1, True, 16),   # n16: the whole split in one short batch
    (16, 2, True, 16),   # n64: a full batch, then this one
    (3, 4, True, 8),     # never below 8 rows
    (5, 5, True, 32),    # a long epoch's last batch: not worth one more program
    (12, 1, False, 32),  # rows that see each other (the AttEns combiner)
])
def test_which_training_batches_are_shrunk(rows, steps_per_epoch, shrink, padded_to):
    from lora_jax.trainer import train_batch_rows

    assert train_batch_rows(rows, 32, steps_per_epoch, shrink) == padded_to

def test_a_selection_starts_after_the_queued_train_steps_have_run(assets, tmp_path,
                                                                  monkeypatch):
    """JAX returns from a train step before it has run; the loop waits for the queued steps
    before it starts the clock of a selection, so that their time counts as training time
    (``train_seconds``), not as selection time. Every selection here finds the parameters it
    scores computed already (with the wait left out, they were still being computed)."""
    from lora_jax import classifier

    evaluate_split = classifier.evaluate
    ready = []

    def recording(predict, trainable, *args, **kw):
        ready.append(all(x.is_ready() for x in jax.tree_util.tree_leaves(trainable)))
        return evaluate_split(predict, trainable, *args, **kw)

    monkeypatch.setattr(classifier, "evaluate", recording)
    results = train_and_evaluate(quick_config(assets, max_train_examples=128, num_epochs=2,
                                              eval_every_steps=1, max_eval_examples=16,
                                              selection_size=8), str(tmp_path))
    assert results["total_steps"] == 8 and results["train_seconds"] > 0
    assert len(ready) > 8 and all(ready)  # 8 selections, then the reported splits

# kill -9 then resume of the classifier: tests/test_multiprocess.py (two processes, one killed)


DP_SCRIPT = """
import json, sys, jax, numpy as np
sys.path.insert(0, {root!r})
from tests.test_train import quick_config

from lora_jax import lora
from lora_jax.classifier import prepare, train_and_evaluate
from lora_jax.data import make_batch
from lora_jax.errors import UserError
from lora_jax.sharding import Placement
from lora_jax.checkpoint import restore_trainable
c = quick_config(({model!r}, {data!r}), batch_size=16, num_epochs=1, max_steps=6,
                 selection_size=64, max_eval_examples=64, **{{"mesh.shape": {mesh!r}}})
r = train_and_evaluate(c, {workdir!r})
t, _ = restore_trainable({workdir!r}, "trainable")
# the trained model's logits, computed on the run's own mesh and plan
s = prepare(c)
place = Placement.from_config(c)
frozen, trainable = place.put(s.frozen), place.put(t)
batch = place.put_batch(make_batch(s.splits["validation"], np.arange(16), 16, s.buckets, s.pad_id))
logits = jax.jit(lambda tr, fr, b: s.model.apply(lora.combine(tr, fr), b["input_ids"],
                 b["attention_mask"], b["token_type_ids"]))(trainable, frozen, batch)
kernels = {{"/".join(map(str, p)): [x.size * x.dtype.itemsize,
                                    int(np.prod(x.sharding.shard_shape(x.shape))) * x.dtype.itemsize]
           for p, x in jax.tree_util.tree_flatten_with_path(frozen)[0] if x.ndim == 2}}
np.savez({out!r}, np.asarray(logits), *[np.asarray(x) for x in jax.tree_util.tree_leaves(t)])
print(json.dumps({{"devices": jax.device_count(), "metrics": r["metrics"], "mesh": r["mesh"],
                  "memory": r["memory_per_device"], "kernels": kernels}}))
"""


@pytest.mark.slow
def test_data_parallel_and_fsdp_on_8_devices_match_1(assets, tmp_path):
    """Same trajectory (trainable tree after 6 steps), logits and metrics on 1 device, 8 data
    parallel, and an 8-device (data 2, fsdp 4) mesh whose frozen kernels hold a quarter of
    their bytes on each device."""
    outs, infos = {}, {}
    for name, n, mesh in (("one", 1, (-1, 1)), ("data8", 8, (-1, 1)), ("fsdp", 8, (2, 4))):
        script = DP_SCRIPT.format(root=str(ROOT), model=assets[0], data=assets[1], mesh=mesh,
                                  workdir=str(tmp_path / name), out=str(tmp_path / f"{name}.npz"))
        proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                              timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu",
                                                "XLA_FLAGS": f"--xla_force_host_platform_device_count={n}"})
        assert proc.returncode == 0, proc.stderr[-2000:]
        infos[name] = json.loads(proc.stdout.strip().splitlines()[-1])
        assert infos[name]["devices"] == n
        outs[name] = np.load(tmp_path / f"{name}.npz")
    assert infos["fsdp"]["mesh"] == {"data": 2, "fsdp": 4}
    # the bound, 1e-5 absolute (measured: at most 9.1e-8 from one device)
    for name, ref in (("data8", "one"), ("fsdp", "one"), ("fsdp", "data8")):
        for key in outs[ref].files:
            np.testing.assert_allclose(outs[name][key], outs[ref][key], atol=1e-5, rtol=0)
        assert infos[name]["metrics"] == infos["one"]["metrics"]
    for path, (full, shard) in infos["fsdp"]["kernels"].items():
        assert infos["data8"]["kernels"][path] == [full, full], path  # replicated
        assert shard * 4 == full, (path, full, shard)
    memory = {k: infos[k]["memory"]["frozen_bytes_per_device"] for k in infos}
    assert memory["data8"] == memory["one"] and memory["fsdp"] < 0.3 * memory["one"]


def test_real_minilm_short_run(minilm_l3, data_dir, tmp_path):
    _, c = load_config(CONFIG)
    c.model, c.data_dir, c.task = str(minilm_l3), str(data_dir), "rte"
    c.progress, c.num_epochs, c.max_train_examples = False, 1, 64
    c.selection_size, c.max_eval_examples, c.max_length = 32, 32, 64
    c.buckets = (64,)
    r = train_and_evaluate(c, str(tmp_path))
    assert r["trainable_params"] == 3 * 3 * (4 * 384 * 2) + 384 * 2 + 2
    assert r["sizes"] == {"train": 64, "validation": 32, "selection": 32}


def test_bf16_compute_keeps_fp32_master_weights(assets, tmp_path):
    r = train_and_evaluate(quick_config(assets, dtype="bfloat16", max_steps=4,
                                        max_eval_examples=64), str(tmp_path))
    assert r["config"]["dtype"] == "bfloat16" and r["total_steps"] == 4
    trainable, _ = restore_trainable(str(tmp_path), "trainable")
    assert {x.dtype for x in jax.tree_util.tree_leaves(trainable)} == {np.dtype("float32")}
    # and the compute really is bf16: the step's matmuls are bf16 (none in an fp32 model)
    lo = prepare(quick_config(assets, dtype="bfloat16", max_eval_examples=64))
    hi = prepare(quick_config(assets, max_eval_examples=64))
    batch = make_batch(lo.splits["train"], np.arange(8), 8, lo.buckets, lo.pad_id)
    args = (lo.trainable, lo.frozen, batch, jax.random.PRNGKey(0))
    lo_dots = dot_dtypes(make_loss_fn(lo.model, False), *args)
    hi_dots = dot_dtypes(make_loss_fn(hi.model, False), *args)
    assert lo_dots.count("bfloat16") > len(lo_dots) // 2 and "bfloat16" not in hi_dots


def test_mnli_reports_matched_and_mismatched(minilm_l3, data_dir, tmp_path):
    _, c = load_config(str(ROOT / "configs" / "zero_shot.py"))
    c.model, c.data_dir, c.task, c.progress = str(minilm_l3), str(data_dir), "mnli", False
    c.max_eval_examples, c.max_length, c.buckets = 48, 64, (64,)
    r = train_and_evaluate(c, str(tmp_path))
    assert set(r["metrics"]) == {"validation_matched", "validation_mismatched"}
    assert r["sizes"] == {"validation_matched": 48, "validation_mismatched": 48}


def test_bf16_storage_halves_the_frozen_bytes_and_keeps_fp32_trainables(assets, tmp_path):
    """param_dtype=bfloat16: the frozen base is stored in bf16 (half its bytes, from the placed
    arrays), trainable parameters stay fp32, and the run lands where the fp32 run does."""
    runs = {dt: train_and_evaluate(quick_config(assets, param_dtype=dt, max_steps=20,
                                                max_eval_examples=128), str(tmp_path / dt))
            for dt in ("float32", "bfloat16")}
    frozen = {dt: r["memory_per_device"]["frozen_bytes_per_device"] for dt, r in runs.items()}
    assert frozen["bfloat16"] * 2 == frozen["float32"]
    assert (runs["bfloat16"]["memory_per_device"]["trainable_bytes_per_device"]
            == runs["float32"]["memory_per_device"]["trainable_bytes_per_device"])
    trainable, _ = restore_trainable(str(tmp_path / "bfloat16"), "trainable")
    assert {x.dtype for x in jax.tree_util.tree_leaves(trainable)} == {np.dtype("float32")}
    acc = {dt: r["metrics"]["validation"]["accuracy"] for dt, r in runs.items()}
    assert abs(acc["bfloat16"] - acc["float32"]) <= 0.05, acc
    bad = quick_config(assets, param_dtype="float16")
    with pytest.raises(UserError, match="param_dtype='float16' must be one of"):
        train_and_evaluate(bad, str(tmp_path / "bad"))
