"""AttEns end to end on offline assets: module set, cached features, combiner training."""

from __future__ import annotations

import dataclasses
import json
import pathlib
import shutil

import jax
import numpy as np
import pytest

from ensemble.features import module_digests
from ensemble.modules import export_module, load_module_set
from ensemble.train import train_attens
from lora_jax.checkpoint import restore_trainable
from lora_jax.errors import UserError
from lora_jax.experiments import load_config
from lora_jax.metrics import unpack_array
from lora_jax.synthetic import make_quickstart_assets
from tests.helpers import (
    assert_kill9_resume_is_exact,
    assert_two_processes_equal_one,
    failure_excerpt,
    override,
    train_py,
)

ROOT = pathlib.Path(__file__).resolve().parents[1]


SWEEP = """
import ml_collections

def get_config():
    c = ml_collections.ConfigDict()
    c.common = ml_collections.ConfigDict(dict(
        model={model!r}, data_dir={data!r}, max_length=32, buckets=(16, 32), batch_size=32,
        num_epochs=2, max_train_examples=800, selection_size=200, progress=False))
    c.experiment_overrides = ml_collections.ConfigDict(
        {{"ft_lora": {{"optimizer": {{"learning_rate": 3e-3}}}}}})
    c.task_overrides = ml_collections.ConfigDict({{}})
    return c
"""


@pytest.fixture(scope="module")
def module_set(tmp_path_factory):
    """Two tiny modules trained and exported by the real command, ensemble.train_modules."""
    from ensemble import train_modules

    root = tmp_path_factory.mktemp("attens")
    model, data = make_quickstart_assets(str(root / "assets"))
    (root / "sweep.py").write_text(SWEEP.format(model=model, data=data))
    rc = train_modules.main(["--sweep", str(root / "sweep.py"), "--workdir", str(root / "runs"),
                             "--tasks", "synth_sentiment,synth_topic",
                             "--out", str(root / "modules")])
    assert rc == 0
    return root, model, data


def attens_config(root, model, data, **kw):
    _, c = load_config(str(ROOT / "configs" / "attens_minilm_cpu.py"))
    c.model, c.data_dir, c.module_dir = model, data, str(root / "modules")
    c.modules, c.task = ("synth_sentiment", "synth_topic"), "synth_sentiment"
    c.feature_cache, c.progress = str(root / "cache"), False
    c.max_length, c.buckets, c.num_epochs, c.selection_size = 32, (16, 32), 10, 200
    c.max_train_examples = 800
    return override(c, **kw)


def test_module_set_round_trip(module_set):
    root, _, _ = module_set
    ms = load_module_set(str(root / "modules"), ("synth_topic", "synth_sentiment"))
    assert ms.tasks == ["synth_topic", "synth_sentiment"]
    assert ms.spec.r == 4 and ms.modules[0].head["kernel"].shape == (64, 2)
    with pytest.raises(UserError, match="not in"):
        load_module_set(str(root / "modules"), ("cola",))
    # a module's digest names its weights: one float of one module moved, only its digest changes
    digests = module_digests(ms.modules)
    topic, sentiment = ms.modules
    bias = np.array(topic.head["bias"])
    bias[0] = np.nextafter(bias[0], np.float32(1))
    moved = module_digests([dataclasses.replace(topic, head={**topic.head, "bias": bias}),
                            sentiment])
    assert moved["synth_sentiment"] == digests["synth_sentiment"]
    assert moved["synth_topic"] != digests["synth_topic"]
    assert len(set(digests.values())) == 2 and all(len(v) == 16 for v in digests.values())
    with pytest.raises(UserError, match="is a zero_shot run|has no results.json"):
        export_module(str(root), str(root / "nowhere"))


