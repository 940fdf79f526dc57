"""The generic single-task train loop: FT_LoRA, FFN (trained head) and zero-shot (untrained head).

`train_and_evaluate(config, workdir)` is what `train.py` runs. Everything that can fail on bad
input is checked in `prepare` before the workdir is touched. The loop is a pure, jit-compiled
`train_step` over a data-parallel mesh; Orbax checkpoints hold the trainable tree, optimizer
state, step and best-so-far, and the step fixes the data position, so a resumed run replays
exactly the batches an uninterrupted one would.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import platform
import sys
import time
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import traverse_util
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm.auto import tqdm

from lora_jax import data as data_lib
from lora_jax import lora as lora_lib
from lora_jax import metrics as metrics_lib
from lora_jax.errors import UserError
from lora_jax.models import EncoderConfig, SequenceClassifier
from lora_jax.models.encoder import POOLINGS
from lora_jax.models.hf_import import load_pretrained
from lora_jax.tasks import Task, custom_task, get_task
from lora_jax.writers import MetricWriter, write_json_atomic

log = logging.getLogger(__name__)

EVAL_SUBSET_SEED = 20240601  # fixed: every seed is scored on the same eval rows
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
PROTOCOL = ("model selection on a held-out slice of train ({n} rows, never trained on); "
            "metrics reported on {splits}")


# ----------------------------------------------------------------------------- setup


@dataclasses.dataclass
class Setup:
    """Everything a run needs, built and validated before anything is written."""

    config: ml_collections.ConfigDict
    task: Task
    model_dir: str
    encoder_config: EncoderConfig
    model: SequenceClassifier
    frozen: dict  # variables that never change
    trainable: dict  # variables the optimizer updates
    splits: dict[str, data_lib.Encoded]  # "train", "selection", and the eval splits
    pad_id: int
    buckets: tuple[int, ...]
    sources: dict[str, str]


def resolve_task(config) -> Task:
    if config.custom_task.get("name"):
        return custom_task(config.custom_task.to_dict())
    return get_task(config.task)


def data_source_of(config) -> str:
    if config.data_source != "auto":
        return config.data_source
    if config.data_dir:
        return "local"
    if any(config.data_files.values()):
        return "files"
    return "hub"


def load_tokenizer(model_dir: str, name: str):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(name or model_dir, use_fast=True)
    except Exception as e:
        raise UserError(f"could not load a tokenizer from {name or model_dir!r} "
                        f"({type(e).__name__}); the model folder needs tokenizer.json or "
                        "vocab.txt, or set --config.tokenizer=PATH") from None
    if not tok.is_fast:
        raise UserError(f"tokenizer at {name or model_dir!r} is not a fast tokenizer; "
                        "provide tokenizer.json")
    return tok


def load_examples(config, task: Task) -> tuple[dict[str, data_lib.Examples], dict[str, str]]:
    """Train / selection / eval splits as Examples, after the held-out slice and size caps."""
    source = data_source_of(config)
    files = {k: v for k, v in config.data_files.items() if v}
    sources, out = {}, {}
    for split in ("train", *task.eval_splits):
        if split == "train" and config.num_epochs == 0 and config.selection_size == 0:
            continue
        rows, where = load_split(task, split, source, config.data_dir, files)
        sources[split] = where
        out[split] = data_lib.examples_from_rows(rows, task, where)
    if "train" in out:
        if config.selection_size:
            out["train"], out["selection"] = data_lib.hold_out(out["train"], config.selection_size,
                                                               config.seed)
        if config.max_train_examples:
            n = min(config.max_train_examples, len(out["train"]))
            keep = np.random.default_rng(config.seed + 1).permutation(len(out["train"]))[:n]
            out["train"] = out["train"].subset(np.sort(keep))
        if config.num_epochs == 0:
            del out["train"]
    if config.max_eval_examples:  # a random subset (some splits are sorted by label), the
        for split in (*task.eval_splits, "selection"):  # same rows for every seed and row
            if split in out and len(out[split]) > config.max_eval_examples:
                keep = np.random.default_rng(EVAL_SUBSET_SEED).permutation(len(out[split]))
                out[split] = out[split].subset(np.sort(keep[: config.max_eval_examples]))
    return out, sources


load_split = data_lib.load_split  # indirection point for tests


def build_model(config, encoder_config: EncoderConfig, task: Task) -> SequenceClassifier:
    if config.pooling not in POOLINGS:
        raise UserError(f"pooling {config.pooling!r} is unknown; use one of {', '.join(POOLINGS)}")
    if config.pooling == "pooler" and not encoder_config.has_pooler:
        raise UserError(f"pooling='pooler' needs a BERT pooler; {encoder_config.model_type} has "
                        "none, use --config.pooling=mean or cls")
    if config.dtype not in DTYPES:
        raise UserError(f"dtype {config.dtype!r} is unknown; use float32 or bfloat16")
    return SequenceClassifier(encoder_config, task.num_labels, pooling=config.pooling,
                              classifier_dropout=config.classifier_dropout,
                              lora_alpha=config.lora.alpha, lora_dropout=config.lora.dropout,
                              dtype=DTYPES[config.dtype])


def place_pretrained(initialised: dict, pretrained: dict) -> dict:
    """`initialised` with every leaf that `pretrained` has replaced by the pretrained array."""
    flat = traverse_util.flatten_dict(initialised)
    for path, value in traverse_util.flatten_dict(pretrained).items():
        flat[path] = jnp.asarray(value)
    return traverse_util.unflatten_dict(flat)


def init_variables(model: SequenceClassifier, pretrained: dict, missing: list[str],
                   config) -> dict:
    """{"params": ..., "lora": ...}: the encoder from the checkpoint, the rest seeded.

    `jax.eval_shape` gives the tree first; only then are the head (and checkpoint-missing
    encoder leaves such as an absent pooler) initialised and the pretrained arrays placed.
    """
    ids = jnp.zeros((1, 8), jnp.int32)
    init = lambda rng: model.init(rng, ids, ids, ids)["params"]
    rng_init, rng_lora = jax.random.split(jax.random.PRNGKey(config.seed))
    jax.eval_shape(init, rng_init)  # fails fast on a bad config, allocates nothing
    params = jax.jit(init)(rng_init)
    params["encoder"] = place_pretrained(params["encoder"], pretrained)
    if missing:
        log.info("initialised from seed (not in the checkpoint): %s", ", ".join(missing))
    variables = {"params": params}
    if config.experiment == "ft_lora":
        spec = lora_spec(config)
        variables["lora"] = lora_lib.init_lora(rng_lora, params, spec)
    return variables


def lora_spec(config) -> lora_lib.LoRASpec:
    return lora_lib.LoRASpec(r=config.lora.r, alpha=config.lora.alpha,
                             dropout=config.lora.dropout, targets=tuple(config.lora.targets))


EXPERIMENTS = ("ft_lora", "ffn", "zero_shot", "full")


def trainable_patterns(config) -> tuple[str, ...]:
    if config.experiment not in EXPERIMENTS:
        raise UserError(f"experiment {config.experiment!r} is unknown; use one of "
                        f"{', '.join(EXPERIMENTS)}")
    if config.trainable:
        return tuple(config.trainable)
    return {"ft_lora": ("^lora/", "^params/head/"), "ffn": ("^params/head/",),
            "zero_shot": (), "full": (".*",)}[config.experiment]


def prepare(config) -> Setup:
    """Validate the config and inputs, load model and data. Writes nothing."""
    task = resolve_task(config)
    if config.batch_size % jax.device_count():
        raise UserError(f"batch_size {config.batch_size} is not divisible by the "
                        f"{jax.device_count()} devices; use a multiple of {jax.device_count()}")
    if config.experiment == "zero_shot":
        config.num_epochs = 0
    patterns = trainable_patterns(config)
    model_dir, enc_cfg, pretrained, missing = load_pretrained(config.model)
    model = build_model(config, enc_cfg, task)
    tokenizer = load_tokenizer(model_dir, config.tokenizer)
    examples, sources = load_examples(config, task)
    max_len = min(config.max_length, enc_cfg.max_position_embeddings)
    splits = {k: data_lib.encode(v, tokenizer, max_len) for k, v in examples.items()}
    variables = init_variables(model, pretrained, missing, config)
    mask = lora_lib.trainable_mask(variables, patterns)
    trainable, frozen = lora_lib.split(variables, mask)
    return Setup(config, task, model_dir, enc_cfg, model, frozen, trainable, splits,
                 tokenizer.pad_token_id or 0, data_lib.bucket_lengths(max_len, config.buckets),
                 sources)


# ----------------------------------------------------------------------------- steps


def make_optimizer(config, total_steps: int) -> optax.GradientTransformation:
    opt = config.optimizer
    warmup = opt.get("warmup_steps", 0) or int(opt.warmup_ratio * total_steps)
    warmup_part = optax.linear_schedule(0.0, opt.learning_rate, max(warmup, 1))
    rest = max(total_steps - warmup, 1)
    if opt.schedule == "linear":
        lr = optax.join_schedules([warmup_part, optax.linear_schedule(opt.learning_rate, 0.0, rest)],
                                  [warmup])
    elif opt.schedule == "cosine":
        lr = optax.join_schedules([warmup_part, optax.cosine_decay_schedule(opt.learning_rate,
                                                                            rest)], [warmup])
    elif opt.schedule == "constant":
        lr = optax.join_schedules([warmup_part, optax.constant_schedule(opt.learning_rate)],
                                  [warmup])
    else:
        raise UserError(f"optimizer.schedule {opt.schedule!r} is unknown; use linear, cosine or "
                        "constant")
    return optax.chain(
        optax.clip_by_global_norm(opt.grad_clip) if opt.grad_clip else optax.identity(),
        optax.adamw(lr, b1=opt.b1, b2=opt.b2, eps=opt.eps, weight_decay=opt.weight_decay,
                    mask=lora_lib.weight_decay_mask),
    )


def loss_and_predictions(logits: jax.Array, labels: jax.Array, weights: jax.Array,
                         regression: bool) -> tuple[jax.Array, jax.Array]:
    """Weighted mean loss (cross-entropy, or MSE when regression) and predictions (B,)."""
    if regression:
        pred = logits[:, 0]
        per_example = jnp.square(pred - labels.astype(jnp.float32))
    else:
        pred = jnp.argmax(logits, -1)
        per_example = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    return (per_example * weights).sum() / jnp.maximum(weights.sum(), 1.0), pred


def make_train_step(model: nn.Module, tx: optax.GradientTransformation, regression: bool,
                    base_rng: jax.Array) -> Callable:
    """train_step(trainable, opt_state, step, frozen, batch) -> (trainable, opt_state, metrics).

    Gradients are taken w.r.t. `trainable` only; `frozen` passes through untouched.
    """

    def train_step(trainable, opt_state, step, frozen, batch):
        rng = jax.random.fold_in(base_rng, step)

        def loss_fn(params):
            variables = lora_lib.combine(params, frozen)
            logits = model.apply(variables, batch["input_ids"], batch["attention_mask"],
                                 batch["token_type_ids"], deterministic=False,
                                 rngs={"dropout": rng})
            loss, _ = loss_and_predictions(logits, batch["labels"], batch["weights"], regression)
            return loss

        loss, grads = jax.value_and_grad(loss_fn)(trainable)
        updates, opt_state = tx.update(grads, opt_state, trainable)
        trainable = optax.apply_updates(trainable, updates)
        metrics = {"train/loss": loss, "train/grad_norm": optax.global_norm(grads),
                   "train/param_norm": optax.global_norm(trainable)}
        return trainable, opt_state, metrics

    return train_step


def make_predict_step(model: nn.Module, regression: bool) -> Callable:
    def predict_step(trainable, frozen, batch):
        logits = model.apply(lora_lib.combine(trainable, frozen), batch["input_ids"],
                             batch["attention_mask"], batch["token_type_ids"], deterministic=True)
        return loss_and_predictions(logits, batch["labels"], batch["weights"], regression)[1]

    return predict_step


# ----------------------------------------------------------------------------- evaluation


def evaluate(predict: Callable, trainable, frozen, enc: data_lib.Encoded, task: Task,
             setup: Setup, put: Callable, desc: str = "eval") -> dict[str, float]:
    """Metrics of `task` on one encoded split (predictions gathered back to example order)."""
    bs = setup.config.eval_batch_size
    preds = np.zeros(len(enc), np.float32 if task.is_regression else np.int32)
    batches = data_lib.eval_order(enc.lengths, bs)
    for idx in tqdm(batches, desc=desc, leave=False, disable=not setup.config.progress):
        batch = put(data_lib.make_batch(enc, idx, bs, setup.buckets, setup.pad_id))
        preds[idx] = np.asarray(predict(trainable, frozen, batch))[: len(idx)]
    return metrics_lib.compute(task.metrics, preds, enc.labels)


# ----------------------------------------------------------------------------- checkpoints


def checkpoint_manager(workdir: str, max_to_keep: int = 2) -> ocp.CheckpointManager:
    return ocp.CheckpointManager(
        os.path.join(os.path.abspath(workdir), "checkpoints"),
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True),
        item_names=("state", "meta"))


def _state_dict(trainable, opt_state, best_trainable, best_score, best_step) -> dict:
    return {"trainable": trainable, "opt_state": opt_state, "best_trainable": best_trainable,
            "best_score": jnp.asarray(best_score, jnp.float32),
            "best_step": jnp.asarray(best_step, jnp.int32)}


def restore_train_state(mngr: ocp.CheckpointManager, trainable, opt_state):
    """(step, trainable, opt_state, best) from the latest checkpoint, shaped like the inputs."""
    step = mngr.latest_step()
    abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, _state_dict(
        trainable, opt_state, trainable, 0.0, 0))
    restored = mngr.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract)))["state"]
    best = Best(float(restored["best_score"]), int(restored["best_step"]),
                restored["best_trainable"])
    return step, restored["trainable"], restored["opt_state"], best


def save_train_state(mngr: ocp.CheckpointManager, step: int, trainable, opt_state, best,
                     meta: dict) -> None:
    mngr.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(_state_dict(trainable, opt_state, best.trainable, best.score,
                                                best.step)),
        meta=ocp.args.JsonSave(meta)), force=True)


def restore_trainable(workdir: str, which: str = "best_trainable", step: int | None = None):
    """Trainable tree (`best_trainable` or `trainable`) and metadata from a run's checkpoints."""
    mngr = checkpoint_manager(workdir)
    step = mngr.latest_step() if step is None else step
    if step is None:
        raise UserError(f"no checkpoint under {workdir}/checkpoints; train first")
    restored = mngr.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(), meta=ocp.args.JsonRestore()))
    return restored["state"][which], restored["meta"]


