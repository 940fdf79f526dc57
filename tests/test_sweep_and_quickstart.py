"""The sweep's override merging and table, and the README quickstart command end to end."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import ml_collections
import pytest

from lora_jax.errors import UserError
from lora_jax.experiments import load_config
from lora_jax.sweep import apply_overrides, cell_config, markdown_table
from lora_jax.sweep_record import read_record

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_overrides_merge_nested_and_reject_unknown_keys():
    _, c = load_config(str(ROOT / "configs" / "ft_lora.py"))
    apply_overrides(c, {"optimizer": {"learning_rate": 0.5}, "task": "rte"})
    assert c.optimizer.learning_rate == 0.5 and c.optimizer.weight_decay == 0.01
    assert c.task == "rte"
    with pytest.raises(UserError, match="'lr' is not a config key"):
        apply_overrides(c, {"lr": 1.0})


def test_cell_config_layers_common_experiment_and_task():
    _, sweep = load_config(str(ROOT / "configs" / "glue_cpu.py"))
    c = cell_config(sweep, "ft_lora", "sst2", 3, str(ROOT))
    assert (c.experiment, c.task, c.seed, c.num_epochs, c.max_length) == ("ft_lora", "sst2", 3, 2, 64)
    assert c.optimizer.learning_rate == 5e-4
    z = cell_config(sweep, "zero_shot", "rte", 0, str(ROOT))
    assert z.num_epochs == 0 and z.selection_size == 0 and z.max_length == 128


def _fake(exp, task, seed, value):
    return {"experiment": exp, "task": task, "seed": seed, "main_metric": "accuracy",
            "metrics": {"validation": {"accuracy": value}}, "model": "m",
            "config": {"pooling": "mean", "dtype": "float32"}, "protocol": "p",
            "sizes": {"train": 10}, "train_seconds": 1.0, "train_examples_per_s": 10.0,
            "machine": "cpu"}


def test_markdown_table_mean_std_and_average():
    _, sweep = load_config(str(ROOT / "configs" / "glue_cpu.py"))
    sweep.tasks, sweep.seeds, sweep.experiments = ("a", "b"), (0, 1), ("ft_lora",)
    results = [_fake("ft_lora", "a", 0, 0.8), _fake("ft_lora", "a", 1, 0.6),
               _fake("ft_lora", "b", 0, 0.5), _fake("ft_lora", "b", 1, 0.5)]
    table = markdown_table(sweep, results, "cmd")
    assert "| FT_LoRA | 70.0 ± 14.1 | 50.0 ± 0.0 | 60.0 |" in table  # sample std (n - 1)
    assert "mean ± sample std" in table
    assert "Command: `cmd`" in table and "Machine: cpu" in table
    from lora_jax.report import score_table

    # a task without a finished cell yet: its name, no empty metric brackets
    assert score_table(results, ["ft_lora"], ["a", "c"]).splitlines()[0] == (
        "| | a (accuracy) | c | average |")


def test_a_narrowed_sweep_tables_only_the_cells_it_was_asked_for(tmp_path, monkeypatch):
    import json

    from lora_jax import results, sweep

    monkeypatch.setattr(results, "uncommitted_changes", lambda: [])
    for task, value in (("sst2", 0.8), ("cola", 0.1)):
        cell = tmp_path / "w" / f"ft_lora_{task}_s0"
        cell.mkdir(parents=True)
        (cell / "results.json").write_text(json.dumps(_fake("ft_lora", task, 0, value)))
    out = tmp_path / "t"
    assert sweep.main(["--config", str(ROOT / "configs" / "glue_cpu.py"), "--workdir",
                       str(tmp_path / "w"), "--only", "sst2", "--rows", "ft_lora", "--collect",
                       "--out", str(out)]) == 0
    table = out.with_suffix(".md").read_text()
    assert "| | sst2 (accuracy) | average |" in table and "cola" not in table
    assert "| FT_LoRA | 80.0 | 80.0 |" in table and "FFN" not in table
    assert [r["task"] for r in read_record(str(out.with_suffix(".json")))["results"]] == [
        "sst2"]


BUDGET_SWEEP = """
import ml_collections