def test_attens_trains_on_cached_features_and_reuses_them(module_set, tmp_path):
    root, model, data = module_set
    first = train_attens(attens_config(root, model, data), str(tmp_path / "a"))
    assert first["k"] == 2 and first["modules"] == ["synth_sentiment", "synth_topic"]
    module_acc = load_module_set(str(root / "modules")).modules[0].meta["metrics"]["validation"][
        "accuracy"]
    acc = first["metrics"]["validation"]["accuracy"]
    assert acc > 0.6 and acc >= module_acc - 0.02  # at least as good as the task's own module
    assert not any(first["feature_cache_hits"].values())
    assert all(s > 0 for s in first["feature_seconds"].values())
    assert first["train_seconds"] > 0 and first["total_steps"] == 10 * 25
    att = np.asarray(first["attention"]["matrix"])
    assert att.shape == (2, 2) and np.allclose(att.sum(-1), 1, atol=1e-4)
    second = train_attens(attens_config(root, model, data), str(tmp_path / "b"))
    assert all(second["feature_cache_hits"].values())
    assert second["metrics"] == first["metrics"]  # same features, same seed: same result


def test_k_and_unseen_target(module_set, tmp_path):
    root, model, data = module_set
    one = train_attens(attens_config(root, model, data, k=1, task="synth_topic"),
                       str(tmp_path / "k1"))
    assert one["modules"] == ["synth_sentiment"] and not one["unseen"]
    with pytest.raises(UserError, match="k=3 but the module set has 2"):
        train_attens(attens_config(root, model, data, k=3), str(tmp_path / "k3"))


def test_logits_output_and_quirk_flags_run(module_set, tmp_path):
    root, model, data = module_set
    r = train_attens(attens_config(root, model, data, **{
        "combiner.output": "logits", "quirks.attend_across_batch": True,
        "quirks.shared_layernorm": True, "quirks.count_padding": True, "num_epochs": 1}),
        str(tmp_path / "q"))
    assert r["quirks"]["attend_across_batch"] and r["attention"] is None


@pytest.mark.parametrize("agg1", ["max", "min"])
def test_encoder_dropout_quirk_with_max_min_stays_finite(module_set, tmp_path, agg1):
    """The rows that fill the last token batch have no tokens: max/min over them was -inf/+inf,
    the combiner's LayerNorm turned that into NaN and every parameter became NaN."""
    root, model, data = module_set
    r = train_attens(attens_config(root, model, data, **{
        "quirks.encoder_dropout": True, "combiner.agg1": agg1, "num_epochs": 1,
        "max_train_examples": 190, "batch_size": 32}), str(tmp_path / agg1))
    assert r["total_steps"] == 6  # 190 rows: the last batch has 30 rows and 2 padding rows
    lines = [json.loads(x) for x in (tmp_path / agg1 / "metrics.jsonl").read_text().splitlines()]
    losses = [x["train/loss"] for x in lines if "train/loss" in x]
    assert losses and all(np.isfinite(losses))
    trainable, _ = restore_trainable(str(tmp_path / agg1), "trainable")
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree_util.tree_leaves(trainable))


def test_resume_equals_uninterrupted_and_every_loop_key_works(module_set, tmp_path):
    """AttEns runs the shared loop: max_steps, eval_every_steps, checkpoint_every_steps,
    stop_after_steps and resume act as for every experiment."""
    root, model, data = module_set
    kw = {"num_epochs": 3, "max_steps": 60, "eval_every_steps": 7, "checkpoint_every_steps": 5}
    full = train_attens(attens_config(root, model, data, **kw), str(tmp_path / "full"))
    assert full["total_steps"] == 60 and full["last_step"] == 60
    lines = [json.loads(x) for x in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines if "selection/accuracy" in x] == [*range(7, 60, 7), 60]
    part = train_attens(attens_config(root, model, data, stop_after_steps=23, **kw),
                        str(tmp_path / "resumed"))
    assert part == {"stopped_at_step": 23, "total_steps": 60}
    resumed = train_attens(attens_config(root, model, data, resume=True, **kw),
                           str(tmp_path / "resumed"))
    assert resumed["metrics"] == full["metrics"] and resumed["best_step"] == full["best_step"]
    a, _ = restore_trainable(str(tmp_path / "full"), "trainable")
    b, _ = restore_trainable(str(tmp_path / "resumed"), "trainable")
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_early_stopping_works_for_attens(module_set, tmp_path):
    root, model, data = module_set
    c = attens_config(root, model, data, eval_every_steps=5, early_stopping_patience=2)
    c.optimizer.learning_rate = 0.0  # the score never improves after the first evaluation
    r = train_attens(c, str(tmp_path))
    assert r["stopped_early"] and (r["best_step"], r["last_step"]) == (5, 15)


