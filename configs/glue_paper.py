"""Paper-scale single-task baselines and AttEns modules on GLUE from the hub, per backbone.

    python -m lora_jax.sweep --config configs/glue_paper.py:bert --workdir runs/glue_bert \
      --out results/glue_bert

Backbones: bert (bert-base-uncased, BERT pooler as BertForSequenceClassification), distilbert,
electra_small, electra_base ([CLS] pooling). The authors' module training: LoRA r=4, alpha=32,
dropout 0.1 on query/key/value, AdamW 2e-5, wd 0.01, batch 16, 5 epochs.
"""

import ml_collections

BACKBONES = {
    "bert": ("bert-base-uncased", "pooler"),
    "distilbert": ("distilbert-base-uncased", "cls"),
    "electra_small": ("google/electra-small-discriminator", "cls"),
    "electra_base": ("google/electra-base-discriminator", "cls"),
}


def get_config(backbone: str = "bert"):
    model, pooling = BACKBONES[backbone]
    c = ml_collections.ConfigDict()
    c.name = f"GLUE single-task baselines, {model}"
    c.experiments = ("zero_shot", "ffn", "ft_lora")
    c.tasks = ("sst2", "cola", "mnli", "qnli", "rte", "wnli", "mrpc", "qqp")
    c.seeds = (0,)
    c.common = ml_collections.ConfigDict({
        "model": model, "pooling": pooling, "batch_size": 16, "num_epochs": 5,
        "max_length": 128, "progress": True, "selection_size": 0.1,
    })
    c.experiment_overrides = ml_collections.ConfigDict({
        "ft_lora": {"optimizer": {"learning_rate": 2e-5}},
        "ffn": {"optimizer": {"learning_rate": 1e-3}},
        "zero_shot": {},
    })
    c.task_overrides = ml_collections.ConfigDict({"mnli": {"selection_size": 5000},
                                                  "qqp": {"selection_size": 5000}})
    return c
