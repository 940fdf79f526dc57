"""Up-front config checks: each rule kind refuses what it must and accepts the defaults."""

from __future__ import annotations

import pathlib

import pytest

from lora_jax.config_check import validate_config
from lora_jax.errors import UserError
from lora_jax.experiments import load_config, runner
from tests.helpers import override

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("spec", ["ft_lora.py", "ffn.py", "zero_shot.py", "quickstart.py",
                                  "attens_minilm_cpu.py", "attens_bert.py", "t5_hybrid.py",
                                  "t5_hybrid_cpu.py:lora_only", "attens_paper.py:distilbert",
                                  "attens_paper.py:electra_small", "attens_paper.py:electra_base"])
def test_every_shipped_config_passes(spec):
    _, config = load_config(str(ROOT / "configs" / spec))
    runner(config.experiment)  # registers the experiment's own rules
    validate_config(config)


@pytest.mark.parametrize(("spec", "key", "value", "message"), [
    ("ft_lora.py", "eval_batch_size", 0, "eval_batch_size=0 must be >= 1"),
    ("ft_lora.py", "seed", -3, "seed=-3 must be >= 0"),
    ("ft_lora.py", "optimizer.b2", 1.0, "optimizer.b2=1.0 must be < 1.0"),
    ("ft_lora.py", "optimizer.eps", 0.0, "optimizer.eps=0.0 must be > 0.0"),
    ("ft_lora.py", "classifier_dropout", -0.1, "classifier_dropout=-0.1 must be >= 0.0"),
    ("ft_lora.py", "selection_size", 10.5, "must be a fraction in (0, 1) or a whole row count"),
    ("ft_lora.py", "optimizer.learning_rate", float("nan"), "must be a finite number"),
    ("attens_minilm_cpu.py", "combiner.num_heads", 0, "combiner.num_heads=0 must be >= 1"),
    ("attens_minilm_cpu.py", "quirks.count_padding", 1, "must be True or False"),
    ("t5_hybrid.py", "num_beams", 0, "num_beams=0 must be >= 1"),
    ("t5_hybrid.py", "prompt.num_tokens", 0, "prompt.num_tokens=0 must be >= 1"),
])
def test_bad_values_are_refused_by_name(spec, key, value, message):
    _, config = load_config(str(ROOT / "configs" / spec))
    runner(config.experiment)
    node = config
    *path, last = key.split(".")
    for part in path:
        node = node[part]
    node._fields[last] = value  # past ml_collections' type check (a float where an int is due)
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        validate_config(config)


def test_override_helper_still_typesafe():
    _, config = load_config(str(ROOT / "configs" / "ft_lora.py"))
    with pytest.raises(TypeError):
        override(config, batch_size="big")


def test_a_selection_count_that_eats_the_few_shot_budget_is_refused_before_any_data():
    _, config = load_config(str(ROOT / "configs" / "ft_lora.py"))
    override(config, train_budget=16, selection_size=1000)
    with pytest.raises(UserError, match=r"selection_size=1000 holds out at least all "
                                        r"train_budget=16 rows"):
        validate_config(config)
    for selection in (0.25, 12, 0):  # a fraction, a smaller count, none
        override(config, selection_size=selection)
        validate_config(config)