# ----------------------------------------------------------------------------- the loop


def machine_description() -> str:
    dev = jax.devices()[0]
    return (f"{platform.machine()} {dev.platform.upper()} ({dev.device_kind}), "
            f"{jax.device_count()} device(s), {os.cpu_count()} CPU cores, jax {jax.__version__}")


@dataclasses.dataclass
class Best:
    """The best trainable tree so far by the selection split's main metric."""

    score: float
    step: int
    trainable: Any


@dataclasses.dataclass
class Placement:
    """Data-parallel placement: batches split over the mesh's ``data`` axis, params replicated."""

    mesh: Mesh

    @classmethod
    def all_devices(cls) -> Placement:
        return cls(Mesh(np.asarray(jax.devices()), ("data",)))

    @property
    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, P())

    @property
    def batch(self) -> NamedSharding:
        return NamedSharding(self.mesh, P("data"))

    def put_batch(self, batch: dict) -> dict:
        return jax.device_put(batch, self.batch)


class TrainProgress:
    """The tqdm bar, metric lines every `log_every` steps with examples/s, and the pure training
    time: evaluation and checkpoint writes are excluded (`pause`) from both."""

    def __init__(self, writer: MetricWriter, total_steps: int, start_step: int, desc: str,
                 log_every: int, steps_per_epoch: int, enabled: bool = True):
        self.writer, self.total_steps = writer, total_steps
        self.log_every, self.steps_per_epoch = log_every, steps_per_epoch
        self.bar = tqdm(total=total_steps, initial=start_step, desc=desc, disable=not enabled,
                        dynamic_ncols=True)
        self.start = self.window_start = time.perf_counter()
        self.window_examples, self.examples, self.paused = 0, 0, 0.0

    def step(self, step: int, examples: int, metrics: dict) -> None:
        """Count one finished step; on logging steps fetch `metrics` and write them."""
        self.window_examples += examples
        self.examples += examples
        self.bar.update(1)
        if step % self.log_every == 0 or step == self.total_steps:
            metrics = jax.device_get(metrics)
            now = time.perf_counter()
            rate = self.window_examples / max(now - self.window_start, 1e-9)
            self.window_examples, self.window_start = 0, now
            self.bar.set_postfix(loss=f"{metrics['train/loss']:.4f}", ex_s=f"{rate:.0f}")
            self.writer.write(step, {**metrics, "train/examples_per_s": rate,
                                     "train/epoch": step / self.steps_per_epoch})

    def pause(self, seconds: float) -> None:
        self.paused += seconds
        self.window_start += seconds

    def close(self) -> dict:
        """{"seconds", "examples"} of pure training."""
        self.bar.close()
        return {"seconds": time.perf_counter() - self.start - self.paused,
                "examples": self.examples}