@pytest.fixture(scope="module")
def finished_run(module_set, tmp_path_factory):
    """`attens_args` run by train.py to the end (one process, two CPU devices)."""
    root, model, data = module_set
    workdir = tmp_path_factory.mktemp("attens_full") / "full"
    proc = train_py(attens_args(root, model, data), workdir)
    assert proc.returncode == 0, failure_excerpt(proc.stdout + proc.stderr)
    return workdir, proc


def test_kill_9_then_resume_equals_uninterrupted(module_set, finished_run, tmp_path):
    root, model, data = module_set
    # at step 8 of 100 (checkpoints every 4): 92 steps and 23 checkpoints still to go
    assert_kill9_resume_is_exact(attens_args(root, model, data), finished_run[0],
                                 tmp_path / "killed", at=8)


def test_two_processes_equal_one(module_set, tmp_path):
    """One process computes every feature into its own cache; two processes (lora_jax.launch)
    then start from a copy of that cache holding only the train split's features: they read
    those and compute the selection and validation features themselves (each its share of every batch).
    Both runs end with the same selection, metrics, logged lines and combiner."""
    root, model, data = module_set
    args = [*attens_args(root, model, data), "--config.num_epochs=1"]

    def train_features_only(one):  # the cache as it was after the train split
        (store,) = (one.parent / "one_cache").iterdir()
        parts = sorted(p.name for p in store.glob("part-*.npz"))
        assert len(parts) == 3, parts  # one per split, the train split first
        partial = tmp_path / "partial_cache" / store.name
        shutil.copytree(store, partial, ignore=lambda _d, names: [n for n in names
                                                                  if n in parts[1:]])
        return [f"--config.feature_cache={partial.parent}"]

    one, two = assert_two_processes_equal_one(
        args, tmp_path, one_args=[f"--config.feature_cache={tmp_path / 'one_cache'}"],
        two_args=train_features_only)
    assert not any(json.loads((one / "results.json").read_text())["feature_cache_hits"].values())
    hits = json.loads((two / "results.json").read_text())["feature_cache_hits"]
    assert hits == {"train": True, "selection": False, "validation": False}, hits


def attens_args(root, model, data) -> list[str]:
    """train.py arguments of a small AttEns run (k=2, 4 epochs of 25 steps)."""
    return ["--config", str(ROOT / "configs" / "attens_minilm_cpu.py"),
            f"--config.model={model}", f"--config.data_dir={data}",
            f"--config.module_dir={root / 'modules'}",
            "--config.modules=('synth_sentiment','synth_topic')", "--config.task=synth_topic",
            f"--config.feature_cache={root / 'cache'}", "--config.max_length=32",
            "--config.max_train_examples=800", "--config.selection_size=200",
            "--config.num_epochs=4", "--config.checkpoint_every_steps=4",
            "--config.eval_every_steps=10", "--config.progress=False"]


def test_train_py_runs_attens(module_set, finished_run, tmp_path):
    import subprocess
    import sys

    root, model, data = module_set
    workdir, proc = finished_run
    assert "| attens | synth_topic |" in proc.stdout
    assert json.loads((workdir / "results.json").read_text())["experiment"] == "attens"
    fresh = tmp_path / "bad"
    bad = subprocess.run([sys.executable, str(ROOT / "train.py"), *attens_args(root, model, data),
                          f"--workdir={fresh}", "--config.module_dir=/nope"],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "is not a module set" in bad.stderr, bad.stderr
    assert not fresh.exists() or not any(fresh.iterdir())


def test_predict_on_an_attens_run_gives_its_reported_metrics(module_set, tmp_path, capsys):
    from lora_jax import data as data_lib
    from lora_jax import predict as predict_cli

    root, model, data = module_set
    results = train_attens(attens_config(root, model, data, num_epochs=2, max_eval_examples=120),
                           str(tmp_path / "run"))
    rows = data_lib.read_rows(str(pathlib.Path(data) / "synth/sentiment/validation.jsonl.gz"))
    idx = data_lib.random_subset(len(rows), 120, data_lib.EVAL_SUBSET_SEED)
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(rows[i]) + "\n" for i in idx))
    assert predict_cli.main(["--workdir", str(tmp_path / "run"), "--input",
                             str(tmp_path / "rows.jsonl"), "--output", str(tmp_path / "p.jsonl"),
                             "--evaluate", "--no-progress"]) == 0
    printed = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert printed["metrics"] == results["metrics"]["validation"]
    assert len((tmp_path / "p.jsonl").read_text().splitlines()) == 120


