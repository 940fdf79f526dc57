"""Every sweep config in configs/ builds a valid config for each of its cells, so a sweep of
hours never stops at its hundredth cell on a key typo; the MiniLM-L6 grid has the shape its
docstring promises."""

from __future__ import annotations

import pathlib

import pytest

from lora_jax.config_check import validate_config
from lora_jax.experiments import load_config, runner
from lora_jax.sweep import cell_config, full_budget, sweep_cells

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _sweeps() -> list[str]:
    names = []
    for path in sorted((ROOT / "configs").glob("*.py")):
        text = path.read_text()
        if "c.experiments = " in text and "c.tasks = " in text:
            names.append(path.name)
    return names


def _cells(sweep):
    """(row, task, seed, budget) of every cell the sweep runs."""
    return [(e, t, s, b) for s, t, e, b in sweep_cells(sweep)]


def test_the_sweep_configs_are_found():
    assert {"glue_cpu.py", "attens_cpu_sweep.py", "attens_minilm_l6_sweep.py",
            "attens_minilm_l6_stsb_unseen_sweep.py", "quickstart_sweep.py"} <= set(_sweeps())


@pytest.mark.parametrize("name", _sweeps())
def test_every_cell_of_a_sweep_config_validates(name):
    _, sweep = load_config(str(ROOT / "configs" / name))
    cells = _cells(sweep)
    assert cells
    for experiment, task, seed, budget in cells:
        config = cell_config(sweep, experiment, task, seed, str(ROOT), budget)
        runner(config.experiment)  # registers its own config rules
        validate_config(config)


def test_the_minilm_l6_grid_has_the_shape_its_docstring_gives():
    _, sweep = load_config(str(ROOT / "configs" / "attens_minilm_l6_sweep.py"))
    cells = _cells(sweep)
    assert len(cells) == 1016  # README: 1,016 cells
    assert full_budget(sweep) == "all"
    rows_at = lambda budget: {e for e, _, _, b in cells if b == budget}
    assert rows_at("n16") == set(sweep.experiments) - {"zero_shot", "attens_k2", "attens_k4"}
    assert {s for e, _, s, _ in cells if e == "attens_k2"} == {0, 1, 2}  # 3 seeds for every k
    cell = lambda row, task, budget="all": cell_config(sweep, row, task, 0, str(ROOT), budget)
    for task in ("sst2", "imdb", "rte"):  # Fusion trains through the encoder as FT_LoRA does
        fusion, ft_lora = cell("fusion", task), cell("ft_lora", task)
        assert (fusion.num_epochs, fusion.optimizer.learning_rate, fusion.max_length) == (
            ft_lora.num_epochs, ft_lora.optimizer.learning_rate, ft_lora.max_length)
    assert cell("merge_ties", "trec").combiner.merge_method == "ties"
    assert cell("merge_dare", "trec").combiner.merge_method == "dare_linear"
    assert (cell("lorahub", "cola", "n16").train_budget, cell("lorahub", "cola", "n16").num_epochs
            ) == (16, 100)
    assert cell("attens", "mrpc").module_dir == "runs/modules/minilm_l6"
    _, unseen = load_config(str(ROOT / "configs" / "attens_minilm_l6_stsb_unseen_sweep.py"))
    stsb = cell_config(unseen, "attens", "stsb", 0, str(ROOT))
    assert "stsb" not in stsb.modules and stsb.module_dir.endswith("minilm_l6_no_stsb")
