"""The single-task sequence classifier: FT_LoRA, FFN (trained head), zero-shot (untrained head)
and full fine-tuning, on the shared pipeline of `lora_jax.trainer`.

`train_and_evaluate(config, workdir)` is what ``train.py`` runs for these experiments. Every
input is validated and loaded in `prepare` before the workdir is touched.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from lora_jax import data as data_lib
from lora_jax import lora as lora_lib
from lora_jax import metrics as metrics_lib
from lora_jax import trainer
from lora_jax.config_check import validate_config
from lora_jax.distributed import BatchShare, map_encoded
from lora_jax.errors import UserError
from lora_jax.models import EncoderConfig, SequenceClassifier
from lora_jax.models.encoder import POOLINGS
from lora_jax.models.hf_import import Pretrained, init_around, load_pretrained, place_pretrained
from lora_jax.results import selection_protocol
from lora_jax.sharding import Placement, mesh_of
from lora_jax.tasks import Task, resolve_task

log = logging.getLogger(__name__)

EXPERIMENTS = ("ft_lora", "ffn", "zero_shot", "full")
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
    tokenizer: Any
    max_length: int  # tokens, after the model's position limit
    share: BatchShare  # the rows of every global batch this process feeds


def pooling_of(config) -> str:
    """The pooling a run uses: the configured one, masked mean by default for the linear head,
    "head" for the transformers head (which pools as transformers does)."""
    if config.get("head", "linear") == "hf":
        return "head"
    return config.get("pooling") or "mean"


def build_model(config, encoder_config: EncoderConfig, task: Task) -> SequenceClassifier:
    head = config.get("head", "linear")
    if head == "hf" and config.pooling:
        raise UserError(f"pooling={config.pooling!r} applies to the linear head only; head='hf' "
                        "pools as transformers does ([CLS] or the BERT pooler), leave pooling "
                        "unset")
    pooling = pooling_of(config)
    if head == "linear" and pooling not in POOLINGS:
        raise UserError(f"pooling {pooling!r} is unknown; use one of {', '.join(POOLINGS)}")
    if (pooling == "pooler" or (head == "hf" and encoder_config.model_type == "bert")) and (
            not encoder_config.has_pooler):
        raise UserError(f"the BERT pooler is needed here; {encoder_config.model_type} has none, "
                        "use --config.pooling=mean or cls")
    return SequenceClassifier(encoder_config, task.num_labels,
                              pooling="mean" if head == "hf" else pooling,
                              classifier_dropout=config.classifier_dropout,
                              lora_dropout=config.lora.dropout,
                              dtype=lora_lib.DTYPES[config.dtype], head=head)


def lora_spec(config) -> lora_lib.LoRASpec:
    return lora_lib.LoRASpec(r=config.lora.r, alpha=config.lora.alpha,
                             dropout=config.lora.dropout, targets=tuple(config.lora.targets))


def init_variables(model: SequenceClassifier, pretrained: Pretrained, config) -> dict:
    """{"params": ..., "lora": ...}: the encoder (and, for head='hf', a checkpoint's
    classification head) from the checkpoint, the rest seeded.

    `jax.eval_shape` gives the tree first; then only the head (and checkpoint-missing encoder
    leaves such as an absent pooler) are initialised around the pretrained arrays
    (`init_around`: the values a full init would give them).
    """
    ids = jnp.zeros((1, 8), jnp.int32)
    init = lambda rng: model.init(rng, ids, ids, ids)["params"]
    rng_init, rng_lora = jax.random.split(jax.random.PRNGKey(config.seed))
    jax.eval_shape(init, rng_init)  # fails fast on a bad config, allocates nothing
    params = init_around(model, {"encoder": pretrained.encoder}, rng_init, ids, ids, ids)
    if pretrained.missing:
        log.info("initialised from seed (not in the checkpoint): %s",
                 ", ".join(pretrained.missing))
    if pretrained.head is not None:
        if model.head != "hf":
            log.warning("%s carries a classification head; the linear head starts from seed "
                        "(--config.head=hf uses the checkpoint's)", pretrained.model_dir)
        else:
            params["head"] = place_pretrained(params["head"],
                                              checked_head(pretrained.head, model.num_labels,
                                                           pretrained.model_dir))
    variables = {"params": params}
    if config.experiment == "ft_lora":
        variables["lora"] = lora_lib.init_lora(rng_lora, params, lora_spec(config))
    return variables


def head_num_labels(head: dict) -> int:
    """Output size of a head tree: the linear head's, or an `HFClassificationHead`'s last layer
    (out_proj or classifier)."""
    return int(np.shape(head.get("out_proj", head.get("classifier", head))["bias"])[0])


def checked_head(head: dict, num_labels: int, source: str) -> dict:
    """`head` (an `HFClassificationHead` tree) if its output size is `num_labels`."""
    out = head_num_labels(head)
    if out != num_labels:
        raise UserError(f"the classification head of {source} has {out} outputs but the task "
                        f"has {num_labels} labels; use --config.head=linear for a new head")
    return head


def trainable_patterns(config) -> tuple[str, ...]:
    if config.experiment not in EXPERIMENTS:
        raise UserError(f"experiment {config.experiment!r} is unknown; use one of "
                        f"{', '.join(EXPERIMENTS)}")
    if config.trainable:
        return tuple(config.trainable)
    return {"ft_lora": ("^lora/", "^params/head/"), "ffn": ("^params/head/",),
            "zero_shot": (), "full": (".*",)}[config.experiment]


def prepare(config, with_data: bool = True) -> Setup:
    """Validate the config and inputs, load model and (unless `with_data` is False, as for
    prediction) data. Writes nothing."""
    validate_config(config)
    task = resolve_task(config)
    share = BatchShare.of_this_process(mesh_of(config), batch_size=config.batch_size,
                                       eval_batch_size=config.eval_batch_size)
    if config.experiment == "zero_shot":
        config.num_epochs = 0
    patterns = trainable_patterns(config)
    # the data before the model: a bad row is reported before seconds of model loading
    examples, sources = {}, {}
    if with_data:
        examples, sources = data_lib.load_examples(
            data_lib.DataSource.of(config), task, data_lib.SplitSizes.of(config), config.seed,
            train=config.num_epochs > 0)
    pretrained = load_pretrained(config.model)
    model_dir, enc_cfg = pretrained.model_dir, pretrained.config
    model = build_model(config, enc_cfg, task)
    tokenizer = data_lib.load_tokenizer(model_dir, config.tokenizer)
    max_len = min(config.max_length, enc_cfg.max_position_embeddings)
    splits = {k: data_lib.encode(v, tokenizer, max_len) for k, v in examples.items()}
    variables = init_variables(model, pretrained, config)
    trainable, frozen = lora_lib.split(variables, lora_lib.trainable_mask(variables, patterns))
    return Setup(config, task, model_dir, enc_cfg, model, frozen, trainable, splits,
                 tokenizer.pad_token_id or 0, data_lib.bucket_lengths(max_len, config.buckets),
                 sources, tokenizer, max_len, share)


def make_loss_fn(model: SequenceClassifier, regression: bool) -> trainer.LossFn:
    def loss_fn(trainable, frozen, batch, rng):
        logits = model.apply(lora_lib.combine(trainable, frozen), batch["input_ids"],
                             batch["attention_mask"], batch["token_type_ids"],
                             deterministic=False, rngs={"dropout": rng})
        return trainer.weighted_loss_and_predictions(logits, batch["labels"], batch["weights"],
                                                     regression)[0]

    return loss_fn


def make_predict_step(model: SequenceClassifier, regression: bool):
    """predict(trainable, frozen, batch) -> (B,) predictions (class ids or regression values)."""

    def predict_step(trainable, frozen, batch):
        logits = model.apply(lora_lib.combine(trainable, frozen), batch["input_ids"],
                             batch["attention_mask"], batch["token_type_ids"], deterministic=True)
        return trainer.weighted_loss_and_predictions(logits, batch["labels"], batch["weights"],
                                                     regression)[1]

    return predict_step


def evaluate(predict, trainable, frozen, enc: data_lib.Encoded, task: Task, setup: Setup,
             put, desc: str = "eval") -> tuple[dict[str, float], tuple]:
    """(metrics of `task`, (predictions, labels)) on one encoded split (predictions of every
    process gathered back to example order)."""
    preds = map_encoded(lambda batch: predict(trainable, frozen, batch), enc,
                        setup.config.eval_batch_size, setup.buckets, setup.pad_id, put=put,
                        share=setup.share, desc=desc, progress=setup.config.progress)
    return metrics_lib.compute(task.metrics, preds, enc.labels), (preds, enc.labels)


def experiment(setup: Setup) -> trainer.Experiment:
    """The classifier as an `Experiment` of the shared pipeline."""
    cfg, task = setup.config, setup.task
    place = Placement.from_config(cfg)
    predict = jax.jit(make_predict_step(setup.model, task.is_regression),  # params: as placed
                      in_shardings=(None, None, place.batch), out_shardings=place.batch)
    train = setup.splits.get("train")
    sizes = {k: len(v) for k, v in setup.splits.items()}
    return trainer.Experiment(
        name=cfg.experiment, config=cfg, task=task, model=cfg.model,
        trainable=setup.trainable, frozen=setup.frozen,
        train_lengths=None if train is None else train.lengths,
        loss_fn=make_loss_fn(setup.model, task.is_regression),
        batch_of=lambda idx, size, step_rows: data_lib.make_batch(
            train, idx, size, setup.buckets, setup.pad_id, step_rows),
        evaluate=lambda params, frozen, split, _workdir: evaluate(
            predict, params, frozen, setup.splits[split], task, setup, place.put_batch,
            desc=f"eval {split}"),
        selection_split="selection" if "selection" in setup.splits else task.eval_splits[0],
        sizes=sizes, sources=setup.sources, protocol=selection_protocol(sizes, task.eval_splits),
        meta={"task": task.name, "experiment": cfg.experiment, "model": cfg.model,
              "config": cfg.to_dict()}, share=setup.share, rows_independent=True)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Train per `config`, select on the held-out slice, report the eval splits.

    Returns the results dict (also written to <workdir>/results.json), or
    ``{"stopped_at_step", "total_steps"}`` when `stop_after_steps` ended the run early.
    """
    wall_start = time.perf_counter()
    return trainer.run_experiment(experiment(prepare(config)), workdir, wall_start)
