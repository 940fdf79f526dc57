"""Bad input to the command-line tools: one ``error:`` line, exit status 2, no traceback, and
nothing written (no workdir, no module set, no table).

Every case runs the real command in a subprocess; they run a few at a time to keep the suite
short. The list is the README's "Bad input" table.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os
import pathlib
import subprocess
import sys

import pytest

from lora_jax.synthetic import make_quickstart_assets, write_jsonl_gz

ROOT = pathlib.Path(__file__).resolve().parents[1]
QUICK = str(ROOT / "configs" / "quickstart.py")
ATTENS = str(ROOT / "configs" / "attens_quickstart.py")


@dataclasses.dataclass
class Case:
    command: list[str]  # after the python executable
    message: str  # must appear in the one error line
    outputs: tuple[str, ...] = ("workdir",)  # paths (under the case folder) that must not exist
    env: dict | None = None


def _cases(root: pathlib.Path, model: str, data: str) -> dict[str, Case]:
    train = [str(ROOT / "train.py"), "--config", QUICK, f"--config.model={model}",
             f"--config.data_dir={data}", f"--workdir={root / 'workdir'}"]
    attens = [str(ROOT / "train.py"), "--config", ATTENS, f"--config.model={model}",
              f"--config.data_dir={data}", f"--workdir={root / 'workdir'}",
              f"--config.module_dir={root / 'no_modules'}"]
    one = [{"sentence": "x", "label": 1}]
    bad_label = root / "bad_label"
    write_jsonl_gz(bad_label / "synth" / "sentiment" / "train.jsonl.gz",
                   [{"sentence": "fine", "label": 1}, {"sentence": "odd", "label": 5}] * 5)
    write_jsonl_gz(bad_label / "synth" / "sentiment" / "validation.jsonl.gz", one)
    word_label = root / "word_label"
    write_jsonl_gz(word_label / "synth" / "sentiment" / "train.jsonl.gz",
                   [{"sentence": "fine", "label": "positive"}] * 5)
    write_jsonl_gz(word_label / "synth" / "sentiment" / "validation.jsonl.gz", one)
    no_val = root / "no_val"
    write_jsonl_gz(no_val / "synth" / "sentiment" / "train.jsonl.gz", one * 9)
    empty = root / "empty"
    write_jsonl_gz(empty / "synth" / "sentiment" / "train.jsonl.gz", [])
    write_jsonl_gz(empty / "synth" / "sentiment" / "validation.jsonl.gz", one)
    corrupt = root / "corrupt" / "synth" / "sentiment"
    corrupt.mkdir(parents=True)
    (corrupt / "train.jsonl").write_text('{"sentence": "a", "label": 1}\n{not json\n')
    (corrupt / "validation.jsonl").write_text('{"sentence": "a", "label": 1}\n')
    truncated = root / "truncated_model"
    truncated.mkdir()
    for name in os.listdir(model):
        src = pathlib.Path(model) / name
        data_bytes = src.read_bytes()
        (truncated / name).write_bytes(data_bytes[: len(data_bytes) // 3]
                                       if name == "model.safetensors" else data_bytes)
    used = root / "used"
    (used / "checkpoints" / "5").mkdir(parents=True)
    sweep = ["-m", "lora_jax.sweep", "--config",
             str(ROOT / "configs" / "quickstart_sweep.py"), "--workdir", str(root / "workdir"),
             "--out", str(root / "table")]
    (root / "rows.txt").write_text("a fine film\n")
    predict = ["-m", "lora_jax.predict", "--input", str(root / "rows.txt"), "--output",
               str(root / "p.jsonl")]
    modules = ["-m", "ensemble.train_modules", "--sweep",
               str(ROOT / "configs" / "quickstart_sweep.py"), "--workdir",
               str(root / "workdir"), "--out", str(root / "modules")]
    bad_sweep = root / "bad_sweep.py"
    bad = (ROOT / "configs" / "quickstart_sweep.py").read_text().replace(
        'c.common = ml_collections.ConfigDict({"progress": False})',
        'c.common = ml_collections.ConfigDict({"progress": False, "batch_size": 0})')
    assert "batch_size" in bad, "configs/quickstart_sweep.py changed: update this case"
    bad_sweep.write_text(bad)
    typo_sweep = root / "typo_sweep.py"
    text = (ROOT / "configs" / "quickstart_sweep.py").read_text()
    typo = text.replace('"zero_shot": {"experiment": "zero_shot"}', '"zero_shot": {"lr": 0.1}')
    assert typo != text, "configs/quickstart_sweep.py changed: update this case"
    typo_sweep.write_text(typo)
    two = {"XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu"}
    no_cma = root / "no_cma"  # shadows an installed cma, as if the extra were not installed
    (no_cma / "cma").mkdir(parents=True)
    (no_cma / "cma" / "__init__.py").write_text("raise ImportError('no cma here')\n")
    t5 = [str(ROOT / "train.py"), "--config", f"{ROOT / 'configs' / 't5_hybrid_cpu.py'}:prompt_lora",
          f"--workdir={root / 'workdir'}"]
    wikisql = {"question": "who?", "table": {"header": []},
               "sql": {"human_readable": "SELECT a FROM table"}}
    for split in ("validation", "test"):
        write_jsonl_gz(root / "t5data" / "wikisql" / f"{split}.jsonl.gz", [wikisql])
    write_jsonl_gz(root / "t5data" / "samsum" / "train.jsonl.gz",
                   [{"dialogue": "", "summary": "x"}])
    t5data = f"--config.data_dir={root / 't5data'}"
    return {
        # train.py: the command line and the config
        "config file": Case([str(ROOT / "train.py"), "--config", "configs/nope.py",
                             f"--workdir={root / 'workdir'}"], "cannot load the config file"),
        "config key": Case(train + ["--config.tsak=rte"], "unknown config key 'tsak'"),
        "config type": Case(train + ["--config.batch_size=big"], "batch_size"),
        "extra argument": Case(train + ["rte"], "unexpected arguments: rte"),
        "experiment": Case(train + ["--config.experiment=ft_lorra"],
                           "experiment 'ft_lorra' is unknown"),
        # numbers and choices, checked before anything loads
        "batch_size=0": Case(train + ["--config.batch_size=0"], "batch_size=0 must be >= 1"),
        "max_length=0": Case(train + ["--config.max_length=0"], "max_length=0 must be >= 2"),
        "negative lr": Case(train + ["--config.optimizer.learning_rate=-1"],
                            "optimizer.learning_rate=-1.0 must be >= 0.0"),
        "num_epochs<0": Case(train + ["--config.num_epochs=-1"], "num_epochs=-1 must be >= 0"),
        "lora.r=0": Case(train + ["--config.lora.r=0"], "lora.r=0 must be >= 1"),
        "lora.dropout": Case(train + ["--config.lora.dropout=1.5"], "lora.dropout=1.5 must be <"),
        "lora.alpha": Case(train + ["--config.lora.alpha=0"], "lora.alpha=0.0 must be > 0"),
        "dtype": Case(train + ["--config.dtype=float16"], "dtype='float16' must be one of"),
        "schedule": Case(train + ["--config.optimizer.schedule=step"],
                         "optimizer.schedule='step' must be one of"),
        "buckets": Case(train + ["--config.buckets=(0,16)"], "buckets=(0, 16) must be a tuple"),
        "selection_size": Case(train + ["--config.selection_size=1.5"],
                               "selection_size=1.5 must be a fraction"),
        "pooling": Case(train + ["--config.pooling=max"], "config pooling='max' must be one of"),
        "eval_batch_size devices": Case(train + ["--config.eval_batch_size=3"],
                                        "eval_batch_size 3 is not divisible by the 2 devices",
                                        env=two),
        "mesh": Case(train + ["--config.mesh.shape=(2,3)"],
                     "mesh.shape=(2, 3) does not fit the 2 devices", env=two),
        # the model, the data
        "model path": Case(train + ["--config.model=/no/such/model"], "does not exist"),
        "truncated weights": Case(train + [f"--config.model={truncated}"],
                                  "truncated or corrupt"),
        "unknown task": Case(train + ["--config.task=sst3"], "unknown task 'sst3'"),
        "missing split": Case(train + [f"--config.data_dir={no_val}"], "no 'validation' split"),
        "label range": Case(train + [f"--config.data_dir={bad_label}"], "outside the 2 classes"),
        "label not a number": Case(train + [f"--config.data_dir={word_label}"],
                                   "'positive', not a number"),
        "empty split": Case(train + [f"--config.data_dir={empty}"], "has no rows"),
        "corrupt data file": Case(train + [f"--config.data_dir={root / 'corrupt'}"],
                                  "cannot parse"),
        "selection too big": Case(train + ["--config.selection_size=5000"], "leaves"),
        "used workdir": Case([*train[:-1], f"--workdir={used}"], "already holds checkpoints",
                             outputs=("used/metrics.jsonl", "used/results.json")),
        # AttEns through train.py
        "attens module set": Case(attens, "is not a module set"),
        "attens key it ignores": Case(attens + ["--config.lora.r=8"], "unknown config key"),
        "attens agg1": Case(attens + ["--config.combiner.agg1=median"],
                            "combiner.agg1 'median' is unknown"),
        "attens feature batch devices": Case(attens + ["--config.feature_batch_size=3"],
                                             "feature_batch_size 3 is not divisible", env=two),
        "attens num_epochs=0": Case(attens + ["--config.num_epochs=0"],
                                    "num_epochs must be at least 1"),
        "attens unknown method": Case(attens + ["--config.combiner.method=fusion2"],
                                      "combiner.method='fusion2' must be one of attens"),
        "attens fusion over logits": Case(attens + ["--config.combiner.method=fusion",
                                                    "--config.combiner.output=logits"],
                                          "combiner.method='fusion' attends over the modules' "
                                          "deltas"),
        "attens merge density": Case(attens + ["--config.combiner.method=merge",
                                               "--config.combiner.merge_density=1.5"],
                                     "combiner.merge_density=1.5 must be <= 1.0"),
        "attens lorahub without cma": Case(attens + ["--config.combiner.method=lorahub"],
                                           "the cma package: pip install 'cma>=3.3' (the "
                                           "[lorahub] extra: pip install -e '.[lorahub]' in "
                                           "the repository)",
                                           env={"PYTHONPATH": f"{no_cma}{os.pathsep}{ROOT}"}),
        "few-shot budget above train": Case(train + ["--config.train_budget=100000"],
                                            "train_budget=100000 is larger than the"),
        # T5 through train.py
        "t5 task": Case(t5 + [f"--config.data_dir={data}", "--config.task=sst3"],
                        "unknown t5 task 'sst3'"),
        "t5 variant": Case(t5 + [f"--config.data_dir={data}", "--config.variant=prompt_lorra",
                                 "--config.task=synth_keyword"],
                           "t5 variant 'prompt_lorra' is unknown"),
        "t5 table header": Case(t5 + [t5data, "--config.task=wikisql",
                                      "--config.train_split=validation",
                                      "--config.selection_split=test"], "has no table header"),
        "t5 empty dialogue": Case(t5 + [t5data, "--config.task=samsum"], "empty dialogue"),
        "t5 trains on a reported split": Case(t5 + [t5data, "--config.task=wikisql",
                                                    "--config.train_split=validation"],
                                              "also the selection or a reported split"),
        "t5 num_beams=0": Case(t5 + [f"--config.data_dir={data}", "--config.num_beams=0"],
                               "num_beams=0 must be >= 1"),
        # ensemble.train_modules
        "modules: no --tasks": Case(modules, "give --sweep, --workdir and --tasks",
                                    outputs=("modules", "workdir")),
        "modules: --from-peft without --model": Case(
            ["-m", "ensemble.train_modules", "--from-peft", str(used), "--out",
             str(root / "modules")], "--from-peft needs --model", outputs=("modules",)),
        "modules: --from-peft not an adapter": Case(
            ["-m", "ensemble.train_modules", "--from-peft", str(used), "--model", model,
             "--out", str(root / "modules")], "has no adapter_config.json", outputs=("modules",)),
        # lora_jax.predict and lora_jax.export
        "predict: not a finished run": Case(predict + ["--workdir", str(used)],
                                            "has no results.json", outputs=("p.jsonl",)),
        "predict: run and adapter": Case(predict + ["--workdir", str(used), "--model", model,
                                                    "--adapter", str(used)],
                                         "give --workdir RUN, or --model M with --adapter A",
                                         outputs=("p.jsonl",)),
        "predict: output not .jsonl": Case(predict[:-2] + ["--output", str(root / "p.csv"),
                                                           "--workdir", str(used)],
                                           "must be a .jsonl file", outputs=("p.csv",)),
        "predict: missing adapter": Case(predict + ["--model", model, "--adapter",
                                                    str(root / "no_adapter")],
                                         "does not exist", outputs=("p.jsonl",)),
        "export: unknown format": Case(["-m", "lora_jax.export", "--workdir", str(used),
                                        "--format", "onnx", "--out", str(root / "exported")],
                                       "invalid choice: 'onnx'", outputs=("exported",)),
        "modules: unknown task": Case(modules + ["--tasks", "synth_sentiment,nope"],
                                      "unknown task 'nope'", outputs=("modules", "workdir")),
        "modules: task twice": Case(modules + ["--tasks", "synth_topic,synth_topic"],
                                    "names one twice", outputs=("modules", "workdir")),
        "modules: sweep file": Case(["-m", "ensemble.train_modules", "--sweep", "nope.py",
                                     "--workdir", str(root / "workdir"), "--tasks", "a",
                                     "--out", str(root / "modules")], "does not exist",
                                    outputs=("modules", "workdir")),
        # lora_jax.sweep
        "sweep: unknown row": Case(sweep + ["--rows", "attens,nope"], "row(s) nope not in",
                                   outputs=("workdir", "table", "table.json", "table.md")),
        "sweep: unknown task": Case(sweep + ["--only", "sst2"], "task(s) sst2 not in",
                                    outputs=("workdir", "table", "table.json", "table.md")),
        "sweep: bad value": Case(sweep[:3] + [str(bad_sweep)] + sweep[4:],
                                 "batch_size=0 must be >= 1",
                                 outputs=("workdir", "table", "table.json", "table.md")),
        "sweep: override key": Case(sweep[:3] + [str(typo_sweep)] + sweep[4:],
                                    "sweep override 'lr' is not a config key",
                                    outputs=("workdir", "table", "table.json", "table.md")),
    }


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    """Run every case (3 at a time) in its own folder; {name: (case, folder, process)}."""
    base = tmp_path_factory.mktemp("bad")
    model, data = make_quickstart_assets(str(base / "assets"))
    cases = {}
    for i, name in enumerate(_cases(base, model, data)):
        folder = base / f"case{i}"
        folder.mkdir()
        cases[name] = (_cases(folder, model, data)[name], folder)

    def run(item):
        case, folder = item
        return subprocess.run([sys.executable, *case.command], cwd=ROOT, capture_output=True,
                              text=True, timeout=300,
                              env={**os.environ, "PYTHONPATH": str(ROOT), **(case.env or {})})

    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        procs = dict(zip(cases, pool.map(run, cases.values()), strict=True))
    return {name: (*cases[name], procs[name]) for name in cases}


def _names() -> list[str]:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        (tmp / "m").mkdir()
        return list(_cases(tmp, str(tmp / "m"), str(tmp / "d")))


def test_there_are_at_least_25_kinds():
    assert len(_names()) >= 25


@pytest.mark.parametrize("extra", ["lorahub", "tfds"])
def test_a_missing_extra_is_named_with_the_packages_of_pyproject(extra):
    """The hint installs what pyproject.toml's extra lists (lora-jax is not on PyPI, so
    ``pip install 'lora-jax[extra]'`` would fail) and gives the editable form for a clone."""
    tomllib = pytest.importorskip("tomllib")
    from lora_jax.errors import extra_install_hint

    listed = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"][extra]
    hint = extra_install_hint(extra)
    assert hint.startswith("pip install ") and "lora-jax[" not in hint
    assert hint.split(" (")[0].split()[2:] == [f"'{p}'" for p in listed]
    assert hint.endswith(f"pip install -e '.[{extra}]' in the repository)")


def test_tfds_without_its_package_is_one_error_naming_the_install(monkeypatch):
    import builtins

    from lora_jax import data as data_lib
    from lora_jax.errors import UserError
    from lora_jax.tasks import get_task

    real_import = builtins.__import__

    def no_tfds(name, *args, **kwargs):
        if name.startswith("tensorflow_datasets"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tfds)
    with pytest.raises(UserError, match=r"needs tensorflow-datasets: pip install "
                                        r"'tensorflow-datasets>=4\.9'"):
        data_lib._tfds_rows(get_task("sst2"), "train")


@pytest.mark.slow
@pytest.mark.parametrize("name", _names())
def test_bad_input_is_one_error_line_exit_2_and_writes_nothing(outcomes, name):
    case, folder, proc = outcomes[name]
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and case.message in errors[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    for path in case.outputs:
        assert not (folder / path).exists(), f"{path} was written"