@pytest.mark.parametrize("method", ["average", "scalar", "merge", "lorahub", "fusion"])
def test_combination_methods_train_on_the_same_features_and_predict_their_metrics(
        module_set, tmp_path, capsys, method):
    from lora_jax import predict as predict_cli

    if method == "lorahub":
        pytest.importorskip("cma")
    root, model, data = module_set
    results = train_attens(attens_config(root, model, data, num_epochs=2, **{
        "combiner.method": method, "combiner.lorahub_evaluations": 6}), str(tmp_path / "run"))
    # how well each method does is the quickstart test's and the reports' business
    assert results["method"] == method and results["attention"] is None
    assert results["module_sha256"] == module_digests(load_module_set(str(root / "modules")).modules)
    if method == "fusion":  # trained through the encoder: every fusion kernel moved
        assert fusion_kernels_moved(attens_config(root, model, data, num_epochs=2, **{
            "combiner.method": method}), tmp_path / "run")
    rows = results["predictions"]["validation"]
    assert np.mean(unpack_array(rows["predictions"]) == unpack_array(rows["labels"])) == \
        results["metrics"]["validation"]["accuracy"]
    search = results["lorahub_search"]
    if method == "lorahub":  # the weights it found are the run's config: predict merges them
        assert len(search["history"]) == 6 and search["objective"] == min(search["history"])
        assert list(results["merge_weights"].values()) == search["weights"] == list(
            results["config"]["combiner"]["merge_weights"])
        assert search["search_rows"] == {"train": 256, "selection": 200}
    else:
        assert search is None
        assert results["merge_weights"] == ({"synth_sentiment": 1.0, "synth_topic": 1.0}
                                            if method == "merge" else None)  # ties: 1 each
    weights = results["module_weights"]
    if method == "scalar":
        assert list(weights) == ["synth_sentiment", "synth_topic", "base"]
        assert abs(sum(weights.values()) - 1) < 1e-4 and len(set(weights.values())) == 3
    else:
        assert weights is None
    validation = pathlib.Path(data) / "synth/sentiment/validation.jsonl.gz"
    assert predict_cli.main(["--workdir", str(tmp_path / "run"), "--input", str(validation),
                             "--output", str(tmp_path / "p.jsonl"), "--evaluate",
                             "--no-progress"]) == 0
    printed = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert printed["metrics"] == results["metrics"]["validation"]


def fusion_kernels_moved(config, workdir) -> bool:
    """Whether every fusion kernel of a finished fusion run's best checkpoint differs from its
    initial value (`ensemble.fusion.prepare` of the same config)."""
    from ensemble.fusion import prepare

    start = dict(jax.tree_util.tree_leaves_with_path(prepare(config)[0].trainable))
    best, _ = restore_trainable(str(workdir), "best_trainable")
    best = dict(jax.tree_util.tree_leaves_with_path(best))
    kernels = [p for p in start if "fusion_" in jax.tree_util.keystr(p)]
    assert best.keys() == start.keys() and len(kernels) == 3 * 3 * 2  # q/k/v x q/k/v x layers
    return all(np.abs(np.asarray(best[p]) - np.asarray(start[p])).max() > 0 for p in kernels)


