"""The sweep's override merging and table, and the README quickstart command end to end."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest

from lora_jax.errors import UserError
from lora_jax.experiments import load_config
from lora_jax.sweep import apply_overrides, cell_config, markdown_table

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
    assert [r["task"] for r in json.loads(out.with_suffix(".json").read_text())["results"]] == [
        "sst2"]


@pytest.mark.slow
def test_readme_quickstart_runs_the_four_rows(tmp_path):
    """The README's quickstart from a fresh folder: modules, then Model/FFN/FT_LoRA/AttEns."""
    import shutil

    work = tmp_path / "repo"
    shutil.copytree(ROOT / "configs", work / "configs")
    proc = subprocess.run([sys.executable, "-m", "ensemble.quickstart"], cwd=work,
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {ln.split("|")[1].strip(): [c.strip() for c in ln.split("|")[2:-1]]
            for ln in proc.stdout.splitlines() if ln.startswith("| ") and "---" not in ln}
    assert [r for r in rows if r] == ["Model", "FFN", "FT_LoRA", "AttEns"]
    average = {r: float(v[-1]) for r, v in rows.items() if r}
    assert average["FT_LoRA"] > average["FFN"] > average["Model"] + 10  # each row learns more
    assert average["AttEns"] > average["FFN"] + 5  # the combiner uses the modules
    assert "SMOKE RUN" in proc.stdout
    done = list((work / "runs" / "quickstart").glob("attens_*_s0/results.json"))
    assert len(done) == 3
    again = subprocess.run([sys.executable, "-m", "ensemble.quickstart", "--keep"], cwd=work,
                           capture_output=True, text=True, timeout=600,
                           env={**os.environ, "PYTHONPATH": str(ROOT)})  # reuses the runs
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.split("| AttEns |")[1].splitlines()[0] == \
        proc.stdout.split("| AttEns |")[1].splitlines()[0]


def test_quickstart_starts_fresh_but_keeps_its_assets(tmp_path):
    from ensemble.quickstart import clear_runs

    (tmp_path / "assets" / "tiny-bert").mkdir(parents=True)
    (tmp_path / "ft_lora_x_s0" / "checkpoints").mkdir(parents=True)
    (tmp_path / "table.json").write_text("{}")
    clear_runs(str(tmp_path), keep=str(tmp_path / "assets"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["assets"]
    assert (tmp_path / "assets" / "tiny-bert").is_dir()
