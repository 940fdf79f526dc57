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

import jax
import jax.numpy as jnp
import numpy as np

from ensemble.combiner import AGGREGATIONS, AttEnsCombiner
from ensemble.features import (
    AGG1,
    OUTPUTS,
    cached_features,
    compute_split_features,
    fingerprint,
    make_feature_fn,
    stack_heads,
    stack_trees,
    with_base_slot,
)
from ensemble.modules import ModuleSet, load_module_set
from lora_jax import data as data_lib
from lora_jax import lora as lora_lib
from lora_jax import metrics as metrics_lib
from lora_jax import trainer
from lora_jax.config_check import (
    NON_NEGATIVE,
    POSITIVE,
    PROBABILITY,
    boolean,
    register_rules,
    validate_config,
)
from lora_jax.distributed import BatchShare, map_batches
from lora_jax.errors import UserError
from lora_jax.models import Encoder
from lora_jax.models.encoder import POOLINGS
from lora_jax.models.hf_import import load_pretrained, place_pretrained
from lora_jax.tasks import Task, resolve_task

log = logging.getLogger("lora_jax.attens")

register_rules({
    "k": NON_NEGATIVE, "feature_batch_size": POSITIVE,
    "combiner.num_heads": POSITIVE, "combiner.dropout": PROBABILITY,
    "quirks.attend_across_batch": boolean, "quirks.shared_layernorm": boolean,
    "quirks.count_padding": boolean, "quirks.encoder_dropout": boolean,
})


@dataclasses.dataclass
class FeatureSplit:
    """Cached features of one split: modules (N, k, D), base (N, d), labels (N,)."""

    modules: np.ndarray
    base: np.ndarray
    labels: np.ndarray
    seconds: float  # extraction time (0 when read from the cache)
    cached: bool

    def __len__(self) -> int:
        return len(self.labels)


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


def _check(config) -> None:
    c = config.combiner
    if c.agg1 not in AGG1:
        raise UserError(f"combiner.agg1 {c.agg1!r} is unknown; use one of {', '.join(AGG1)}")
    if c.agg2 not in AGGREGATIONS:
        raise UserError(f"combiner.agg2 {c.agg2!r} is unknown; use one of "
                        f"{', '.join(AGGREGATIONS)}")
    if c.output not in OUTPUTS:
        raise UserError(f"combiner.output {c.output!r} is unknown; use hidden or logits")
    if c.base_pooling not in POOLINGS:
        raise UserError(f"combiner.base_pooling {c.base_pooling!r} is unknown; use one of "
                        f"{', '.join(POOLINGS)}")


def feature_settings(config, model_params, tokenizer, stacked, heads, modules: list[str],
                     max_len: int, pad_to: tuple[int, ...]) -> dict:
    """The feature-cache key: everything a row's features depend on. The model and adapters by
    content (sha256 of their arrays), the tokenizer by its serialised state, and the padded
    lengths (``count_padding`` features depend on them)."""
    c = config.combiner
    return {"model": fingerprint(model_params), "tokenizer": data_lib.tokenizer_fingerprint(
                tokenizer), "adapters": fingerprint((stacked, heads)), "modules": modules,
            "output": c.output, "agg1": c.agg1, "base_pooling": c.base_pooling,
            "count_padding": config.quirks.count_padding, "max_length": max_len,
            "padded_lengths": list(pad_to), "dtype": config.dtype}