def test_fusion_trains_only_its_kernels_and_head(module_set, tmp_path):
    """combiner.method='fusion': the modules and the base are never in the trainable tree,
    and what fusion cannot honour is refused by name before anything is written (that every
    kernel moves in training: the combination-methods test)."""
    from ensemble.fusion import prepare

    root, model, data = module_set
    config = attens_config(root, model, data, num_epochs=1, **{"combiner.method": "fusion"})
    setup, modules = prepare(config)
    assert [m.task for m in modules] == ["synth_sentiment", "synth_topic"]
    trainable = {jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(
        setup.trainable)}
    assert all("fusion_" in p or "'combiner'" in p for p in trainable), trainable
    # what stays frozen: the modules' A/B/scales and the base, never in the trainable tree
    frozen = jax.tree_util.tree_leaves_with_path(setup.frozen["lora"])
    assert {jax.tree_util.keystr(p).split("'")[-2] for p, _ in frozen} == {
        "A", "B", "fusion_scale"}
    for kw, match in [({"combiner.output": "logits"}, "use combiner.output='hidden'"),
                      ({"quirks.count_padding": True}, "quirks.count_padding reproduces")]:
        with pytest.raises(UserError, match=match):
            train_attens(attens_config(root, model, data, **{"combiner.method": "fusion", **kw}),
                         str(tmp_path / "bad"))
    assert not (tmp_path / "bad").exists()


def test_an_unknown_method_or_an_attention_quirk_without_attention_is_refused(module_set,
                                                                              tmp_path):
    root, model, data = module_set
    with pytest.raises(UserError, match="combiner.method='mean' must be one of attens, "
                                        "average, scalar, merge, lorahub"):
        train_attens(attens_config(root, model, data, **{"combiner.method": "mean"}),
                     str(tmp_path / "a"))
    with pytest.raises(UserError, match=r"combiner.merge_density=1.5 must be <= 1.0"):
        train_attens(attens_config(root, model, data, **{"combiner.method": "merge",
                                                         "combiner.merge_density": 1.5}),
                     str(tmp_path / "a"))
    with pytest.raises(UserError, match="combiner.merge_weights has 3 weights for k=2"):
        train_attens(attens_config(root, model, data, **{"combiner.method": "merge",
                                                         "combiner.merge_weights": (1, 1, 1)}),
                     str(tmp_path / "a"))
    with pytest.raises(UserError, match="quirks.shared_layernorm changes the attention "
                                        "combiner; combiner.method='average' has none"):
        train_attens(attens_config(root, model, data, **{"combiner.method": "average",
                                                         "quirks.shared_layernorm": True}),
                     str(tmp_path / "b"))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_a_module_set_from_pytorch_made_peft_adapters_trains_attens(module_set, tmp_path):
    """Adapters trained elsewhere (here: made in PyTorch + PEFT on the same base) become a
    module set with `--from-peft`, and the combiner trains on them end to end."""
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    from ensemble import train_modules

    root, model, data = module_set
    adapters = []
    for i, (task, labels) in enumerate((("synth_sentiment", 2), ("synth_topic", 2))):
        torch.manual_seed(i)
        base = transformers.AutoModelForSequenceClassification.from_pretrained(
            model, num_labels=labels)
        pm = peft.get_peft_model(base, peft.LoraConfig(
            task_type="SEQ_CLS", r=4, lora_alpha=8 * (i + 1), target_modules=["query", "value"]))
        with torch.no_grad():
            for name, p in pm.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.05)
        pm.save_pretrained(tmp_path / task)
        (tmp_path / task / "lora_jax_module.json").write_text(json.dumps({"task": task}))
        adapters.append(str(tmp_path / task))
    assert train_modules.main(["--from-peft", ",".join(adapters), "--model", model,
                               "--out", str(tmp_path / "set")]) == 0
    mset = load_module_set(str(tmp_path / "set"))
    assert mset.tasks == ["synth_sentiment", "synth_topic"]
    assert {m.meta["lora"]["alpha"] for m in mset.modules} == {8.0, 16.0}  # each its own
    results = train_attens(attens_config(root, model, data, module_dir=str(tmp_path / "set")),
                           str(tmp_path / "run"))
    assert results["k"] == 2 and results["total_steps"] > 0
    assert results["metrics"]["validation"]["accuracy"] > 0.6  # the base alone is at chance
