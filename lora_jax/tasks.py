"""Task registry: where each dataset lives, its input columns, label space and metrics.

A task names three sources (which one is used is the config's choice):
* ``hub``: a Hugging Face hub dataset (``datasets.load_dataset(*hub)``), online;
* ``tfds``: a TensorFlow Datasets name (``glue/sst2``), online, optional extra;
* ``local``: ``<data_dir>/<local>/<split>.<ext>`` as in ``../shared/data``
  (``.jsonl.gz``, ``.jsonl``, ``.json``, ``.csv``, ``.tsv``, ``.parquet``).
Users can also register their own files and columns through the config (`custom_task`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from lora_jax.errors import UserError


@dataclasses.dataclass(frozen=True)
class Task:
    """One task: classification / regression (``text_keys`` + ``label_key``) or text-to-text
    (``source_fn`` + ``target_fn``, ``kind == "seq2seq"``).

    num_labels: number of classes; 1 means regression (targets are floats); 0 for seq2seq.
    splits: our split name -> the source's split name; ``eval_splits`` are reported.
    selection_split: the split that selects the model; "" = a held-out slice of train.
    metrics: the first one is the task's main metric (model selection, tables).
    source_fn / target_fn: (row, where) -> text, raising UserError on a bad row (seq2seq).
    prefix: the hand-written instruction of seq2seq rows without trained inputs.
    label_names: what each class id means (predictions print names when given).
    """

    name: str
    text_keys: tuple[str, ...] = ()
    num_labels: int = 0
    metrics: tuple[str, ...] = ("accuracy",)
    label_key: str = "label"
    hub: tuple[str, ...] = ()
    tfds: str = ""
    local: str = ""
    splits: tuple[tuple[str, str], ...] = (("train", "train"), ("validation", "validation"))
    eval_splits: tuple[str, ...] = ("validation",)
    selection_split: str = ""
    label_range: tuple[float, float] | None = None  # regression targets
    source_fn: Callable[[dict, str], str] | None = None
    target_fn: Callable[[dict, str], str] | None = None
    prefix: str = ""
    max_source_length: int = 256
    max_target_length: int = 64
    label_names: tuple[str, ...] = ()  # class names by id, when known

    @property
    def kind(self) -> str:
        return "seq2seq" if self.source_fn is not None else "classification"

    @property
    def is_regression(self) -> bool:
        return self.num_labels == 1

    @property
    def main_metric(self) -> str:
        return self.metrics[0]

    def source_split(self, split: str) -> str:
        return dict(self.splits).get(split, split)


_REGISTRY: dict[tuple[str, str], Task] = {}


def register_task(task: Task) -> Task:
    """Add a task to the registry under (kind, name); extensions register theirs on import."""
    _REGISTRY[(task.kind, task.name)] = task
    return task


def task_names(kind: str = "classification") -> list[str]:
    return [name for k, name in _REGISTRY if k == kind]


def _glue(name, keys, n, metrics=("accuracy",), **kw) -> Task:
    return Task(name, keys, n, metrics, hub=("nyu-mll/glue", name), tfds=f"glue/{name}",
                local=f"glue/{name}", **kw)


for _task in [
    _glue("cola", ("sentence",), 2, ("matthews", "accuracy"),
          label_names=("unacceptable", "acceptable")),
    _glue("sst2", ("sentence",), 2, label_names=("negative", "positive")),
    _glue("mrpc", ("sentence1", "sentence2"), 2, ("accuracy", "f1"),
          label_names=("not_equivalent", "equivalent")),
    _glue("qqp", ("question1", "question2"), 2, ("accuracy", "f1"),
          label_names=("not_duplicate", "duplicate")),
    _glue("stsb", ("sentence1", "sentence2"), 1, ("pearson", "spearman"),
          label_range=(0.0, 5.0)),
    _glue("mnli", ("premise", "hypothesis"), 3,
          splits=(("train", "train"), ("validation", "validation_matched"),
                  ("validation_matched", "validation_matched"),
                  ("validation_mismatched", "validation_mismatched")),
          eval_splits=("validation_matched", "validation_mismatched"),
          label_names=("entailment", "neutral", "contradiction")),
    _glue("qnli", ("question", "sentence"), 2, label_names=("entailment", "not_entailment")),
    _glue("rte", ("sentence1", "sentence2"), 2, label_names=("entailment", "not_entailment")),
    _glue("wnli", ("sentence1", "sentence2"), 2, label_names=("not_entailment", "entailment")),
    Task("imdb", ("text",), 2, hub=("stanfordnlp/imdb",), tfds="imdb_reviews", local="imdb",
         splits=(("train", "train"), ("validation", "test")), label_names=("neg", "pos")),
    Task("ag_news", ("text",), 4, hub=("fancyzhx/ag_news",), tfds="ag_news_subset",
         local="ag_news", splits=(("train", "train"), ("validation", "test")),
         label_names=("World", "Sports", "Business", "Sci/Tech")),
    Task("trec", ("text",), 6, label_key="coarse_label", hub=("CogComp/trec",), local="trec",
         splits=(("train", "train"), ("validation", "test")),
         label_names=("ABBR", "ENTY", "DESC", "HUM", "LOC", "NUM")),
    # Generated offline by lora_jax.synthetic (quickstart and tests).
    Task("synth_sentiment", ("sentence",), 2, local="synth/sentiment"),
    Task("synth_topic", ("sentence",), 2, local="synth/topic"),
    Task("synth_negation", ("sentence",), 2, local="synth/negation"),
]:
    register_task(_task)


def get_task(name: str, kind: str = "classification") -> Task:
    """The registered task `name` of `kind` (classification, or seq2seq for T5)."""
    if (kind, name) not in _REGISTRY:
        what = "t5 task" if kind == "seq2seq" else "task"
        hint = "" if kind == "seq2seq" else " (or set config.custom_task for your own files)"
        raise UserError(f"unknown {what} {name!r}; choose one of "
                        f"{', '.join(task_names(kind))}{hint}")
    return _REGISTRY[(kind, name)]


def resolve_task(config) -> Task:
    """The config's task: ``custom_task`` when it names one, else the registered ``task``."""
    if config.get("custom_task") and config.custom_task.get("name"):
        return custom_task(config.custom_task.to_dict())
    return get_task(config.task)


def custom_task(spec) -> Task:
    """A task from a config dict: name, text_keys, label_key, num_labels, metrics."""
    try:
        return Task(name=spec["name"], text_keys=tuple(spec["text_keys"]),
                    num_labels=int(spec["num_labels"]), label_key=spec.get("label_key", "label"),
                    metrics=tuple(spec.get("metrics") or (
                        ("pearson", "spearman") if int(spec["num_labels"]) == 1 else ("accuracy",))))
    except KeyError as e:
        raise UserError(f"config.custom_task is missing {e.args[0]!r}; it needs name, text_keys, "
                        "num_labels (and optionally label_key, metrics)") from None