@dataclasses.dataclass
class FeatureExtractor:
    """The frozen side of AttEns: the base encoder with the first k modules stacked (plus the
    all-zero base slot), and how its rows are tokenized and padded."""

    module_set: ModuleSet
    k: int
    model: str
    tokenizer: Any
    base_params: dict
    stacked: dict  # every module's adapters (k_all + 1 on the leading axis)
    heads: tuple  # (kernels (k_all, d, Cmax), biases (k_all, Cmax))
    feature_fn: Any
    max_length: int
    pad_to: tuple[int, ...]  # padded lengths of feature batches
    pad_id: int
    hidden_size: int  # d of the base features

    def features(self, enc: data_lib.Encoded, batch_size: int, put=lambda b: b,
                 desc: str = "features", progress: bool = False, rows=None,
                 share: BatchShare | None = None, out_sharding=None):
        """(modules (N, k_all, D), base (N, d)) float32 numpy of `rows` (default all) of
        `enc`; each process feeds its share of every batch, every process gets all rows."""
        return compute_split_features(self.feature_fn, self.base_params, self.stacked,
                                      self.heads, enc, batch_size=batch_size, buckets=self.pad_to,
                                      pad_id=self.pad_id, put=put, desc=desc, progress=progress,
                                      rows=rows, share=share, out_sharding=out_sharding)


def build_feature_extractor(config) -> FeatureExtractor:
    """Load the module set, the base encoder and its tokenizer; check they fit. Reads no data."""
    _check(config)
    mset = load_module_set(config.module_dir, tuple(config.modules))
    k = config.k or len(mset.modules)
    if not 1 <= k <= len(mset.modules):
        raise UserError(f"k={config.k} but the module set has {len(mset.modules)} modules "
                        f"({', '.join(mset.tasks)}); use 1..{len(mset.modules)} or 0 for all")
    if config.combiner.output == "logits" and any(m.meta.get("head", "linear") != "linear"
                                                  for m in mset.modules):
        raise UserError("combiner.output='logits' applies each module's linear head to every "
                        "token; modules with transformers heads (head='hf', or --from-peft) "
                        "need combiner.output='hidden'")
    model = config.model or mset.model
    model_dir, enc_cfg, pretrained, _, _ = load_pretrained(model)
    if config.combiner.base_pooling == "pooler" and not enc_cfg.has_pooler:
        raise UserError(f"combiner.base_pooling='pooler' needs a BERT pooler; {model} has none, "
                        "use mean or cls")
    tokenizer = data_lib.load_tokenizer(model_dir, config.tokenizer)
    max_len = min(config.max_length, enc_cfg.max_position_embeddings)
    encoder = Encoder(enc_cfg, lora_dropout=mset.spec.dropout,
                      dtype=trainer.DTYPES[config.dtype])
    ids = jnp.zeros((1, 8), jnp.int32)
    initialised = encoder.init(jax.random.PRNGKey(config.seed), ids)["params"]
    base_params = lora_lib.cast_floating(place_pretrained(initialised, pretrained),
                                         trainer.DTYPES[config.param_dtype])
    try:
        stacked = with_base_slot(stack_trees([m.lora for m in mset.modules]))
        heads = stack_heads([m.head for m in mset.modules]) if (
            config.combiner.output == "logits") else ()
        jax.eval_shape(lambda: encoder.apply({"params": base_params, "lora": jax.tree_util.tree_map(
            lambda x: x[0], stacked)}, ids))
    except (ValueError, TypeError) as e:
        raise UserError(f"the modules in {config.module_dir} do not fit the encoder {model} "
                        f"({type(e).__name__}); use the base model they were trained on") from None
    feature_fn = make_feature_fn(encoder, output=config.combiner.output, agg1=config.combiner.agg1,
                                 base_pooling=config.combiner.base_pooling,
                                 count_padding=config.quirks.count_padding)
    # A token mean over padding depends on the padded length: with count_padding every row is
    # padded to max_length (as a tokenizer with padding="max_length" does), so a row's features
    # never depend on the batch it lands in; otherwise the usual length buckets.
    pad_to = ((max_len,) if config.quirks.count_padding
              else data_lib.bucket_lengths(max_len, config.buckets))
    return FeatureExtractor(mset, k, model, tokenizer, base_params, stacked, heads, feature_fn,
                            max_len, pad_to, tokenizer.pad_token_id or 0, enc_cfg.hidden_size)


