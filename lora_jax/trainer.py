"""The training machinery every experiment shares: one train-step factory, one loop, one way to
run an experiment.

An experiment (the sequence classifier, AttEns, T5) describes itself as an `Experiment`: its
trainable and frozen trees, a loss function, how to cut a training batch, how to score a split.
`run_experiment` then does the rest the same way for all of them: the workdir check, the
data-parallel placement, the jit-compiled pure `train_step` from `make_train_step`,
`train_loop` (selection, early stopping, exact resume from the Orbax checkpoints of
`lora_jax.checkpoint`), the evaluation of the best trainable tree on the reported splits and
`results.json` (`lora_jax.results.results_record`).

Nothing here knows a model or a task format; nothing that reads a finished run imports this.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from lora_jax import data as data_lib
from lora_jax import lora as lora_lib
from lora_jax.checkpoint import (
    Best,
    checkpoint_manager,
    prepare_workdir,
    restore_train_state,
    save_train_state,
)
from lora_jax.distributed import BatchShare, is_main_process
from lora_jax.errors import UserError
from lora_jax.results import results_record
from lora_jax.sharding import Placement, memory_report
from lora_jax.writers import MetricWriter, NullWriter, write_json_atomic

log = logging.getLogger(__name__)

LossFn = Callable[[Any, Any, dict, jax.Array], jax.Array]

# ----------------------------------------------------------------------------- optimizer, step


def make_optimizer(config, total_steps: int) -> optax.GradientTransformation:
    """AdamW with warmup + linear/cosine/constant schedule and global-norm clipping.

    Adapter ``alpha`` leaves (hyper-parameters stored with the adapter) get no update at all
    (`lora_jax.lora.optimizer_labels`).
    """
    opt = config.optimizer
    warmup = opt.get("warmup_steps", 0) or int(opt.warmup_ratio * total_steps)
    warmup_part = optax.linear_schedule(0.0, opt.learning_rate, max(warmup, 1))
    rest = max(total_steps - warmup, 1)
    after = {"linear": lambda: optax.linear_schedule(opt.learning_rate, 0.0, rest),
             "cosine": lambda: optax.cosine_decay_schedule(opt.learning_rate, rest),
             "constant": lambda: optax.constant_schedule(opt.learning_rate)}
    if opt.schedule not in after:
        raise UserError(f"optimizer.schedule {opt.schedule!r} is unknown; use "
                        f"{', '.join(after)}")
    lr = optax.join_schedules([warmup_part, after[opt.schedule]()], [warmup])
    adamw = optax.chain(
        optax.clip_by_global_norm(opt.grad_clip) if opt.grad_clip else optax.identity(),
        optax.adamw(lr, b1=opt.b1, b2=opt.b2, eps=opt.eps, weight_decay=opt.weight_decay,
                    mask=lora_lib.weight_decay_mask))
    return optax.multi_transform({"trainable": adamw, "frozen": optax.set_to_zero()},
                                 lora_lib.optimizer_labels)


def make_train_step(loss_fn: LossFn, tx: optax.GradientTransformation,
                    base_rng: jax.Array) -> Callable:
    """The one train step: `loss_fn(trainable, frozen, batch, rng) -> scalar` in, a pure

        train_step(trainable, opt_state, step, frozen, batch) -> (trainable, opt_state, metrics)

    out. The dropout key is `fold_in(base_rng, step)`, so a resumed run draws the same masks.
    Gradients are taken w.r.t. `trainable` only; `frozen` passes through untouched. Metrics:
    train/loss, and the l2 norms train/grad_norm and train/param_norm.
    """

    def train_step(trainable, opt_state, step, frozen, batch):
        rng = jax.random.fold_in(base_rng, step)
        loss, grads = jax.value_and_grad(loss_fn)(trainable, frozen, batch, rng)
        updates, opt_state = tx.update(grads, opt_state, trainable)
        trainable = optax.apply_updates(trainable, updates)
        return trainable, opt_state, {"train/loss": loss,
                                      "train/grad_norm": optax.global_norm(grads),
                                      "train/param_norm": optax.global_norm(trainable)}

    return train_step


def weighted_loss_and_predictions(logits: jax.Array, labels: jax.Array, weights: jax.Array,
                                  regression: bool) -> tuple[jax.Array, jax.Array]:
    """Weighted mean loss (cross-entropy, or MSE when regression) over (B,) examples, and the
    predictions (B,): class ids, or the regression value. Rows of weight 0 are padding."""
    if regression:
        pred = logits[:, 0]
        per_example = jnp.square(pred - labels.astype(jnp.float32))
    else:
        pred = jnp.argmax(logits, -1)
        per_example = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    return (per_example * weights).sum() / jnp.maximum(weights.sum(), 1.0), pred


# ----------------------------------------------------------------------------- the loop


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
        """{"seconds", "examples"} of pure training in this process (since a resume)."""
        self.bar.close()
        return {"seconds": time.perf_counter() - self.start - self.paused,
                "examples": self.examples}


def train_stream(lengths: np.ndarray, cfg, start_step: int, total_steps: int):
    """(step, step_rows) pairs from start_step up to total_steps; step_rows: the row indices of
    that global batch (`lora_jax.data.train_order`, whatever the number of processes).

    The order of each epoch is a pure function of (seed, epoch), so starting at any step replays
    exactly the batches an uninterrupted run would see there.
    """
    per_epoch = data_lib.steps_per_epoch(len(lengths), cfg.batch_size)
    step = start_step
    while step < total_steps:
        epoch, offset = divmod(step, per_epoch)
        order = data_lib.train_order(lengths, cfg.batch_size, cfg.seed, epoch,
                                     cfg.length_grouping)
        for step_rows in order[offset:]:
            if step >= total_steps:
                return
            yield step, step_rows
            step += 1


def num_train_steps(num_examples: int, cfg) -> int:
    """Optimizer steps for `cfg.num_epochs` over `num_examples` rows, capped by `max_steps`."""
    total = cfg.num_epochs * data_lib.steps_per_epoch(num_examples, cfg.batch_size)
    return min(total, cfg.max_steps) if cfg.max_steps else total


# A short training batch is shrunk only in epochs of at most this many batches (few-shot
# splits), where it is a large share of the steps; in a longer epoch its padding rows cost less
# than compiling the train step once more for its size.
SHRINK_MAX_STEPS_PER_EPOCH = 4


def train_batch_rows(rows: int, batch_size: int, steps_per_epoch: int,
                     shrink_short: bool) -> int:
    """Rows a training batch of `rows` real rows is padded to: `batch_size`, or, with
    `shrink_short` and an epoch of at most `SHRINK_MAX_STEPS_PER_EPOCH` batches, the fewest
    rows that hold them (`lora_jax.data.short_batch_rows`: batch_size / 2**j, at least 8, a
    multiple of the device count)."""
    if not shrink_short or steps_per_epoch > SHRINK_MAX_STEPS_PER_EPOCH:
        return batch_size
    return data_lib.short_batch_rows(rows, batch_size, jax.device_count())


def train_loop(cfg, lengths: np.ndarray, workdir: str, place: Placement, trainable, frozen,
               writer: MetricWriter, *, loss_fn: LossFn, batch_of: Callable,
               select: Callable, selection_name: str, main_metric: str, desc: str,
               meta: dict, share: BatchShare | None = None,
               shrink_short: bool = False) -> tuple[Best, dict]:
    """The training loop every experiment shares.

    Selection every `cfg.eval_every_steps` (0: once per epoch) and at the last step; early
    stopping after `cfg.early_stopping_patience` evaluations without a new best (0: never);
    Orbax checkpoints every `cfg.checkpoint_every_steps`, at the end and when stopping; exact
    resume with `cfg.resume`; `cfg.stop_after_steps` checkpoints and stops (to resume later).

    Args:
      lengths: (N,) token lengths of the training rows (the length-grouped batch order).
      loss_fn: (trainable, frozen, batch, rng) -> scalar; see `make_train_step`.
      batch_of: (idx, part_size, step_rows) -> host batch (a dict of numpy arrays, leading
        axis part_size) of the rows `idx`, padded for all of `step_rows` (the global batch).
      share: the rows of each global batch this process feeds (`lora_jax.distributed`);
        default all of them.
      shrink_short: short batches of a few-shot split are padded only to
        `lora_jax.data.short_batch_rows` of their rows (`train_batch_rows`), for a `loss_fn`
        whose real rows do not see the padding rows (`Experiment.rows_independent`).
      select: trainable -> {metric: score} on the selection split.
    Returns:
      (best, stats): stats has "seconds" and "examples" of pure training in this process,
      "last_step", "total_steps", "stopped_early" and "interrupted" (stopped by
      `stop_after_steps`: no results yet).
    """
    share = share or BatchShare()
    per_epoch = data_lib.steps_per_epoch(len(lengths), cfg.batch_size)
    total_steps = num_train_steps(len(lengths), cfg)
    eval_every = cfg.eval_every_steps or per_epoch
    patience = cfg.get("early_stopping_patience", 0)
    tx = make_optimizer(cfg, total_steps)
    # moments follow their parameters' shardings (`trainable` is placed); counts replicated
    opt_state = place.onto_mesh(jax.jit(tx.init)(trainable))
    state_shardings = jax.tree_util.tree_map(lambda x: x.sharding, (trainable, opt_state))
    train_step = jax.jit(
        make_train_step(loss_fn, tx, jax.random.PRNGKey(cfg.seed + 2)),
        in_shardings=(*state_shardings, None, place.shardings(frozen), place.batch),
        out_shardings=(*state_shardings, place.replicated),
        donate_argnums=(0, 1))
    # A copy: the train step donates `trainable`'s buffers.
    best = Best(-np.inf, 0, jax.tree_util.tree_map(jnp.copy, trainable))
    mngr = checkpoint_manager(workdir)
    step, stopped_early = 0, False
    if cfg.resume and mngr.latest_step() is not None:
        step, trainable, opt_state, best, stopped_early = restore_train_state(
            mngr, trainable, opt_state)
        log.info("resumed from step %d (best %s %.4f at step %d%s)", step, main_metric,
                 best.score, best.step, "; it had stopped early" if stopped_early else "")

    progress = TrainProgress(writer, total_steps, step, desc, cfg.log_every_steps,
                             per_epoch, cfg.progress and is_main_process())
    stream = () if stopped_early else train_stream(lengths, cfg, step, total_steps)
    share.part_size(cfg.batch_size)  # splits evenly, or one error line
    for at, step_rows in stream:
        size = train_batch_rows(len(step_rows), cfg.batch_size, per_epoch, shrink_short)
        batch = place.put_batch(batch_of(share.part(step_rows, size), share.part_size(size),
                                         step_rows))
        trainable, opt_state, m = train_step(trainable, opt_state, at, frozen, batch)
        step = at + 1
        progress.step(step, len(step_rows), m)
        selecting = step % eval_every == 0 or step == total_steps
        if selecting:  # the steps still queued are training time, not selection time
            jax.block_until_ready(trainable)
        t0 = time.perf_counter()
        if selecting:
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
            save_train_state(mngr, step, trainable, opt_state, best, stopped_early, meta)
        progress.pause(time.perf_counter() - t0)
        if stopping:
            if stopped_early:
                log.info("early stop at step %d: no new best in %d evaluations", step, patience)
            break
    jax.block_until_ready(trainable)
    stats = progress.close()
    mngr.wait_until_finished()
    mngr.close()
    return best, {**stats, "last_step": step, "total_steps": total_steps,
                  "stopped_early": stopped_early,
                  "interrupted": step < total_steps and not stopped_early}


# ----------------------------------------------------------------------------- one run


@dataclasses.dataclass
class Experiment:
    """What an experiment plugs into `run_experiment`.

    evaluate(trainable, frozen, split, workdir) -> ({metric: value}, (predictions (N,),
    labels (N,)) or None) scores one split; `workdir` is set for the final report (an
    experiment may write per-split files there, e.g. samples) and None during selection. The
    reported splits' per-row predictions and labels go into results.json (for paired tests
    between runs on the same rows).
    extra(best_trainable) -> more results fields.
    """

    name: str  # results["experiment"]
    config: Any
    task: Any  # lora_jax.tasks.Task
    model: str
    trainable: Any
    frozen: Any
    train_lengths: np.ndarray | None  # None or empty: evaluation only
    loss_fn: LossFn
    batch_of: Callable
    evaluate: Callable
    selection_split: str
    sizes: dict[str, int]
    sources: dict[str, str]
    protocol: str
    meta: dict = dataclasses.field(default_factory=dict)
    desc: str = ""
    extra: Callable | None = None
    share: BatchShare = dataclasses.field(default_factory=BatchShare)  # rows per process
    # True when a batch's real rows do not see its padding rows (their loss and gradients are
    # the same however many padding rows follow): short training batches are then shrunk
    # (`train_loop`'s shrink_short). Not the AttEns combiner, whose batch-axis quirk mixes rows.
    rows_independent: bool = False


def run_experiment(exp: Experiment, workdir: str, wall_start: float) -> dict[str, Any]:
    """Train (if the experiment has a training split), select, report, write results.json.

    Returns the results record, or ``{"stopped_at_step", "total_steps"}`` when
    `stop_after_steps` ended the run before its last step.
    """
    cfg, task = exp.config, exp.task
    prepare_workdir(workdir, cfg.resume)
    place = Placement.from_config(cfg)
    frozen = place.put(lora_lib.frozen_in_dtype(exp.frozen, lora_lib.DTYPES[cfg.get("param_dtype",
                                                                            "float32")]))
    trainable = place.put(exp.trainable)
    placement = {"mesh": dict(place.mesh.shape), "processes": jax.process_count(),
                 "memory_per_device": memory_report(trainable, frozen)}
    n_trainable = lora_lib.count_params(exp.trainable)
    n_total = n_trainable + lora_lib.count_params(exp.frozen)
    log.info("%s on %s: %d trainable of %d parameters (%.4f%%)", exp.name, task.name,
             n_trainable, n_total, 100 * n_trainable / max(n_total, 1))
    resume_step = checkpoint_manager(workdir).latest_step() if cfg.resume else None
    writer = MetricWriter(workdir, resume_step=resume_step) if is_main_process() else NullWriter()
    best = Best(-np.inf, 0, trainable)
    stats = {"seconds": 0.0, "examples": 0, "last_step": 0, "total_steps": 0,
             "stopped_early": False, "interrupted": False}
    if exp.train_lengths is not None and len(exp.train_lengths):
        best, stats = train_loop(
            cfg, exp.train_lengths, workdir, place, trainable, frozen, writer,
            loss_fn=exp.loss_fn, batch_of=exp.batch_of,
            select=lambda params: exp.evaluate(params, frozen, exp.selection_split, None)[0],
            selection_name=exp.selection_split, main_metric=task.main_metric,
            desc=exp.desc or f"{exp.name} {task.name}", meta=exp.meta, share=exp.share,
            shrink_short=exp.rows_independent)
        if stats["interrupted"]:
            writer.close()
            log.info("stopped at step %d of %d as asked (stop_after_steps); continue with "
                     "--config.resume=True", stats["last_step"], stats["total_steps"])
            return {"stopped_at_step": stats["last_step"], "total_steps": stats["total_steps"]}
    reported = {split: exp.evaluate(best.trainable, frozen, split, workdir)
                for split in task.eval_splits}
    metrics = {split: scores for split, (scores, _) in reported.items()}
    selection_metrics = None
    if exp.selection_split in exp.sizes and exp.selection_split not in task.eval_splits:
        selection_metrics = exp.evaluate(best.trainable, frozen, exp.selection_split, None)[0]
    results = results_record(exp, metrics, selection_metrics, best, stats, n_trainable, n_total,
                             time.perf_counter() - wall_start, placement,
                             {split: rows for split, (_, rows) in reported.items()
                              if rows is not None})
    main_split = task.eval_splits[0]
    writer.write(stats["last_step"], {f"{main_split}/{task.main_metric}":
                                      metrics[main_split][task.main_metric]})
    writer.close()
    if is_main_process():
        write_json_atomic(os.path.join(workdir, "results.json"), results)
    return results