def train_stream(enc: data_lib.Encoded, cfg, start_step: int, total_steps: int):
    """(step, index batch) pairs from start_step up to total_steps.

    The order of each epoch is a pure function of (seed, epoch), so starting at any step replays
    exactly the batches an uninterrupted run would see there.
    """
    steps_per_epoch = -(-len(enc) // cfg.batch_size)
    step = start_step
    while step < total_steps:
        epoch, offset = divmod(step, steps_per_epoch)
        order = data_lib.train_order(enc.lengths, cfg.batch_size, cfg.seed, epoch,
                                     cfg.length_grouping)
        for idx in order[offset:]:
            if step >= total_steps:
                return
            yield step, idx
            step += 1


def num_train_steps(num_examples: int, cfg) -> int:
    """Optimizer steps for `cfg.num_epochs` over `num_examples` rows, capped by `max_steps`."""
    total = cfg.num_epochs * -(-num_examples // cfg.batch_size)
    return min(total, cfg.max_steps) if cfg.max_steps else total


def total_train_steps(setup: Setup) -> int:
    train = setup.splits.get("train")
    return 0 if train is None else num_train_steps(len(train), setup.config)


def train_loop(cfg, train, workdir: str, place: Placement, trainable, frozen,
               writer: MetricWriter, *, make_step: Callable, batch_of: Callable,
               select: Callable, selection_name: str, main_metric: str, desc: str, meta: dict,
               patience: int = 0) -> tuple[Best, int, dict]:
    """The training loop every model here shares: optimizer, jit-compiled step over the mesh,
    selection every `cfg.eval_every_steps` (default: once per epoch), Orbax checkpoints, resume.

    Args:
      cfg: the run's config (optimizer, batch_size, num_epochs, max_steps, seed, resume, ...).
      train: the training split (`len` and `.lengths`, for the length-grouped batch order).
      make_step: tx -> pure train_step(trainable, opt_state, step, frozen, batch) ->
        (trainable, opt_state, metrics).
      batch_of: (B,) row indices of `train` -> host batch of numpy arrays.
      select: trainable -> {metric: score} on the selection split.
      patience: stop after this many evaluations without a new best; 0 never stops early.
    Returns:
      (best, last_step, stats) with stats = {"seconds", "examples"} of pure training time
      (evaluation and checkpoint writes excluded), "total_steps" and "stopped_early".
    """
    steps_per_epoch = -(-len(train) // cfg.batch_size)
    total_steps = num_train_steps(len(train), cfg)
    eval_every = cfg.eval_every_steps or steps_per_epoch
    tx = make_optimizer(cfg, total_steps)
    opt_state = jax.jit(tx.init, out_shardings=place.replicated)(trainable)
    train_step = jax.jit(
        make_step(tx),
        in_shardings=(place.replicated, place.replicated, None, place.replicated, place.batch),
        out_shardings=(place.replicated, place.replicated, place.replicated),
        donate_argnums=(0, 1))
    # A copy: the train step donates `trainable`'s buffers.
    best = Best(-np.inf, 0, jax.tree_util.tree_map(jnp.copy, trainable))
    mngr = checkpoint_manager(workdir)
    step = 0
    if cfg.resume and mngr.latest_step() is not None:
        step, trainable, opt_state, best = restore_train_state(mngr, trainable, opt_state)
        log.info("resumed from step %d (best %s %.4f at step %d)", step, main_metric,
                 best.score, best.step)

    progress = TrainProgress(writer, total_steps, step, desc, cfg.log_every_steps,
                             steps_per_epoch, cfg.progress)
    stopped_early = False
    for at, idx in train_stream(train, cfg, step, total_steps):
        batch = place.put_batch(batch_of(idx))
        trainable, opt_state, m = train_step(trainable, opt_state, at, frozen, batch)
        step = at + 1
        progress.step(step, len(idx), m)
        t0 = time.perf_counter()
        if step % eval_every == 0 or step == total_steps:
            scores = select(trainable)
            writer.write(step, {f"{selection_name}/{k}": v for k, v in scores.items()})
            if scores[main_metric] > best.score:
                best = Best(scores[main_metric], step,
                            jax.tree_util.tree_map(jnp.copy, trainable))
            log.info("step %d: %s %s %.4f (best %.4f at step %d)", step, selection_name,
                     main_metric, scores[main_metric], best.score, best.step)
            stopped_early = bool(patience) and step - best.step >= patience * eval_every
        stopping = stopped_early or step == cfg.stop_after_steps
        if step % cfg.checkpoint_every_steps == 0 or step == total_steps or stopping:
            save_train_state(mngr, step, trainable, opt_state, best, meta)
        progress.pause(time.perf_counter() - t0)
        if stopping:
            if stopped_early:
                log.info("early stop at step %d: no new best in %d evaluations", step, patience)
            break
    jax.block_until_ready(trainable)
    stats = progress.close()
    mngr.wait_until_finished()
    mngr.close()
    return best, step, {**stats, "total_steps": total_steps, "stopped_early": stopped_early}


def fit(setup: Setup, workdir: str, place: Placement, trainable, frozen, predict: Callable,
        writer: MetricWriter) -> tuple[Best, int, dict]:
    """`train_loop` for a sequence classifier: selection on the held-out slice (or the first
    eval split), no early stopping."""
    cfg, task = setup.config, setup.task
    train = setup.splits["train"]
    select_name = "selection" if "selection" in setup.splits else task.eval_splits[0]
    return train_loop(
        cfg, train, workdir, place, trainable, frozen, writer,
        make_step=lambda tx: make_train_step(setup.model, tx, task.is_regression,
                                             jax.random.PRNGKey(cfg.seed + 2)),
        batch_of=lambda idx: data_lib.make_batch(train, idx, cfg.batch_size, setup.buckets,
                                                 setup.pad_id),
        select=lambda params: evaluate(predict, params, frozen, setup.splits[select_name], task,
                                       setup, place.put_batch, desc=f"eval {select_name}"),
        selection_name=select_name, main_metric=task.main_metric,
        desc=f"{cfg.experiment} {task.name}",
        meta={"task": task.name, "experiment": cfg.experiment, "model": cfg.model,
              "config": cfg.to_dict()})


def prepare_workdir(workdir: str, resume: bool) -> None:
    """Create the workdir; refuse one that holds another run's checkpoints unless resuming."""
    ckpt_dir = os.path.join(workdir, "checkpoints")
    if os.path.isdir(ckpt_dir) and os.listdir(ckpt_dir) and not resume:
        raise UserError(f"{workdir} already holds checkpoints; pass --config.resume=True to "
                        "continue that run, or choose a new --workdir")
    os.makedirs(workdir, exist_ok=True)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Train per `config`, select on the held-out slice, report the eval splits.

    Returns the results dict (also written to <workdir>/results.json), or
    ``{"stopped_at_step", "total_steps"}`` when `stop_after_steps` ended the run early.
    """
    wall_start = time.perf_counter()
    setup = prepare(config)
    task, cfg = setup.task, setup.config
    prepare_workdir(workdir, cfg.resume)

    place = Placement.all_devices()
    frozen = jax.device_put(setup.frozen, place.replicated)
    trainable = jax.device_put(setup.trainable, place.replicated)
    n_trainable = lora_lib.count_params(setup.trainable)
    n_total = n_trainable + lora_lib.count_params(setup.frozen)
    log.info("task %s, experiment %s: %d trainable of %d parameters (%.3f%%)", task.name,
             cfg.experiment, n_trainable, n_total, 100 * n_trainable / n_total)
    predict = jax.jit(make_predict_step(setup.model, task.is_regression),
                      in_shardings=(place.replicated, place.replicated, place.batch))
    total_steps = total_train_steps(setup)
    resume_step = checkpoint_manager(workdir).latest_step() if cfg.resume else None
    writer = MetricWriter(workdir, resume_step=resume_step)
    best, step, stats = Best(-np.inf, 0, trainable), 0, {"seconds": 0.0, "examples": 0}
    if total_steps:
        best, step, stats = fit(setup, workdir, place, trainable, frozen, predict, writer)
        if step < total_steps:
            writer.close()
            log.info("stopped at step %d of %d as asked (stop_after_steps); continue with "
                     "--config.resume=True", step, total_steps)
            return {"stopped_at_step": step, "total_steps": total_steps}

    results = {"task": task.name, "experiment": cfg.experiment, "model": cfg.model,
               "main_metric": task.main_metric, "metrics": {}}
    for split in task.eval_splits:
        results["metrics"][split] = evaluate(predict, best.trainable, frozen,
                                             setup.splits[split], task, setup, place.put_batch,
                                             desc=f"eval {split}")
    if "selection" in setup.splits:
        results["selection_metrics"] = evaluate(predict, best.trainable, frozen,
                                                setup.splits["selection"], task, setup,
                                                place.put_batch, desc="eval selection")
    sizes = {k: len(v) for k, v in setup.splits.items()}
    results.update({
        "best_step": best.step, "total_steps": total_steps, "epochs": cfg.num_epochs,
        "trainable_params": n_trainable, "total_params": n_total, "sizes": sizes,
        "train_seconds": round(stats["seconds"], 2),
        "train_examples_per_s": round(stats["examples"] / stats["seconds"], 1)
        if stats["seconds"] else None,
        "protocol": PROTOCOL.format(n=sizes["selection"], splits=", ".join(task.eval_splits))
        if "selection" in sizes else
        f"no selection (last step); metrics reported on {', '.join(task.eval_splits)}",
        "data_sources": setup.sources, "seed": cfg.seed,
        "machine": machine_description(), "command": " ".join(sys.argv),
        "wall_seconds": round(time.perf_counter() - wall_start, 1),
        "config": cfg.to_dict(),
    })
    main_split = task.eval_splits[0]
    writer.write(step, {f"{main_split}/{task.main_metric}":
                        results["metrics"][main_split][task.main_metric]})
    writer.close()
    write_json_atomic(os.path.join(workdir, "results.json"), results)
    return results