def prepare_attens(config) -> AttensSetup:
    """Validate, load modules/base/data and produce (or read) the features. Writes only cache."""
    validate_config(config)
    if config.num_epochs < 1:
        raise UserError("AttEns trains a combiner: num_epochs must be at least 1")
    trainer.check_divisible_by_devices(config, ("batch_size", "eval_batch_size",
                                                "feature_batch_size"))
    task = resolve_task(config)
    share = BatchShare.of_this_process(batch_size=config.batch_size,
                                       eval_batch_size=config.eval_batch_size,
                                       feature_batch_size=config.feature_batch_size)
    fx = build_feature_extractor(config)
    examples, sources = data_lib.load_examples(config, task)
    encoded = {name: data_lib.encode(ex, fx.tokenizer, fx.max_length)
               for name, ex in examples.items()}
    settings = feature_settings(config, fx.base_params, fx.tokenizer, fx.stacked, fx.heads,
                                fx.module_set.tasks, fx.max_length, fx.pad_to)
    place = trainer.Placement.from_config(config)
    splits = {}
    k = fx.k
    for name, enc in encoded.items():
        compute = lambda idx, enc=enc, name=name: fx.features(
            enc, config.feature_batch_size, place.put_batch, f"features {task.name}/{name}",
            config.progress, rows=idx, share=share, out_sharding=place.batch)
        modules, base, seconds, n_new = cached_features(config.feature_cache, settings,
                                                        examples[name].texts, compute)
        log.info("features %s/%s: %d rows, %d computed (%.1f s), %d from the cache", task.name,
                 name, len(enc), n_new, seconds, len(enc) - n_new)
        splits[name] = FeatureSplit(modules[:, :k], base, enc.labels, seconds, n_new == 0)
    k_stacked = jax.tree_util.tree_map(
        lambda x: jnp.concatenate([x[:k], x[-1:]]), fx.stacked)  # first k modules + base slot
    frozen = {"base": fx.base_params, "adapters": k_stacked,
              "heads": jax.tree_util.tree_map(lambda x: x[:k], fx.heads)
              } if config.quirks.encoder_dropout else {}
    return AttensSetup(config, task, fx.module_set, k, splits, encoded, fx.feature_fn, frozen,
                       fx.pad_id, fx.pad_to, sources, share)


def build_combiner(config, task: Task, hidden: int) -> AttEnsCombiner:
    c, q = config.combiner, config.quirks
    return AttEnsCombiner(num_classes=task.num_labels, num_heads=c.num_heads, agg2=c.agg2,
                          lift_dim=hidden if c.output == "logits" else None, dropout=c.dropout,
                          attend_across_batch=q.attend_across_batch,
                          shared_layernorm=q.shared_layernorm)


def init_combiner(combiner: AttEnsCombiner, seed: int, modules, base) -> dict:
    """The combiner's initial variables: a function of the seed and of the shapes of a batch's
    modules (B, k, D) and base (B, d) only, not of their values."""
    return jax.jit(combiner.init)(jax.random.PRNGKey(seed), modules, base)


def _pad_rows(x: np.ndarray, size: int) -> np.ndarray:
    if len(x) == size:
        return x
    return np.concatenate([x, np.zeros((size - len(x), *x.shape[1:]), x.dtype)])


def feature_batch(split: FeatureSplit, idx: np.ndarray, size: int) -> dict:
    """Features of rows `idx`, zero-padded to `size` rows; weights 0 mark the padding rows."""
    weights = np.zeros(size, np.float32)
    weights[: len(idx)] = 1
    return {"modules": _pad_rows(split.modules[idx], size), "base": _pad_rows(split.base[idx], size),
            "labels": _pad_rows(split.labels[idx], size), "weights": weights}


def map_combiner(fn, split: FeatureSplit, batch_size: int, put=lambda b: b,
                 share: BatchShare | None = None):
    """``fn(feature batch)`` over a split, outputs gathered back in row order. Batches hold
    consecutive rows, the same for every evaluation and prediction and any number of
    processes, so the batch-axis quirk always attends to the same neighbours."""
    return map_batches(fn, len(split), np.zeros(len(split), np.int64), batch_size,
                       lambda idx, size, _rows: feature_batch(split, idx, size), put=put,
                       share=share)


