"""Up-front checks of every numeric and categorical config value, with one-line errors.

`validate_config(config)` runs before any model or data is loaded, for every experiment: a key
the config has is checked against its rule; keys a config does not have are skipped (each
experiment's config holds only the keys it honours, so ml_collections already rejects the
others by name). The rules here cover the shared keys; an extension adds the rules of its own
keys with `register_rules` when it is imported.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from lora_jax.errors import UserError

Rule = Callable[[object], str | None]  # value -> what is wrong with it, or None


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)


def integer(lo: int | None = None, hi: int | None = None) -> Rule:
    def rule(v):
        if not _is_int(v):
            return "must be an integer"
        if lo is not None and v < lo:
            return f"must be >= {lo}"
        if hi is not None and v > hi:
            return f"must be <= {hi}"
        return None

    return rule


def number(lo: float | None = None, hi: float | None = None, hi_open: bool = False,
           lo_open: bool = False) -> Rule:
    def rule(v):
        if not _is_number(v):
            return "must be a finite number"
        if lo is not None and (v <= lo if lo_open else v < lo):
            return f"must be {'>' if lo_open else '>='} {lo}"
        if hi is not None and (v >= hi if hi_open else v > hi):
            return f"must be {'<' if hi_open else '<='} {hi}"
        return None

    return rule


def one_of(*choices: str) -> Rule:
    return lambda v: None if v in choices else f"must be one of {', '.join(choices)}"


def boolean(v) -> str | None:
    return None if isinstance(v, bool) else "must be True or False"


def positive_lengths(v) -> str | None:
    if not isinstance(v, (tuple, list)) or not all(_is_int(b) and b > 0 for b in v):
        return "must be a tuple of positive integers such as (16, 32, 64)"
    return None


def fraction_or_count(v) -> str | None:
    if not _is_number(v) or v < 0:
        return "must be 0, a fraction in (0, 1) or a row count"
    if v >= 1 and v != int(v):
        return "must be a fraction in (0, 1) or a whole row count"
    return None


def mesh_axes(v) -> str | None:
    if (not isinstance(v, (tuple, list)) or len(v) != 2
            or not all(_is_int(s) and (s == -1 or s >= 1) for s in v) or list(v).count(-1) > 1):
        return "must be (data, fsdp): two positive integers, or -1 in one place for the rest"
    return None


PROBABILITY = number(0.0, 1.0, hi_open=True)
POSITIVE = integer(1)
NON_NEGATIVE = integer(0)

RULES: dict[str, Rule] = {
    "dtype": one_of("float32", "bfloat16"), "param_dtype": one_of("float32", "bfloat16"),
    "batch_size": POSITIVE, "eval_batch_size": POSITIVE,
    "num_epochs": NON_NEGATIVE, "max_steps": NON_NEGATIVE,
    "max_length": integer(2, 1_000_000), "buckets": positive_lengths,
    "max_train_examples": NON_NEGATIVE, "max_eval_examples": NON_NEGATIVE,
    "train_budget": NON_NEGATIVE,
    "selection_size": fraction_or_count, "length_grouping": boolean,
    "seed": NON_NEGATIVE,
    "log_every_steps": POSITIVE, "eval_every_steps": NON_NEGATIVE,
    "checkpoint_every_steps": POSITIVE, "stop_after_steps": NON_NEGATIVE,
    "early_stopping_patience": NON_NEGATIVE, "resume": boolean, "progress": boolean,
    "classifier_dropout": PROBABILITY, "head": one_of("linear", "hf"),
    "pooling": one_of("", "mean", "cls", "pooler"),
    "lora.r": POSITIVE, "lora.alpha": number(0.0, lo_open=True), "lora.dropout": PROBABILITY,
    "optimizer.learning_rate": number(0.0), "optimizer.weight_decay": number(0.0),
    "optimizer.b1": PROBABILITY, "optimizer.b2": PROBABILITY,
    "optimizer.eps": number(0.0, lo_open=True), "optimizer.warmup_ratio": PROBABILITY,
    "optimizer.warmup_steps": NON_NEGATIVE, "optimizer.grad_clip": number(0.0),
    "optimizer.schedule": one_of("linear", "cosine", "constant"),
    "mesh.shape": mesh_axes,
}


def selection_within_budget(config) -> str | None:
    """A selection slice given as a row count must leave rows of a few-shot budget to train on
    (checked here, before any run reads its data)."""
    budget = config.get("train_budget", 0)
    selection = config.get("selection_size", 0)
    if budget and selection >= 1 and selection >= budget:
        return (f"config selection_size={selection:g} holds out at least all "
                f"train_budget={budget} rows, leaving none to train on; fix "
                "--config.selection_size (a fraction such as 0.25, or fewer rows)")
    return None


# checks across keys: config -> the problem, or None
CROSS_RULES = [selection_within_budget]


def register_rules(rules: dict[str, Rule]) -> None:
    """Add the rules of an extension's own config keys (dotted paths)."""
    RULES.update(rules)


def _lookup(config, dotted: str):
    node = config
    for part in dotted.split("."):
        if not hasattr(node, "keys") or part not in node:
            return False, None
        node = node[part]
    return True, node


def validate_config(config, rules: dict[str, Rule] | None = None) -> None:
    """Raise UserError on the first config value that breaks its rule: ``--config.KEY=VALUE``
    named, with what it must be."""
    for key, rule in (rules or RULES).items():
        present, value = _lookup(config, key)
        if not present:
            continue
        problem = rule(value)
        if problem:
            raise UserError(f"config {key}={value!r} {problem}; fix --config.{key}")
    for check in CROSS_RULES if rules is None else ():
        problem = check(config)
        if problem:
            raise UserError(problem)