def get_config():
    c = ml_collections.ConfigDict()
    c.name = "few-shot"
    c.experiments = ("ffn", "ft_lora")
    c.tasks = ("sst2",)
    c.seeds = (0,)
    c.common = ml_collections.ConfigDict({"selection_size": 0.1})
    c.task_overrides = ml_collections.ConfigDict({})
    c.experiment_overrides = ml_collections.ConfigDict({"ft_lora": {"selection_size": 500}})
    c.budgets = ml_collections.ConfigDict({"n16": {"train_budget": 16, "selection_size": 0.25},
                                           "full": {}})
    return c
"""


def test_a_budget_axis_runs_each_cell_per_budget_and_tables_each_apart(tmp_path, monkeypatch,
                                                                       capsys):
    import argparse
    import json

    from lora_jax import results, sweep

    (tmp_path / "few.py").write_text(BUDGET_SWEEP)
    _, config = load_config(str(tmp_path / "few.py"))
    few = cell_config(config, "ft_lora", "sst2", 0, str(ROOT), "n16")
    assert (few.train_budget, few.selection_size) == (16, 0.25)  # the budget's overrides last
    full = cell_config(config, "ft_lora", "sst2", 0, str(ROOT), "full")
    assert (full.train_budget, full.selection_size) == (0, 500)
    monkeypatch.setattr(results, "uncommitted_changes", lambda: [])
    for budget, value in (("n16", 0.6), ("full", 0.8)):
        for exp in ("ffn", "ft_lora"):
            cell = tmp_path / "w" / f"{exp}_sst2_{budget}_s0"
            cell.mkdir(parents=True)
            (cell / "results.json").write_text(json.dumps(_fake(exp, "sst2", 0, value)))
    out = tmp_path / "t"
    args = ["--config", str(tmp_path / "few.py"), "--workdir", str(tmp_path / "w"), "--collect",
            "--out", str(out)]
    assert sweep.main(args) == 0
    table = out.with_suffix(".md").read_text()
    assert table.index("## Budget n16") < table.index("| FT_LoRA | 60.0 | 60.0 |") < table.index(
        "## Budget full") < table.index("| FT_LoRA | 80.0 | 80.0 |")
    cells = read_record(str(out.with_suffix(".json")))["results"]
    assert [(r["sweep_row"], r["sweep_budget"]) for r in cells] == [
        ("ffn", "n16"), ("ft_lora", "n16"), ("ffn", "full"), ("ft_lora", "full")]
    assert sweep.main([*args, "--budgets", "full"]) == 0
    assert "n16" not in out.with_suffix(".md").read_text()
    with pytest.raises(SystemExit) as bad:
        sweep.main([*args, "--budgets", "n8"])
    assert bad.value.code == 2
    assert "error: budget(s) n8 not in this sweep (it has n16, full)" in capsys.readouterr().err
    typed = argparse.Namespace(config="c.py", workdir="w", out="o", allow_dirty=False)
    assert sweep.cell_command(typed, "ffn", "sst2", 0, "n16").endswith(
        "--rows ffn --seeds 0 --budgets n16")


def test_row_budgets_narrow_a_row_and_the_full_budget_is_the_one_without_a_cap(
        tmp_path, monkeypatch):
    import json

    from lora_jax import results, sweep

    (tmp_path / "few.py").write_text(BUDGET_SWEEP.replace(
        "    return c", '    c.row_budgets = ml_collections.ConfigDict({"ffn": ("full",)})\n'
        "    return c"))
    _, config = load_config(str(tmp_path / "few.py"))
    assert sweep.full_budget(config) == "full"
    monkeypatch.setattr(results, "uncommitted_changes", lambda: [])
    for budget in ("n16", "full"):
        for exp in ("ffn", "ft_lora"):  # ffn at n16 finished too: row_budgets leaves it out
            cell = tmp_path / "w" / f"{exp}_sst2_{budget}_s0"
            cell.mkdir(parents=True)
            (cell / "results.json").write_text(json.dumps(_fake(exp, "sst2", 0, 0.7)))
    out = tmp_path / "t"
    assert sweep.main(["--config", str(tmp_path / "few.py"), "--workdir", str(tmp_path / "w"),
                       "--collect", "--out", str(out)]) == 0
    cells = read_record(str(out.with_suffix(".json")))["results"]
    assert [(r["sweep_row"], r["sweep_budget"]) for r in cells] == [
        ("ft_lora", "n16"), ("ffn", "full"), ("ft_lora", "full")]
    capped = ml_collections.ConfigDict({"budgets": {"n16": {"train_budget": 16}}})
    with pytest.raises(UserError, match=r"budgets \['n16'\] all cap train_budget"):
        sweep.full_budget(capped)
    assert sweep.full_budget(ml_collections.ConfigDict({"seeds": (0,)})) == ""


def test_reuse_restores_recorded_cells_whose_config_agrees(tmp_path, monkeypatch):
    import json

    from lora_jax import results, sweep

    monkeypatch.setattr(results, "uncommitted_changes", lambda: [])
    _, config = load_config(str(ROOT / "configs" / "glue_cpu.py"))
    recorded = []
    for task, value in (("sst2", 0.8), ("cola", 0.1)):
        cell = cell_config(config, "ft_lora", task, 0, str(ROOT)).to_dict()
        r = {**_fake("ft_lora", task, 0, value), "sweep_row": "ft_lora", "git_commit": "abc",
             "command": f"python -m lora_jax.sweep ... --only {task}",
             "config": {**cell, "resume": True, "new_key_of_then": 1}}
        recorded.append(r)
    recorded[1]["config"]["max_length"] = 99  # cola ran with another config: not reused
    (tmp_path / "earlier.json").write_text(json.dumps({"results": recorded}))
    out = tmp_path / "t"
    args = ["--config", str(ROOT / "configs" / "glue_cpu.py"), "--workdir", str(tmp_path / "w"),
            "--rows", "ft_lora", "--only", "sst2,cola", "--collect", "--out", str(out),
            "--reuse", str(tmp_path / "earlier.json")]
    assert sweep.main(args) == 0
    restored = json.loads((tmp_path / "w" / "ft_lora_sst2_s0" / "results.json").read_text())
    assert restored["git_commit"] == "abc" and restored["command"].endswith("--only sst2")
    assert not (tmp_path / "w" / "ft_lora_cola_s0").exists()
    cells = read_record(str(out.with_suffix(".json")))["results"]
    assert [(r["task"], r["sweep_row"]) for r in cells] == [("sst2", "ft_lora")]
    # the record this sweep wrote (a file per cell) carries the cell to another workdir
    again = ["--config", str(ROOT / "configs" / "glue_cpu.py"), "--workdir",
             str(tmp_path / "w2"), "--rows", "ft_lora", "--only", "sst2", "--collect", "--out",
             str(tmp_path / "t2"), "--reuse", str(out.with_suffix(".json"))]
    assert sweep.main(again) == 0
    assert json.loads((tmp_path / "w2" / "ft_lora_sst2_s0" / "results.json").read_text()) == (
        restored)
    with pytest.raises(SystemExit):
        sweep.main([*args[:-1], str(tmp_path / "nowhere.json")])


@pytest.mark.slow
def test_readme_quickstart_runs_every_row(tmp_path):
    """The README's quickstart from a fresh folder: modules, then Model/FFN/FT_LoRA/AttEns and
    every other combiner: Average, Scalar weights, the three merges, LoraHub and Fusion."""
    import shutil

    work = tmp_path / "repo"
    shutil.copytree(ROOT / "configs", work / "configs")
    proc = subprocess.run([sys.executable, "-m", "ensemble.quickstart"], cwd=work,
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {ln.split("|")[1].strip(): [c.strip() for c in ln.split("|")[2:-1]]
            for ln in proc.stdout.splitlines() if ln.startswith("| ") and "---" not in ln}
    assert [r for r in rows if r] == ["Model", "FFN", "FT_LoRA", "AttEns", "Average",
                                      "Scalar weights", "Merge (linear)", "Merge (TIES)",
                                      "Merge (DARE)", "LoraHub", "Fusion"]
    average = {r: float(v[-1]) for r, v in rows.items() if r}
    assert average["FT_LoRA"] > average["FFN"] > average["Model"] + 10  # each row learns more
    for combiner in ("AttEns", "Average", "Scalar weights", "LoraHub", "Fusion"):
        assert average[combiner] > average["FFN"] + 5, combiner  # each uses the modules
    for merge in ("Merge (linear)", "Merge (TIES)", "Merge (DARE)"):  # one merged adapter of
        assert average[merge] > average["Model"] + 10, merge  # three unrelated tasks: a head
    assert "SMOKE RUN" in proc.stdout and "LoraHub row is left out" not in proc.stdout
    for row in ("attens", "average", "scalar", "merge_linear", "merge_ties", "merge_dare",
                "lorahub", "fusion"):
        assert len(list((work / "runs" / "quickstart").glob(f"{row}_*_s0/results.json"))) == 3
    again = subprocess.run([sys.executable, "-m", "ensemble.quickstart", "--keep"], cwd=work,
                           capture_output=True, text=True, timeout=600,
                           env={**os.environ, "PYTHONPATH": str(ROOT)})  # reuses the runs
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.split("| AttEns |")[1].splitlines()[0] == \
        proc.stdout.split("| AttEns |")[1].splitlines()[0]


def test_quickstart_leaves_lorahub_out_and_says_so_without_its_extra(tmp_path, monkeypatch,
                                                                     capsys):
    """Without the cma package (shadowed by one that fails to import, as if the extra were not
    installed) the quickstart's sweep has every row but LoraHub, and the quickstart says why."""
    no_cma = tmp_path / "no_cma" / "cma"
    no_cma.mkdir(parents=True)
    (no_cma / "__init__.py").write_text("raise ImportError('no cma here')\n")
    proc = subprocess.run(
        [sys.executable, "-c", "import configs.quickstart_sweep as q; "
         "print(q.HAS_LORAHUB, q.get_config().experiments)"], cwd=ROOT, capture_output=True,
        text=True, timeout=120,
        env={**os.environ, "PYTHONPATH": f"{no_cma.parent}{os.pathsep}{ROOT}"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("False (") and "'lorahub'" not in proc.stdout
    assert "'merge_dare', 'fusion')" in proc.stdout
    import configs.quickstart_sweep as quickstart_sweep
    from ensemble import quickstart, train_modules
    from lora_jax import sweep, synthetic

    assert quickstart_sweep.HAS_LORAHUB  # [test] installs the extra: the row runs
    assert "lorahub" in quickstart_sweep.get_config().experiments
    # the quickstart's own words, its training stubbed out
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "quickstart_sweep.py").write_text("")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(quickstart_sweep, "HAS_LORAHUB", False)
    monkeypatch.setattr(synthetic, "make_quickstart_assets", lambda path: None)
    monkeypatch.setattr(train_modules, "main", lambda argv: 0)
    monkeypatch.setattr(sweep, "main", lambda argv: 0)
    assert quickstart.main([]) == 0
    out = capsys.readouterr().out
    assert "/ merge / Fusion combiners" in out
    assert "The LoraHub row is left out: its CMA-ES library is an optional extra " \
           "(pip install -e '.[lorahub]')." in out


def test_quickstart_starts_fresh_but_keeps_its_assets(tmp_path):
    from ensemble.quickstart import clear_runs

    (tmp_path / "assets" / "tiny-bert").mkdir(parents=True)
    (tmp_path / "ft_lora_x_s0" / "checkpoints").mkdir(parents=True)
    (tmp_path / "table.json").write_text("{}")
    clear_runs(str(tmp_path), keep=str(tmp_path / "assets"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["assets"]
    assert (tmp_path / "assets" / "tiny-bert").is_dir()
