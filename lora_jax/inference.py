"""Finished runs (and PEFT adapters) applied to new text: the objects behind `lora_jax.predict`,
`lora_jax.export` and `lora_jax.attribute`.

`lora_jax.runs.load_run(workdir)` reads ``results.json``, and the loader that the run's
experiment registered under the entry-point group ``lora_jax.run_loaders`` rebuilds the model
with the run's best checkpoint (the one its results report). Every loaded run offers:

* ``task``: the `Task` (columns, labels, metrics);
* ``predict(rows, where, progress) -> list[dict]``: one output record per input row;
* ``evaluate(rows, outputs, where) -> dict``: the task's metrics (rows must carry labels);
* ``export(out_dir, fmt)``: ``peft`` or ``merged`` (where the experiment has them).

This module holds the classifier's (`ClassifierRun`, also built from a base model plus a PEFT
adapter by `peft_classifier`) and what classification runs share (`classification_outputs`,
`classification_metrics`); AttEns and T5 add theirs in their packages.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np

from lora_jax import classifier
from lora_jax import data as data_lib
from lora_jax import lora as lora_lib
from lora_jax import metrics as metrics_lib
from lora_jax.attribute import classifier_attributions, plot_tokens
from lora_jax.distributed import map_encoded
from lora_jax.errors import UserError
from lora_jax.export import export_classifier
from lora_jax.models import SequenceClassifier
from lora_jax.models.hf_import import init_around, place_pretrained
from lora_jax.peft_io import load_seq_cls
from lora_jax.runs import best_variables, run_config, texts_of
from lora_jax.tasks import Task, custom_task, get_task

# ----------------------------------------------------------------------------- outputs


def classification_outputs(logits: np.ndarray, task: Task) -> list[dict]:
    """Per row: the label (its name when the task has names) and id with the class
    probabilities, or the regression value; always the raw ``logits`` as a list."""
    logits = np.asarray(logits, np.float32)
    if task.is_regression:
        return [{"value": float(row[0]), "logits": row.tolist()} for row in logits]
    probs = np.asarray(jax.nn.softmax(logits, axis=-1))
    out = []
    for row, p in zip(logits, probs, strict=True):
        i = int(np.argmax(row))
        out.append({"label": task.label_names[i] if task.label_names else i, "label_id": i,
                    "probabilities": p.round(6).tolist(), "logits": row.tolist()})
    return out


def classification_metrics(rows: list[dict], outputs: list[dict], task: Task,
                           where: str) -> dict[str, float]:
    """The task's metrics of `outputs` against the labels the rows carry."""
    labels = data_lib.examples_from_rows(rows, dataclasses.replace(task, text_keys=()),
                                         where).labels
    key = "value" if task.is_regression else "label_id"
    preds = np.asarray([o[key] for o in outputs])
    return metrics_lib.compute(task.metrics, preds, labels)


class ClassificationRun:
    """What every run that ends in class logits shares: ``predict`` and ``evaluate`` on top of
    its ``logits(texts, progress) -> (N, C)`` and ``task``."""

    task: Task

    def logits(self, texts: list[tuple[str, ...]], progress: bool = False) -> np.ndarray:
        raise NotImplementedError

    def predict(self, rows: list[dict], where: str, progress: bool = False) -> list[dict]:
        return classification_outputs(self.logits(texts_of(rows, self.task, where), progress),
                                      self.task)

    def evaluate(self, rows: list[dict], outputs: list[dict], where: str) -> dict[str, float]:
        return classification_metrics(rows, outputs, self.task, where)


# ----------------------------------------------------------------------------- classifier


