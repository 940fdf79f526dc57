"""Train the AttEns combiner on a target task over a frozen module set.

`train_attens(config, workdir)` is what ``train.py`` runs for ``experiment="attens"``:

1. load the module set (``config.module_dir``, modules in ``config.modules`` order, first k),
   the frozen base encoder, and the target task's splits (held-out selection slice of train);
2. features: the k modules + the base as ONE stacked pass per batch, cached on disk per row
   (see `ensemble.features`); reused across epochs, runs, seeds and k;
3. fit the combiner (the only trainable parameters) with the shared loop of
   `lora_jax.trainer` (the same step factory, selection, early stopping, checkpoints and resume
   as every experiment), report validation; results.json holds the feature-extraction time, the
   combiner-training time and the combiner's mean attention over modules.

With ``quirks.encoder_dropout`` (the reference code leaves dropout on in the frozen encoders) the
training features are recomputed from tokens with dropout at every step: no cache, much slower.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ensemble import lorahub
from ensemble.combiner import COMBINER_METHODS, build_combiner, combiner_method, module_weights
from ensemble.features import (
    FeatureSplit,
    build_feature_extractor,
    cached_features,
    feature_batch,
    feature_settings,
    map_combiner,
    merge_weights,
    merged_adapter,
    module_digests,
)
from ensemble.modules import ModuleSet
from lora_jax import data as data_lib
from lora_jax import metrics as metrics_lib
from lora_jax import trainer
from lora_jax.config_check import (
    NON_NEGATIVE,
    POSITIVE,
    PROBABILITY,
    boolean,
    number,
    one_of,
    register_rules,
    validate_config,
)
from lora_jax.distributed import BatchShare
from lora_jax.errors import UserError
from lora_jax.merge import MAJORITY_SIGN_METHODS, MERGE_METHODS
from lora_jax.results import selection_protocol
from lora_jax.sharding import Placement, mesh_of
from lora_jax.tasks import Task, resolve_task

log = logging.getLogger("lora_jax.attens")

register_rules({
    "k": NON_NEGATIVE, "feature_batch_size": POSITIVE,
    "combiner.num_heads": POSITIVE, "combiner.dropout": PROBABILITY,
    "combiner.method": one_of(*COMBINER_METHODS),
    "combiner.merge_method": one_of(*MERGE_METHODS),
    "combiner.merge_density": number(0.0, 1.0, lo_open=True),
    "combiner.merge_majority_sign": one_of(*MAJORITY_SIGN_METHODS),
    "combiner.lorahub_evaluations": POSITIVE, "combiner.lorahub_search_rows": POSITIVE,
    "combiner.lorahub_l1": number(0.0), "combiner.lorahub_bound": number(0.0, lo_open=True),
    "quirks.attend_across_batch": boolean, "quirks.shared_layernorm": boolean,
    "quirks.count_padding": boolean, "quirks.encoder_dropout": boolean,
})


@dataclasses.dataclass
class AttensSetup:
    config: Any
    task: Task
    module_set: ModuleSet
    k: int
    splits: dict[str, FeatureSplit]
    encoded: dict[str, data_lib.Encoded]
    feature_fn: Any  # for the encoder-dropout quirk
    frozen: dict  # base params, the first k adapters + the base slot, heads (dropout quirk)
    pad_id: int
    feature_buckets: tuple[int, ...]
    sources: dict[str, str]
    share: BatchShare  # the rows of every global batch this process feeds
    search: dict | None = None  # lorahub's weight search (`ensemble.lorahub.search_weights`)


def prepare_attens(config) -> AttensSetup:
    """Validate, load modules/base/data and produce (or read) the features. Writes only cache."""
    validate_config(config)
    if config.num_epochs < 1:
        raise UserError("AttEns trains a combiner: num_epochs must be at least 1")
    share = BatchShare.of_this_process(mesh_of(config), batch_size=config.batch_size,
                                       eval_batch_size=config.eval_batch_size,
                                       feature_batch_size=config.feature_batch_size)
    task = resolve_task(config)
    fx = build_feature_extractor(config)
    examples, sources = data_lib.load_examples(data_lib.DataSource.of(config), task,
                                               data_lib.SplitSizes.of(config), config.seed)
    encoded = {name: data_lib.encode(ex, fx.tokenizer, fx.max_length)
               for name, ex in examples.items()}
    place = Placement.from_config(config)
    search = None
    if combiner_method(config) == "lorahub" and not config.combiner.merge_weights:
        if "selection" not in encoded:
            raise UserError("combiner.method='lorahub' scores its candidates on the selection "
                            "slice; set selection_size > 0")
        search = lorahub.search_weights(
            config, fx, encoded["train"], encoded["selection"], task.num_labels,
            task.is_regression, trainer.weighted_loss_and_predictions,
            lambda ex, enc, rows: ex.features(enc, config.feature_batch_size, place.put_batch,
                                              rows=rows, share=share, out_sharding=place.batch))
        log.info("lorahub on %s: weights %s (objective %.4f after %d evaluations)", task.name,
                 search["weights"], search["objective"], len(search["history"]))
        config.combiner.merge_weights = tuple(search["weights"])  # the run's config: its merge
        fx = fx.with_adapters([merged_adapter(config, fx.module_set, fx.k)])
    settings = feature_settings(config, fx.base_params, fx.tokenizer, fx.stacked, fx.heads,
                                fx.module_set.tasks, fx.max_length, fx.pad_to)
    splits = {}
    slots = fx.slots
    for name, enc in encoded.items():
        compute = lambda idx, enc=enc, name=name: fx.features(
            enc, config.feature_batch_size, place.put_batch, f"features {task.name}/{name}",
            config.progress, rows=idx, share=share, out_sharding=place.batch)
        modules, base, seconds, n_new = cached_features(config.feature_cache, settings,
                                                        examples[name].texts, compute)
        log.info("features %s/%s: %d rows, %d computed (%.1f s), %d from the cache", task.name,
                 name, len(enc), n_new, seconds, len(enc) - n_new)
        splits[name] = FeatureSplit(modules[:, :slots], base, enc.labels, seconds, n_new == 0)
    frozen = {}
    if config.quirks.encoder_dropout:  # the encoder runs in every train step: read slots + base
        read = jax.tree_util.tree_map(lambda x: jnp.concatenate([x[:slots], x[-1:]]), fx.stacked)
        frozen = {"base": fx.base_params, "adapters": read,
                  "heads": jax.tree_util.tree_map(lambda x: x[:slots], fx.heads)}
    return AttensSetup(config, task, fx.module_set, fx.k, splits, encoded, fx.feature_fn, frozen,
                       fx.pad_id, fx.pad_to, sources, share, search)


def init_combiner(combiner: nn.Module, seed: int, modules, base) -> dict:
    """The combiner's initial variables: a function of the seed and of the shapes of a batch's
    modules (B, k, D) and base (B, d) only, not of their values."""
    return jax.jit(combiner.init)(jax.random.PRNGKey(seed), modules, base)


def evaluate_combiner(predict, params, split: FeatureSplit, task: Task, batch_size: int,
                      put=lambda b: b, share: BatchShare | None = None):
    """(metrics, mean attention (k, k) over examples and heads (None with the batch quirk or
    a combiner without attention), (predictions, labels))."""
    preds, att = map_combiner(lambda batch: predict(params, batch), split, batch_size, put,
                              share)
    mean_att = None if att is None else att.mean(0)
    return (metrics_lib.compute(task.metrics, preds, split.labels), mean_att,
            (preds, split.labels))


def make_loss_fn(setup: AttensSetup, combiner: nn.Module) -> trainer.LossFn:
    regression = setup.task.is_regression

    def loss_fn(params, frozen, batch, rng):
        if setup.config.quirks.encoder_dropout:  # features from tokens, dropout on, no gradient
            rng, feat_rng = jax.random.split(rng)
            modules, base = jax.lax.stop_gradient(setup.feature_fn(
                frozen["base"], frozen["adapters"], frozen["heads"], batch, feat_rng))
        else:
            modules, base = batch["modules"], batch["base"]
        logits = combiner.apply(params, modules, base, row_mask=batch["weights"] > 0,
                                deterministic=False, rngs={"dropout": rng})
        return trainer.weighted_loss_and_predictions(logits, batch["labels"], batch["weights"],
                                                     regression)[0]

    return loss_fn


def experiment(setup: AttensSetup) -> trainer.Experiment:
    """The combiner as an `Experiment` of the shared pipeline."""
    cfg, task = setup.config, setup.task
    train = setup.splits["train"]
    combiner = build_combiner(cfg, task.num_labels, train.base.shape[-1])
    bs = cfg.batch_size
    sample = feature_batch(train, np.arange(min(bs, len(train))), bs)
    params = init_combiner(combiner, cfg.seed, sample["modules"], sample["base"])
    place = Placement.from_config(cfg)

    @functools.partial(jax.jit, out_shardings=place.batch)
    def predict(p, batch):  # predictions (B,), attention over modules (B, k, k) head-averaged
        logits, att = combiner.apply(p, batch["modules"], batch["base"],
                                     row_mask=batch["weights"] > 0, return_attention=True)
        pred = trainer.weighted_loss_and_predictions(logits, batch["labels"], batch["weights"],
                                                     task.is_regression)[1]
        return pred, None if att is None or cfg.quirks.attend_across_batch else att.mean(1)

    if cfg.quirks.encoder_dropout:
        tokens = setup.encoded["train"]

        def batch_of(idx, size, step_rows):  # tokens, labels, weights: features made in the step
            return data_lib.make_batch(tokens, idx, size, setup.feature_buckets, setup.pad_id,
                                       step_rows)
    else:
        batch_of = lambda idx, size, _rows: feature_batch(train, idx, size)

    reported_attention: dict[str, np.ndarray] = {}

    def evaluate(p, _frozen, split, workdir):
        scores, att, rows = evaluate_combiner(predict, p, setup.splits[split], task,
                                              cfg.eval_batch_size, place.put_batch, setup.share)
        if workdir is not None and att is not None:
            reported_attention.setdefault(split, att)
        return scores, rows

    modules = setup.module_set.tasks[: setup.k]
    digests = module_digests(setup.module_set.modules[: setup.k])

    def extra(best) -> dict:
        attention = next(iter(reported_attention.values()), None)
        weights = module_weights(best)
        return {
            "k": setup.k, "modules": modules, "module_sha256": digests,
            "unseen": task.name not in setup.module_set.tasks,
            "method": combiner_method(cfg),
            "attention": None if attention is None else {
                "modules": modules, "matrix": attention.round(5).tolist(),
                "mean_received": attention.mean(0).round(5).tolist()},
            "module_weights": None if weights is None else dict(zip([*modules, "base"], weights,
                                                                    strict=True)),
            "merge_weights": dict(zip(modules, merge_weights(cfg, setup.k), strict=True))
            if combiner_method(cfg) in ("merge", "lorahub") else None,
            "lorahub_search": setup.search,
            "feature_seconds": {n: round(s.seconds, 2) for n, s in setup.splits.items()},
            "feature_cache_hits": {n: s.cached for n, s in setup.splits.items()},
            "quirks": cfg.quirks.to_dict(), "combiner": cfg.combiner.to_dict()}

    sizes = {name: len(s) for name, s in setup.splits.items()}
    return trainer.Experiment(
        name="attens", config=cfg, task=task, model=cfg.model or setup.module_set.model,
        trainable=params, frozen=setup.frozen, train_lengths=setup.encoded["train"].lengths,
        loss_fn=make_loss_fn(setup, combiner), batch_of=batch_of, evaluate=evaluate,
        selection_split="selection" if "selection" in setup.splits else task.eval_splits[0],
        sizes=sizes, sources=setup.sources, protocol=selection_protocol(sizes, task.eval_splits),
        meta={"task": task.name, "experiment": "attens", "modules": modules,
              "config": cfg.to_dict()},
        desc=f"attens {task.name} k={setup.k}", extra=extra, share=setup.share)


def train_attens(config, workdir: str) -> dict[str, Any]:
    """Fit the combiner; returns (and writes) the shared results record plus AttEns fields."""
    if combiner_method(config) == "fusion":  # inside the encoder: its own model, no cache
        from ensemble.fusion import train_fusion

        return train_fusion(config, workdir)
    wall_start = time.perf_counter()
    setup = prepare_attens(config)
    return trainer.run_experiment(experiment(setup), os.fspath(workdir), wall_start)
