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
import time

import jax
import jax.numpy as jnp
import optax

from lora_jax import data as data_lib
from lora_jax import lora as lora_lib
from lora_jax import trainer
from lora_jax.config_check import NON_NEGATIVE, POSITIVE, boolean, register_rules, validate_config
from lora_jax.distributed import BatchShare, is_main_process
from lora_jax.errors import UserError
from lora_jax.sharding import Placement, mesh_of
from lora_jax.tasks import Task
from t5_hybrid import adapters
from t5_hybrid import metrics as metrics_lib
from t5_hybrid.config import T5Config
from t5_hybrid.data import Pairs, encode_pairs, load_pairs, make_batch, text_pairs
from t5_hybrid.generate import generate_texts, make_generate
from t5_hybrid.hf_import import load_pretrained
from t5_hybrid.model import T5ForConditionalGeneration, shift_right
from t5_hybrid.tasks import get_seq2seq_task

log = logging.getLogger(__name__)

register_rules({"model_seed": NON_NEGATIVE, "max_source_length": NON_NEGATIVE,
                "max_target_length": NON_NEGATIVE, "skip_empty_rows": boolean,
                "prompt.num_tokens": POSITIVE, "num_beams": POSITIVE})

# `config.model = "random:<name>"`: a randomly initialised T5 with the byte-level ByT5 tokenizer
# (no files, no download) for smoke runs and tests. 384 = ByT5's vocabulary.
RANDOM_MODELS = {
    "tiny": T5Config(vocab_size=384, d_model=64, d_kv=16, d_ff=128, num_layers=2,
                     num_decoder_layers=2, num_heads=4, dropout_rate=0.0),
    "small": T5Config(vocab_size=384, d_model=256, d_kv=32, d_ff=512, num_layers=4,
                      num_decoder_layers=4, num_heads=8),
}


# ----------------------------------------------------------------------------- setup


@dataclasses.dataclass
class Setup:
    config: object
    task: Task
    model: T5ForConditionalGeneration
    tokenizer: object
    frozen: dict
    trainable: dict
    splits: dict[str, Pairs]  # "train", "selection", and the reported splits
    selection_name: str
    source_buckets: tuple[int, ...]
    target_buckets: tuple[int, ...]
    sources: dict[str, str]
    share: BatchShare  # the rows of every global batch this process feeds


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


def prepare(config, with_data: bool = True) -> Setup:
    """Validate the config and inputs, load model and (unless `with_data` is False, as for
    prediction) data. Writes nothing."""
    validate_config(config)
    task = get_seq2seq_task(config.task)
    adapters.check_variant(config.variant)
    if config.variant == "base":
        config.num_epochs = 0
    share = BatchShare.of_this_process(mesh_of(config), batch_size=config.batch_size,
                                       eval_batch_size=config.eval_batch_size)
    prefix = task.prefix if adapters.uses_prefix(config.variant) else ""
    # the data before the model: a bad row is reported before seconds of model loading
    raw, sources, selection_name = (
        load_pairs(data_lib.DataSource.of(config), task, prefix, train=config.num_epochs > 0,
                   train_split=config.train_split, selection_split=config.selection_split,
                   skip_empty_rows=config.skip_empty_rows)
        if with_data else ({}, {}, "selection"))
    t5_config, params, tokenizer = load_model(config)
    max_src = config.max_source_length or task.max_source_length
    max_tgt = config.max_target_length or task.max_target_length
    # held-out slice and caps first (seeded over whole splits), then tokenize
    splits = data_lib.SplitSizes.of(config).cut(
        {k: text_pairs(*v) for k, v in raw.items()}, config.seed,
        selection_from_train=selection_name == "selection")
    splits = {k: encode_pairs(v, tokenizer, max_src, max_tgt, sources.get(k, k))
              for k, v in splits.items()}
    model = T5ForConditionalGeneration(t5_config, lora_dropout=config.lora.dropout,
                                       dtype=lora_lib.DTYPES[config.dtype])
    spec = lora_lib.LoRASpec(r=config.lora.r, alpha=config.lora.alpha,
                             dropout=config.lora.dropout, targets=tuple(config.lora.targets))
    variables = adapters.init_variables(jax.random.PRNGKey(config.seed), params, config.variant,
                                        spec, config.prompt.num_tokens)
    mask = lora_lib.trainable_mask(variables, adapters.trainable_patterns(config.variant))
    trainable, frozen = lora_lib.split(variables, mask)
    return Setup(config, task, model, tokenizer, frozen, trainable, splits,
                 selection_name if selection_name in splits else task.eval_splits[0],
                 data_lib.bucket_lengths(max_src, config.buckets),
                 data_lib.bucket_lengths(max_tgt, config.buckets), sources, share)


