"""Train the AttEns combiner on a target task over a frozen module set.

`train_attens(config, workdir)` is what ``train.py`` runs for ``experiment="attens"``:

1. load the module set (``config.module_dir``, modules in ``config.modules`` order, first k),
   the frozen base encoder, and the target task's splits (held-out selection slice of train);
2. features: the k modules + the base as ONE stacked pass per batch, cached on disk per split
   (see `ensemble.features`); reused across epochs, runs, seeds and k;
3. fit the combiner (the only trainable parameters) with AdamW, select on the held-out slice,
   checkpoint with Orbax, report validation; results.json holds the feature-extraction and the
   combiner-training times separately, and the combiner's mean attention over modules.

With ``quirks.encoder_dropout`` (the reference code leaves dropout on in the frozen encoders) the
training features are recomputed with dropout at every step: no cache, much slower.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

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
from lora_jax import metrics as metrics_lib
from lora_jax.errors import UserError
from lora_jax.models import Encoder
from lora_jax.models.encoder import POOLINGS
from lora_jax.models.hf_import import load_pretrained
from lora_jax.tasks import Task
from lora_jax.trainer import (
    DTYPES,
    PROTOCOL,
    Best,
    Placement,
    checkpoint_manager,
    load_examples,
    load_tokenizer,
    loss_and_predictions,
    machine_description,
    make_optimizer,
    place_pretrained,
    prepare_workdir,
    resolve_task,
    restore_train_state,
    save_train_state,
)
from lora_jax.writers import MetricWriter, write_json_atomic

log = logging.getLogger("lora_jax.attens")


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
    base_params: Any
    stacked: Any
    heads: Any
    pad_id: int
    buckets: tuple[int, ...]
    sources: dict[str, str]


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
    if config.dtype not in DTYPES:
        raise UserError(f"dtype {config.dtype!r} is unknown; use float32 or bfloat16")


def prepare_attens(config) -> AttensSetup:
    """Validate, load modules/base/data and produce (or read) the features. Writes only cache."""
    _check(config)
    task = resolve_task(config)
    mset = load_module_set(config.module_dir, tuple(config.modules))
    k = config.k or len(mset.modules)
    if not 1 <= k <= len(mset.modules):
        raise UserError(f"k={config.k} but the module set has {len(mset.modules)} modules "
                        f"({', '.join(mset.tasks)}); use 1..{len(mset.modules)} or 0 for all")
    model = config.model or mset.model
    model_dir, enc_cfg, pretrained, _ = load_pretrained(model)
    if config.combiner.base_pooling == "pooler" and not enc_cfg.has_pooler:
        raise UserError(f"combiner.base_pooling='pooler' needs a BERT pooler; {model} has none, "
                        "use mean or cls")
    tokenizer = load_tokenizer(model_dir, config.tokenizer)
    examples, sources = load_examples(config, task)
    max_len = min(config.max_length, enc_cfg.max_position_embeddings)
    encoded = {name: data_lib.encode(ex, tokenizer, max_len) for name, ex in examples.items()}

    encoder = Encoder(enc_cfg, lora_alpha=mset.spec.alpha, lora_dropout=mset.spec.dropout,
                      dtype=DTYPES[config.dtype])
    ids = jnp.zeros((1, 8), jnp.int32)
    initialised = encoder.init(jax.random.PRNGKey(config.seed), ids)["params"]
    base_params = place_pretrained(initialised, pretrained)
    try:
        stacked = with_base_slot(stack_trees([m.lora for m in mset.modules]))
        heads = stack_heads([m.head for m in mset.modules])
        jax.eval_shape(lambda: encoder.apply({"params": base_params, "lora": jax.tree_util.tree_map(
            lambda x: x[0], stacked)}, ids))
    except (ValueError, TypeError) as e:
        raise UserError(f"the modules in {config.module_dir} do not fit the encoder {model} "
                        f"({type(e).__name__}); use the base model they were trained on") from None
    q = config.quirks
    feature_fn = make_feature_fn(encoder, output=config.combiner.output, agg1=config.combiner.agg1,
                                 base_pooling=config.combiner.base_pooling,
                                 count_padding=q.count_padding)
    buckets = data_lib.bucket_lengths(max_len, config.buckets)
    pad_id = tokenizer.pad_token_id or 0
    settings = {"model": os.path.realpath(model_dir), "adapters": fingerprint((stacked, heads)),
                "modules": mset.tasks, "output": config.combiner.output,
                "agg1": config.combiner.agg1, "base_pooling": config.combiner.base_pooling,
                "count_padding": q.count_padding, "max_length": max_len, "dtype": config.dtype}
    place = Placement.all_devices()
    splits = {}
    for name, enc in encoded.items():
        compute = lambda idx, enc=enc, name=name: compute_split_features(
            feature_fn, base_params, stacked, heads, enc.subset(idx),
            batch_size=config.feature_batch_size, buckets=buckets, pad_id=pad_id,
            put=place.put_batch, desc=f"features {task.name}/{name}")
        modules, base, seconds, n_new = cached_features(config.feature_cache, settings,
                                                        examples[name].texts, compute)
        log.info("features %s/%s: %d rows, %d computed (%.1f s), %d from the cache", task.name,
                 name, len(enc), n_new, seconds, len(enc) - n_new)
        splits[name] = FeatureSplit(modules[:, :k], base, enc.labels, seconds, n_new == 0)
    k_stacked = jax.tree_util.tree_map(
        lambda x: jnp.concatenate([x[:k], x[-1:]]), stacked)  # first k modules + the base slot
    return AttensSetup(config, task, mset, k, splits, encoded, feature_fn, base_params,
                       k_stacked, jax.tree_util.tree_map(lambda x: x[:k], heads), pad_id,
                       buckets, sources)


def build_combiner(config, task: Task, width: int, hidden: int) -> AttEnsCombiner:
    c, q = config.combiner, config.quirks
    return AttEnsCombiner(num_classes=task.num_labels, num_heads=c.num_heads, agg2=c.agg2,
                          lift_dim=hidden if c.output == "logits" else None, dropout=c.dropout,
                          attend_across_batch=q.attend_across_batch,
                          shared_layernorm=q.shared_layernorm)


def feature_batches(n: int, batch_size: int, seed: int, epoch: int) -> list[np.ndarray]:
    perm = np.random.default_rng([seed, epoch]).permutation(n)
    return [perm[i:i + batch_size] for i in range(0, n, batch_size)]


def index_matrix(batches: list[np.ndarray], size: int) -> tuple[np.ndarray, np.ndarray]:
    """(idx (steps, size) int32, weights (steps, size) float32); short batches padded with
    row 0 at weight 0."""
    idx = np.zeros((len(batches), size), np.int32)
    weights = np.zeros((len(batches), size), np.float32)
    for j, b in enumerate(batches):
        idx[j, : len(b)] = b
        weights[j, : len(b)] = 1
    return idx, weights


def _pad_rows(x: np.ndarray, size: int) -> np.ndarray:
    return np.concatenate([x, np.zeros((size - len(x), *x.shape[1:]), x.dtype)]) if len(x) < size else x


def feature_batch(split: FeatureSplit, idx: np.ndarray, size: int) -> dict:
    weights = np.zeros(size, np.float32)
    weights[: len(idx)] = 1
    return {"modules": _pad_rows(split.modules[idx], size), "base": _pad_rows(split.base[idx], size),
            "labels": _pad_rows(split.labels[idx], size), "weights": weights}


def evaluate_combiner(predict, params, split: FeatureSplit, task: Task, batch_size: int):
    """(metrics, mean attention (k, k) over examples and heads)."""
    preds = np.zeros(len(split), np.float32 if task.is_regression else np.int32)
    att_sum, att_n = None, 0
    for start in range(0, len(split), batch_size):
        idx = np.arange(start, min(start + batch_size, len(split)))
        pred, att = predict(params, feature_batch(split, idx, batch_size))
        preds[idx] = np.asarray(pred)[: len(idx)]
        att = np.asarray(att)
        if att.shape[0] == batch_size:  # (B, heads, k, k); the batch-axis quirk has no such map
            att = att[: len(idx)].mean(1).sum(0)  # mean over heads, sum over examples
            att_sum = att if att_sum is None else att_sum + att
            att_n += len(idx)
    mean_att = None if att_sum is None else att_sum / max(att_n, 1)
    return metrics_lib.compute(task.metrics, preds, split.labels), mean_att


def train_attens(config, workdir: str) -> dict[str, Any]:
    """Fit the combiner; returns (and writes) results like `lora_jax.trainer.train_and_evaluate`."""
    wall_start = time.perf_counter()
    setup = prepare_attens(config)
    task, cfg = setup.task, setup.config
    prepare_workdir(workdir, cfg.resume)
    train, sel = setup.splits["train"], setup.splits.get("selection")
    select_name = "selection" if sel is not None else task.eval_splits[0]
    select = sel if sel is not None else setup.splits[select_name]
    d = train.base.shape[-1]
    combiner = build_combiner(cfg, task, train.modules.shape[-1], d)
    bs = cfg.batch_size
    sample = feature_batch(train, np.arange(min(bs, len(train))), bs)
    params = combiner.init(jax.random.PRNGKey(cfg.seed), sample["modules"], sample["base"])
    n_params = sum(int(x.size) for x in jax.tree_util.tree_leaves(params))
    steps_per_epoch = -(-len(train) // bs)
    total_steps = cfg.num_epochs * steps_per_epoch
    tx = make_optimizer(cfg, total_steps)
    opt_state = tx.init(params)
    regression = task.is_regression
    base_rng = jax.random.PRNGKey(cfg.seed + 2)
    dropout_quirk = cfg.quirks.encoder_dropout

    def loss_fn(p, batch, rng):
        if dropout_quirk:  # recompute features from tokens with dropout on, frozen weights
            rng, feat_rng = jax.random.split(rng)
            modules, base = jax.lax.stop_gradient(setup.feature_fn(
                setup.base_params, setup.stacked, setup.heads, batch, feat_rng))
        else:
            modules, base = batch["modules"], batch["base"]
        logits = combiner.apply(p, modules, base, deterministic=False, rngs={"dropout": rng})
        return loss_and_predictions(logits, batch["labels"], batch["weights"], regression)[0]

    def update(p, opt_state, step, batch):
        loss, grads = jax.value_and_grad(loss_fn)(p, batch, jax.random.fold_in(base_rng, step))
        updates, opt_state = tx.update(grads, opt_state, p)
        p = optax.apply_updates(p, updates)
        return p, opt_state, {"train/loss": loss, "train/grad_norm": optax.global_norm(grads),
                              "train/param_norm": optax.global_norm(p)}

    train_step = jax.jit(update)  # one token batch (the encoder-dropout quirk)

    @jax.jit
    def train_epoch(p, opt_state, first_step, idx, weights, data):
        """Steps over (steps, B) index batches into on-device features, in one lax.scan."""

        def body(carry, xs):
            p, opt_state, step = carry
            i, w = xs
            batch = {"modules": data["modules"][i], "base": data["base"][i],
                     "labels": data["labels"][i], "weights": w}
            p, opt_state, m = update(p, opt_state, step, batch)
            return (p, opt_state, step + 1), m

        (p, opt_state, _), metrics = jax.lax.scan(body, (p, opt_state, first_step),
                                                  (idx, weights))
        return p, opt_state, metrics

    @jax.jit
    def predict(p, batch):
        logits, att = combiner.apply(p, batch["modules"], batch["base"], return_attention=True)
        return loss_and_predictions(logits, batch["labels"], batch["weights"], regression)[1], att

    def token_batch(idx):
        return data_lib.make_batch(setup.encoded["train"], idx, bs, setup.buckets, setup.pad_id)

    mngr = checkpoint_manager(workdir)
    writer = MetricWriter(workdir, resume_step=mngr.latest_step() if cfg.resume else None)
    best = Best(-np.inf, 0, params)
    step = 0
    if cfg.resume and mngr.latest_step() is not None:
        step, params, opt_state, best = restore_train_state(mngr, params, opt_state)
    meta = {"task": task.name, "experiment": "attens", "modules": setup.module_set.tasks[:setup.k],
            "config": cfg.to_dict()}
    t0 = time.perf_counter()
    paused = 0.0
    bar = tqdm(total=total_steps, initial=step, desc=f"attens {task.name} k={setup.k}",
               disable=not cfg.progress, dynamic_ncols=True)
    on_device = {"modules": jnp.asarray(train.modules), "base": jnp.asarray(train.base),
                 "labels": jnp.asarray(train.labels)}
    while step < total_steps:
        epoch, offset = divmod(step, steps_per_epoch)
        batches = feature_batches(len(train), bs, cfg.seed, epoch)[offset:]
        if dropout_quirk:
            for idx in batches:
                params, opt_state, m = train_step(params, opt_state, step, token_batch(idx))
                step += 1
                bar.update(1)
                if step % cfg.log_every_steps == 0:
                    writer.write(step, jax.device_get(m))
        else:
            idx, weights = index_matrix(batches, bs)
            params, opt_state, ms = train_epoch(params, opt_state, step, idx, weights, on_device)
            ms = jax.device_get(ms)
            for j in range(len(batches)):
                if (step + j + 1) % cfg.log_every_steps == 0:
                    writer.write(step + j + 1, {k: v[j] for k, v in ms.items()})
            step += len(batches)
            bar.update(len(batches))
        t_eval = time.perf_counter()
        scores, _ = evaluate_combiner(predict, params, select, task, cfg.eval_batch_size)
        writer.write(step, {f"{select_name}/{k}": v for k, v in scores.items()})
        if scores[task.main_metric] > best.score:
            best = Best(scores[task.main_metric], step, params)
        save_train_state(mngr, step, params, opt_state, best, meta)
        bar.set_postfix({task.main_metric: f"{scores[task.main_metric]:.4f}"})
        paused += time.perf_counter() - t_eval
    jax.block_until_ready(params)
    train_seconds = time.perf_counter() - t0 - paused
    bar.close()
    mngr.wait_until_finished()
    mngr.close()

    results = {"task": task.name, "experiment": "attens", "model": cfg.model or
               setup.module_set.model, "main_metric": task.main_metric, "metrics": {}}
    attention = None
    for split in task.eval_splits:
        results["metrics"][split], att = evaluate_combiner(predict, best.trainable,
                                                           setup.splits[split], task,
                                                           cfg.eval_batch_size)
        attention = att if attention is None else attention
    if sel is not None:
        results["selection_metrics"], _ = evaluate_combiner(predict, best.trainable, sel, task,
                                                            cfg.eval_batch_size)
    sizes = {name: len(s) for name, s in setup.splits.items()}
    modules = setup.module_set.tasks[:setup.k]
    results.update({
        "k": setup.k, "modules": modules, "unseen": task.name not in setup.module_set.tasks,
        "attention": None if attention is None else {
            "modules": modules, "matrix": attention.round(5).tolist(),
            "mean_received": attention.mean(0).round(5).tolist()},
        "best_step": best.step, "total_steps": total_steps, "epochs": cfg.num_epochs,
        "trainable_params": n_params, "sizes": sizes,
        "feature_seconds": {n: round(s.seconds, 2) for n, s in setup.splits.items()},
        "feature_cache_hits": {n: s.cached for n, s in setup.splits.items()},
        "combiner_train_seconds": round(train_seconds, 2),
        "train_seconds": round(train_seconds, 2),
        "train_examples_per_s": round(cfg.num_epochs * len(train) / train_seconds, 1)
        if train_seconds else None,
        "protocol": PROTOCOL.format(n=sizes["selection"], splits=", ".join(task.eval_splits))
        if "selection" in sizes else f"no selection; metrics on {', '.join(task.eval_splits)}",
        "quirks": cfg.quirks.to_dict(), "combiner": cfg.combiner.to_dict(),
        "data_sources": setup.sources, "seed": cfg.seed, "machine": machine_description(),
        "wall_seconds": round(time.perf_counter() - wall_start, 1),
        "command": " ".join(sys.argv), "config": cfg.to_dict(),
    })
    writer.close()
    write_json_atomic(os.path.join(workdir, "results.json"), results)
    return results