def evaluate_combiner(predict, params, split: FeatureSplit, task: Task, batch_size: int,
                      put=lambda b: b, share: BatchShare | None = None):
    """(metrics, mean attention (k, k) over examples and heads, or None with the batch
    quirk)."""
    preds, att = map_combiner(lambda batch: predict(params, batch), split, batch_size, put,
                              share)
    mean_att = None if att is None else att.mean(0)
    return metrics_lib.compute(task.metrics, preds, split.labels), mean_att


def make_loss_fn(setup: AttensSetup, combiner: AttEnsCombiner) -> trainer.LossFn:
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
    combiner = build_combiner(cfg, task, train.base.shape[-1])
    bs = cfg.batch_size
    sample = feature_batch(train, np.arange(min(bs, len(train))), bs)
    params = init_combiner(combiner, cfg.seed, sample["modules"], sample["base"])
    place = trainer.Placement.from_config(cfg)

    @functools.partial(jax.jit, out_shardings=place.batch)
    def predict(p, batch):  # predictions (B,), attention over modules (B, k, k) head-averaged
        logits, att = combiner.apply(p, batch["modules"], batch["base"],
                                     row_mask=batch["weights"] > 0, return_attention=True)
        pred = trainer.weighted_loss_and_predictions(logits, batch["labels"], batch["weights"],
                                                     task.is_regression)[1]
        return pred, None if cfg.quirks.attend_across_batch else att.mean(1)

    if cfg.quirks.encoder_dropout:
        tokens = setup.encoded["train"]

        def batch_of(idx, size, step_rows):  # tokens, labels, weights: features made in the step
            return data_lib.make_batch(tokens, idx, size, setup.feature_buckets, setup.pad_id,
                                       step_rows)
    else:
        batch_of = lambda idx, size, _rows: feature_batch(train, idx, size)

    reported_attention: dict[str, np.ndarray] = {}

    def evaluate(p, _frozen, split, workdir):
        scores, att = evaluate_combiner(predict, p, setup.splits[split], task,
                                        cfg.eval_batch_size, place.put_batch, setup.share)
        if workdir is not None and att is not None:
            reported_attention.setdefault(split, att)
        return scores

    modules = setup.module_set.tasks[: setup.k]

    def extra(_best) -> dict:
        attention = next(iter(reported_attention.values()), None)
        return {
            "k": setup.k, "modules": modules, "unseen": task.name not in setup.module_set.tasks,
            "attention": None if attention is None else {
                "modules": modules, "matrix": attention.round(5).tolist(),
                "mean_received": attention.mean(0).round(5).tolist()},
            "feature_seconds": {n: round(s.seconds, 2) for n, s in setup.splits.items()},
            "feature_cache_hits": {n: s.cached for n, s in setup.splits.items()},
            "quirks": cfg.quirks.to_dict(), "combiner": cfg.combiner.to_dict()}

    sizes = {name: len(s) for name, s in setup.splits.items()}
    return trainer.Experiment(
        name="attens", config=cfg, task=task, model=cfg.model or setup.module_set.model,
        trainable=params, frozen=setup.frozen, train_lengths=setup.encoded["train"].lengths,
        loss_fn=make_loss_fn(setup, combiner), batch_of=batch_of, evaluate=evaluate,
        selection_split="selection" if "selection" in setup.splits else task.eval_splits[0],
        sizes=sizes, sources=setup.sources, protocol=trainer.selection_protocol(sizes, task.eval_splits),
        meta={"task": task.name, "experiment": "attens", "modules": modules,
              "config": cfg.to_dict()},
        desc=f"attens {task.name} k={setup.k}", extra=extra, share=setup.share)


def train_attens(config, workdir: str) -> dict[str, Any]:
    """Fit the combiner; returns (and writes) the shared results record plus AttEns fields."""
    wall_start = time.perf_counter()
    setup = prepare_attens(config)
    return trainer.run_experiment(experiment(setup), os.fspath(workdir), wall_start)