# ----------------------------------------------------------------------------- steps


def token_loss(logits: jax.Array, labels: jax.Array, label_mask: jax.Array) -> jax.Array:
    """Mean cross-entropy (nats) over the target tokens where label_mask is 1."""
    per_token = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    return (per_token * label_mask).sum() / jnp.maximum(label_mask.sum(), 1)


def make_loss_fn(model: T5ForConditionalGeneration) -> trainer.LossFn:
    """Teacher-forced token cross-entropy of the targets (decoder inputs = labels shifted)."""
    cfg = model.config

    def loss_fn(trainable, frozen, batch, rng):
        decoder_inputs = shift_right(batch["labels"], cfg.decoder_start_token_id,
                                     cfg.pad_token_id)
        logits = model.apply(lora_lib.combine(trainable, frozen), batch["input_ids"],
                             batch["attention_mask"], decoder_inputs, deterministic=False,
                             rngs={"dropout": rng})
        return token_loss(logits, batch["labels"], batch["label_mask"])

    return loss_fn


def evaluate(setup: Setup, generate, trainable, frozen, pairs: Pairs,
             place: Placement, desc: str) -> tuple[dict[str, float], list[str]]:
    """(metrics, predictions in example order) of greedy/beam generation on one split (each
    process generates for its rows; every process gets all predictions)."""
    cfg = setup.config
    variables = lora_lib.combine(trainable, frozen)
    predictions = generate_texts(
        lambda ids, mask: generate(variables, ids, mask), pairs, cfg.eval_batch_size,
        setup.source_buckets, setup.target_buckets, setup.model.config, setup.tokenizer,
        put=place.put_batch, share=setup.share, desc=desc, progress=cfg.progress)
    return metrics_lib.compute(setup.task.metrics, predictions, pairs.targets), predictions


def write_samples(path: str, pairs: Pairs, predictions: list[str]) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for s, t, p in zip(pairs.sources, pairs.targets, predictions, strict=True):
            f.write(json.dumps({"source": s, "target": t, "prediction": p}) + "\n")
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- the run


def experiment(setup: Setup) -> trainer.Experiment:
    """The T5 hybrid as an `Experiment` of the shared pipeline: selection by generation on the
    selection split; the reported splits' predictions go to samples_<split>.jsonl."""
    cfg, task = setup.config, setup.task
    place = Placement.from_config(cfg)
    generate = make_generate(setup.model, cfg.max_target_length or task.max_target_length,
                             num_beams=cfg.num_beams)
    train, pad_id = setup.splits.get("train"), setup.model.config.pad_token_id

    def score(params, frozen, split, workdir):
        scores, predictions = evaluate(setup, generate, params, frozen, setup.splits[split],
                                       place, f"eval {split}")
        if workdir is not None and is_main_process():
            write_samples(os.path.join(workdir, f"samples_{split}.jsonl"), setup.splits[split],
                          predictions)
        return scores, None  # generated texts: in the samples files

    sizes = {k: len(v) for k, v in setup.splits.items()}
    decoding = "greedy" if cfg.num_beams == 1 else f"beam {cfg.num_beams}"
    return trainer.Experiment(
        name="t5_hybrid", config=cfg, task=task, model=cfg.model,
        trainable=setup.trainable, frozen=setup.frozen,
        train_lengths=None if train is None else train.lengths,
        loss_fn=make_loss_fn(setup.model),
        batch_of=lambda idx, size, step_rows: make_batch(
            train, idx, size, setup.source_buckets, setup.target_buckets, pad_id, step_rows),
        evaluate=score, selection_split=setup.selection_name, sizes=sizes,
        sources=setup.sources,
        protocol=f"model selection by {task.main_metric} on {setup.selection_name} "
                 f"({sizes[setup.selection_name]} rows) every evaluation, early stopping "
                 f"patience {cfg.early_stopping_patience}; metrics reported on "
                 f"{', '.join(task.eval_splits)}; decoding {decoding}",
        meta={"task": task.name, "variant": cfg.variant, "model": cfg.model,
              "config": cfg.to_dict()},
        desc=f"{cfg.variant} {task.name}", extra=lambda _best: {"variant": cfg.variant},
        share=setup.share, rows_independent=True)


def train_t5(config, workdir: str) -> dict:
    """Train/evaluate one variant of the FLAN-T5 hybrid; returns (and writes) results.json."""
    wall_start = time.perf_counter()
    return trainer.run_experiment(experiment(prepare(config)), os.fspath(workdir), wall_start)