@dataclasses.dataclass
class ClassifierRun(ClassificationRun):
    """A sequence classifier with its weights: a finished FT_LoRA / FFN / zero-shot / full run
    (`classifier_run`) or a base model plus a PEFT adapter (`peft_classifier`)."""

    task: Task
    model: Any  # SequenceClassifier
    variables: dict  # {"params": ..., "lora": ...} as the run's best checkpoint has them
    tokenizer: Any
    max_length: int
    buckets: tuple[int, ...]
    pad_id: int
    batch_size: int
    model_dir: str
    spec: lora_lib.LoRASpec | None  # None for runs without adapters
    pooling: str  # "head" for the transformers head
    config: Any = None  # the run's config, when it is a run

    def logits(self, texts: list[tuple[str, ...]], progress: bool = False) -> np.ndarray:
        """(N, num_labels) float32 logits, batched and bucketed as in training."""
        enc = data_lib.encode(data_lib.Examples(texts, np.zeros(len(texts), np.int32)),
                              self.tokenizer, self.max_length)
        apply = jax.jit(lambda v, b: self.model.apply(v, b["input_ids"], b["attention_mask"],
                                                      b["token_type_ids"], deterministic=True))
        return map_encoded(lambda b: apply(self.variables, b), enc, self.batch_size,
                           self.buckets, self.pad_id, desc="predict", progress=progress)

    def export(self, out_dir: str, fmt: str) -> str:
        return export_classifier(self, out_dir, fmt)

    def attributions(self, rows: list[dict], where: str, steps: int = 64) -> list[dict]:
        return classifier_attributions(self, rows, where, steps)

    def plot_attributions(self, record: dict, path: str) -> None:
        plot_tokens(record, path)


def classifier_run(workdir: str, results: dict) -> ClassifierRun:
    """A finished classifier run with its best checkpoint (the one results.json reports)."""
    config = run_config(results)
    config.progress = False
    setup = classifier.prepare(config, with_data=False)
    return ClassifierRun(setup.task, setup.model,
                         best_variables(workdir, setup.trainable, setup.frozen),
                         setup.tokenizer, setup.max_length, setup.buckets, setup.pad_id,
                         config.eval_batch_size, setup.model_dir,
                         classifier.lora_spec(config) if config.experiment == "ft_lora" else None,
                         classifier.pooling_of(config), config)


def peft_classifier(model: str, adapter: str, *, text_keys: tuple[str, ...] = ("text",),
                    label_names: tuple[str, ...] = (), max_length: int = 512,
                    batch_size: int = 64, task_name: str = "") -> ClassifierRun:
    """A base model (folder or hub id) plus a PEFT SEQ_CLS adapter (folder or hub id), run as
    transformers + PEFT run it: the adapter's r/alpha/targets and its head."""
    pre, peft, head = load_seq_cls(model, adapter)
    if pre.missing:
        raise UserError(f"{model} lacks {', '.join(pre.missing)}; use the base checkpoint the "
                        "adapter was trained on")
    num_labels = classifier.head_num_labels(head)
    if task_name:
        task = get_task(task_name)
        classifier.checked_head(head, task.num_labels, peft.source)
    else:
        if label_names and len(label_names) != num_labels:
            raise UserError(f"--labels names {len(label_names)} classes but the adapter's head "
                            f"has {num_labels} outputs")
        task = custom_task({"name": "adapter", "text_keys": text_keys, "num_labels": num_labels})
        task = dataclasses.replace(task, label_names=tuple(label_names))
    net = SequenceClassifier(pre.config, num_labels, lora_dropout=peft.spec.dropout, head="hf")
    ids = np.zeros((1, 8), np.int32)
    params = init_around(net, {"encoder": pre.encoder}, jax.random.PRNGKey(0), ids, ids, ids)
    # The adapter's head is placed, not given: one made for another base model must reach
    # `adapter_bank.check_fits`, whose error names the adapter, not fail shape checks here.
    params["head"] = place_pretrained(params["head"], head)
    tokenizer = data_lib.load_tokenizer(pre.model_dir)
    max_len = min(max_length, pre.config.max_position_embeddings)
    return ClassifierRun(task, net, {"params": params, "lora": peft.lora}, tokenizer, max_len,
                         data_lib.bucket_lengths(max_len, (16, 32, 64, 128, 256, 512)),
                         tokenizer.pad_token_id or 0, batch_size, pre.model_dir, peft.spec, "head")


