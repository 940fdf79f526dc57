"""Prompt tuning + LoRA (and the ablation rows) for FLAN-T5 on text-to-text tasks.

`train_t5(config, workdir)` is what ``python train.py --config configs/t5_hybrid.py:<variant>``
runs. As in `lora_jax.trainer`, everything that can fail on bad input (task, model, data rows,
variant) is checked before the workdir is touched; the train step is pure and jit-compiled over a
data-parallel mesh; Orbax checkpoints hold the trainable tree, optimizer state, step and the
best-so-far, and the step fixes the data position, so a resumed run replays the same batches.

Model selection runs greedy generation on the selection split once per epoch (the task's
validation split, or a held-out slice of train for SST-2 whose test labels are hidden) and stops
early after `early_stopping_patience` evaluations without improvement. The best trainable tree
is then scored on the task's reported splits; every prediction is written to
``samples_<split>.jsonl`` next to ``results.json``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from lora_jax import data as data_lib
from lora_jax import lora as lora_lib
from lora_jax import trainer as core
from lora_jax.errors import UserError
from lora_jax.writers import MetricWriter, write_json_atomic
from t5_hybrid import adapters
from t5_hybrid import metrics as metrics_lib
from t5_hybrid.config import T5Config
from t5_hybrid.generate import make_generate, strip_after_eos
from t5_hybrid.hf_import import load_pretrained
from t5_hybrid.model import T5ForConditionalGeneration, shift_right
from t5_hybrid.tasks import Seq2SeqTask, get_task, pairs_from_rows

log = logging.getLogger(__name__)

# `config.model = "random:<name>"`: a randomly initialised T5 with the byte-level ByT5 tokenizer
# (no files, no download) for smoke runs and tests. 384 = ByT5's vocabulary.
RANDOM_MODELS = {
    "tiny": T5Config(vocab_size=384, d_model=64, d_kv=16, d_ff=128, num_layers=2,
                     num_decoder_layers=2, num_heads=4, dropout_rate=0.0),
    "small": T5Config(vocab_size=384, d_model=256, d_kv=32, d_ff=512, num_layers=4,
                      num_decoder_layers=4, num_heads=8),
}


# ----------------------------------------------------------------------------- data


@dataclasses.dataclass
class Pairs:
    """A tokenized split: texts and their ids (ragged int32, EOS-terminated)."""

    sources: list[str]
    targets: list[str]
    source_ids: list[np.ndarray]
    target_ids: list[np.ndarray]

    def __len__(self) -> int:
        return len(self.sources)

    @property
    def lengths(self) -> np.ndarray:
        return np.fromiter((len(x) for x in self.source_ids), np.int64, len(self))

    def subset(self, idx: Sequence[int]) -> Pairs:
        return Pairs(*([field[i] for i in idx] for field in (
            self.sources, self.targets, self.source_ids, self.target_ids)))


def _truncate(ids: list[int], max_length: int) -> np.ndarray:
    """At most max_length ids, keeping the final EOS."""
    if len(ids) > max_length:
        ids = ids[: max_length - 1] + ids[-1:]
    return np.asarray(ids, np.int32)


def encode_pairs(sources: list[str], targets: list[str], tokenizer, max_source: int,
                 max_target: int, where: str = "") -> Pairs:
    """Tokenize (T5 tokenizers end every sequence with EOS) and truncate; a warning counts the
    targets that did not fit, since a truncated target can never be generated exactly."""
    src = tokenizer(sources)["input_ids"]
    tgt = tokenizer(targets)["input_ids"]
    cut = sum(len(x) > max_target for x in tgt)
    if cut:
        log.warning("%s: %d of %d targets are longer than max_target_length=%d tokens (longest "
                    "%d) and are truncated; raise --config.max_target_length", where or "data",
                    cut, len(tgt), max_target, max(len(x) for x in tgt))
    return Pairs(sources, targets, [_truncate(x, max_source) for x in src],
                 [_truncate(x, max_target) for x in tgt])


def make_batch(pairs: Pairs, idx: np.ndarray, batch_size: int, source_buckets: Sequence[int],
               target_buckets: Sequence[int], pad_id: int) -> dict[str, np.ndarray]:
    """input_ids/attention_mask (B, S) and labels/label_mask (B, T) padded to bucket lengths;
    rows past len(idx) are padding (all-zero masks)."""
    input_ids, attention_mask = data_lib.pad_to_bucket([pairs.source_ids[i] for i in idx],
                                                       batch_size, source_buckets, pad_id)
    labels, label_mask = data_lib.pad_to_bucket([pairs.target_ids[i] for i in idx], batch_size,
                                                target_buckets, pad_id)
    return dict(input_ids=input_ids, attention_mask=attention_mask, labels=labels,
                label_mask=label_mask)


# ----------------------------------------------------------------------------- setup


@dataclasses.dataclass
class Setup:
    config: object
    task: Seq2SeqTask
    model: T5ForConditionalGeneration
    tokenizer: object
    frozen: dict
    trainable: dict
    splits: dict[str, Pairs]  # "train", "selection", and the reported splits
    selection_name: str
    source_buckets: tuple[int, ...]
    target_buckets: tuple[int, ...]
    sources: dict[str, str]


def load_model(config) -> tuple[T5Config, dict, object]:
    """(architecture, params, tokenizer) from a HF folder / hub id, or ``random:<name>``."""
    from transformers import AutoTokenizer, ByT5Tokenizer

    if config.model.startswith("random:"):
        name = config.model.removeprefix("random:")
        if name not in RANDOM_MODELS:
            raise UserError(f"unknown random model {name!r}; use one of "
                            f"{', '.join('random:' + n for n in RANDOM_MODELS)}")
        t5_config = RANDOM_MODELS[name]
        model = T5ForConditionalGeneration(t5_config)
        ids = jnp.zeros((1, 4), jnp.int32)
        init = lambda rng: model.init(rng, ids, ids, ids)["params"]
        params = jax.jit(init)(jax.random.PRNGKey(config.model_seed))
        return t5_config, params, ByT5Tokenizer()
    model_dir, t5_config, params = load_pretrained(config.model)
    try:
        tokenizer = AutoTokenizer.from_pretrained(config.tokenizer or model_dir)
    except Exception as e:
        raise UserError(f"could not load a tokenizer from {config.tokenizer or model_dir!r} "
                        f"({type(e).__name__}); the folder needs tokenizer.json or spiece.model, "
                        "or set --config.tokenizer=PATH") from None
    return t5_config, jax.tree_util.tree_map(jnp.asarray, params), tokenizer


def load_pairs(config, task: Seq2SeqTask, prefix: str) -> tuple[dict[str, tuple], dict, str]:
    """{split: (sources, targets)} for train, selection and reported splits, and the sources."""
    source = core.data_source_of(config)
    files = {k: v for k, v in config.data_files.items() if v}
    selection = config.selection_split or task.selection_split
    selection = "" if selection == "heldout" else selection  # a held-out slice of train
    if config.num_epochs and config.train_split in (selection, *task.eval_splits):
        raise UserError(f"train_split {config.train_split!r} is also the selection or a reported "
                        f"split of {task.name!r} (selection {selection or 'heldout'!r}, reported "
                        f"{', '.join(task.eval_splits)}); pass --config.selection_split=heldout "
                        "or another train_split")
    wanted = list(dict.fromkeys([*(["train"] if config.num_epochs else []),
                                 *([selection] if selection else []), *task.eval_splits]))
    if config.train_split != "train" and config.num_epochs:
        wanted[0] = config.train_split
    out, where_from = {}, {}
    for split in wanted:
        rows, where = data_lib.load_split(task, split, source, config.data_dir, files)
        where_from[split] = where
        out[split] = pairs_from_rows(rows, task, where, prefix, config.skip_empty_rows)
    if config.num_epochs and config.train_split != "train":
        out["train"] = out.pop(config.train_split)
        where_from["train"] = where_from.pop(config.train_split)
    name = selection or "selection"
    return out, where_from, name


def _cap(pairs: Pairs, n: int, seed: int) -> Pairs:
    if not n or len(pairs) <= n:
        return pairs
    return pairs.subset(np.sort(np.random.default_rng(seed).permutation(len(pairs))[:n]))


def prepare(config) -> Setup:
    """Validate the config and inputs, load model and data. Writes nothing."""
    task = get_task(config.task)
    adapters.check_variant(config.variant)
    if config.variant == "base":
        config.num_epochs = 0
    if config.dtype not in core.DTYPES:
        raise UserError(f"dtype {config.dtype!r} is unknown; use float32 or bfloat16")
    if config.batch_size % jax.device_count():
        raise UserError(f"batch_size {config.batch_size} is not divisible by the "
                        f"{jax.device_count()} devices")
    t5_config, params, tokenizer = load_model(config)
    prefix = task.prefix if adapters.uses_prefix(config.variant) else ""
    raw, sources, selection_name = load_pairs(config, task, prefix)
    max_src = config.max_source_length or task.max_source_length
    max_tgt = config.max_target_length or task.max_target_length
    splits = {k: encode_pairs(*v, tokenizer, max_src, max_tgt, sources.get(k, k))
              for k, v in raw.items()}
    if "train" in splits:
        if selection_name == "selection":
            splits["train"], splits["selection"] = data_lib.hold_out(
                splits["train"], config.selection_size, config.seed)
        splits["train"] = _cap(splits["train"], config.max_train_examples, config.seed + 1)
    for name in list(splits):
        if name != "train":
            splits[name] = _cap(splits[name], config.max_eval_examples, core.EVAL_SUBSET_SEED)
    model = T5ForConditionalGeneration(t5_config, lora_alpha=config.lora.alpha,
                                       lora_dropout=config.lora.dropout,
                                       dtype=core.DTYPES[config.dtype])
    spec = lora_lib.LoRASpec(r=config.lora.r, alpha=config.lora.alpha,
                             dropout=config.lora.dropout, targets=tuple(config.lora.targets))
    variables = adapters.init_variables(jax.random.PRNGKey(config.seed), params, config.variant,
                                        spec, config.prompt.num_tokens)
    mask = lora_lib.trainable_mask(variables, adapters.trainable_patterns(config.variant))
    trainable, frozen = lora_lib.split(variables, mask)
    return Setup(config, task, model, tokenizer, frozen, trainable, splits,
                 selection_name if selection_name in splits else task.eval_splits[0],
                 data_lib.bucket_lengths(max_src, config.buckets),
                 data_lib.bucket_lengths(max_tgt, config.buckets), sources)


# ----------------------------------------------------------------------------- steps


def token_loss(logits: jax.Array, labels: jax.Array, label_mask: jax.Array) -> jax.Array:
    """Mean cross-entropy (nats) over the target tokens where label_mask is 1."""
    per_token = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    return (per_token * label_mask).sum() / jnp.maximum(label_mask.sum(), 1)


def make_train_step(model: T5ForConditionalGeneration, tx: optax.GradientTransformation,
                    base_rng: jax.Array):
    """train_step(trainable, opt_state, step, frozen, batch) -> (trainable, opt_state, metrics);
    gradients w.r.t. `trainable` only."""
    cfg = model.config

    def train_step(trainable, opt_state, step, frozen, batch):
        rng = jax.random.fold_in(base_rng, step)
        decoder_inputs = shift_right(batch["labels"], cfg.decoder_start_token_id,
                                     cfg.pad_token_id)

        def loss_fn(params):
            logits = model.apply(lora_lib.combine(params, frozen), batch["input_ids"],
                                 batch["attention_mask"], decoder_inputs, deterministic=False,
                                 rngs={"dropout": rng})
            return token_loss(logits, batch["labels"], batch["label_mask"])

        loss, grads = jax.value_and_grad(loss_fn)(trainable)
        updates, opt_state = tx.update(grads, opt_state, trainable)
        trainable = optax.apply_updates(trainable, updates)
        return trainable, opt_state, {"train/loss": loss,
                                      "train/grad_norm": optax.global_norm(grads),
                                      "train/param_norm": optax.global_norm(trainable)}

    return train_step


def evaluate(setup: Setup, generate, trainable, frozen, pairs: Pairs, place: core.Placement,
             desc: str) -> tuple[dict[str, float], list[str]]:
    """(metrics, predictions in example order) of greedy/beam generation on one split."""
    cfg, mcfg = setup.config, setup.model.config
    variables = lora_lib.combine(trainable, frozen)
    predictions = [""] * len(pairs)
    for idx in tqdm(data_lib.eval_order(pairs.lengths, cfg.eval_batch_size), desc=desc,
                    leave=False, disable=not cfg.progress):
        batch = make_batch(pairs, idx, cfg.eval_batch_size, setup.source_buckets,
                           setup.target_buckets, mcfg.pad_token_id)
        tokens = generate(variables, *place.put_batch(
            (batch["input_ids"], batch["attention_mask"])))
        texts = setup.tokenizer.batch_decode(
            strip_after_eos(np.asarray(tokens)[: len(idx)], mcfg.eos_token_id,
                            mcfg.pad_token_id), skip_special_tokens=True)
        for i, text in zip(idx, texts, strict=True):
            predictions[i] = text
    return metrics_lib.compute(setup.task.metrics, predictions, pairs.targets), predictions


# ----------------------------------------------------------------------------- the loop


def fit(setup: Setup, workdir: str, place: core.Placement, trainable, frozen, generate,
        writer: MetricWriter) -> tuple[core.Best, int, dict]:
    """`core.train_loop` for T5: selection by generation on the selection split, early
    stopping after `early_stopping_patience` evaluations without a new best."""
    cfg, task = setup.config, setup.task
    train, pad_id = setup.splits["train"], setup.model.config.pad_token_id
    return core.train_loop(
        cfg, train, workdir, place, trainable, frozen, writer,
        make_step=lambda tx: make_train_step(setup.model, tx, jax.random.PRNGKey(cfg.seed + 2)),
        batch_of=lambda idx: make_batch(train, idx, cfg.batch_size, setup.source_buckets,
                                        setup.target_buckets, pad_id),
        select=lambda params: evaluate(setup, generate, params, frozen,
                                       setup.splits[setup.selection_name], place,
                                       f"eval {setup.selection_name}")[0],
        selection_name=setup.selection_name, main_metric=task.main_metric,
        desc=f"{cfg.variant} {task.name}",
        meta={"task": task.name, "variant": cfg.variant, "model": cfg.model,
              "config": cfg.to_dict()},
        patience=cfg.early_stopping_patience)


def write_samples(path: str, pairs: Pairs, predictions: list[str]) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for s, t, p in zip(pairs.sources, pairs.targets, predictions, strict=True):
            f.write(json.dumps({"source": s, "target": t, "prediction": p}) + "\n")
    os.replace(tmp, path)


def train_t5(config, workdir: str) -> dict:
    """Train/evaluate one variant of the FLAN-T5 hybrid; returns (and writes) results.json."""
    wall_start = time.perf_counter()
    setup = prepare(config)
    cfg, task = setup.config, setup.task
    core.prepare_workdir(workdir, cfg.resume)
    place = core.Placement.all_devices()
    frozen = jax.device_put(setup.frozen, place.replicated)
    trainable = jax.device_put(setup.trainable, place.replicated)
    n_trainable = lora_lib.count_params(setup.trainable)
    n_total = n_trainable + lora_lib.count_params(setup.frozen)
    log.info("t5 %s on %s: %d trainable of %d parameters (%.4f%%)", cfg.variant, task.name,
             n_trainable, n_total, 100 * n_trainable / n_total)
    generate = make_generate(setup.model, cfg.max_target_length or task.max_target_length,
                             num_beams=cfg.num_beams)
    resume_step = core.checkpoint_manager(workdir).latest_step() if cfg.resume else None
    writer = MetricWriter(workdir, resume_step=resume_step)
    best, step = core.Best(-np.inf, 0, trainable), 0
    stats = {"seconds": 0.0, "examples": 0, "total_steps": 0, "stopped_early": False}
    if "train" in setup.splits:
        best, step, stats = fit(setup, workdir, place, trainable, frozen, generate, writer)
        if step < stats["total_steps"] and not stats["stopped_early"]:
            writer.close()
            return {"stopped_at_step": step, "total_steps": stats["total_steps"]}
    results = {"task": task.name, "experiment": "t5_hybrid", "variant": cfg.variant,
               "model": cfg.model, "main_metric": task.main_metric, "metrics": {}}
    for split in dict.fromkeys([*task.eval_splits, setup.selection_name]):
        scores, predictions = evaluate(setup, generate, best.trainable, frozen,
                                       setup.splits[split], place, f"eval {split}")
        key = "selection_metrics" if split == setup.selection_name and split not in \
            task.eval_splits else None
        if key:
            results[key] = scores
        else:
            results["metrics"][split] = scores
            write_samples(os.path.join(workdir, f"samples_{split}.jsonl"), setup.splits[split],
                          predictions)
    sizes = {k: len(v) for k, v in setup.splits.items()}
    results.update({
        "best_step": best.step, "last_step": step, "total_steps": stats["total_steps"],
        "stopped_early": stats["stopped_early"], "epochs": cfg.num_epochs,
        "trainable_params": n_trainable, "total_params": n_total, "sizes": sizes,
        "train_seconds": round(stats["seconds"], 2),
        "train_examples_per_s": round(stats["examples"] / stats["seconds"], 1)
        if stats["seconds"] else None,
        "protocol": f"model selection by {task.main_metric} on {setup.selection_name} "
                    f"({sizes[setup.selection_name]} rows) each epoch, early stopping patience "
                    f"{cfg.early_stopping_patience}; metrics reported on "
                    f"{', '.join(task.eval_splits)}; decoding "
                    f"{'greedy' if cfg.num_beams == 1 else f'beam {cfg.num_beams}'}",
        "data_sources": setup.sources, "seed": cfg.seed, "machine": core.machine_description(),
        "command": " ".join(sys.argv),
        "wall_seconds": round(time.perf_counter() - wall_start, 1), "config": cfg.to_dict(),
    })
    main = task.eval_splits[0]
    writer.write(step, {f"{main}/{task.main_metric}": results["metrics"][main][task.main_metric]})
    writer.close()
    write_json_atomic(os.path.join(workdir, "results.json"), results)
    return results
