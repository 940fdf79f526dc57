"""Defaults of every single-task sequence-classifier experiment (FT_LoRA, FFN, zero-shot, full).

Not run directly; `ft_lora.py`, `ffn.py` and `zero_shot.py` start from `get_config()` here.
Every field can be overridden on the command line, e.g. ``--config.task=rte``.
"""

import ml_collections

from configs.common import common_config, custom_task


def get_config() -> ml_collections.ConfigDict:
    c = common_config()
    c.experiment = "ft_lora"  # ft_lora | ffn | zero_shot | full
    c.model = "bert-base-uncased"
    # Head: linear (pooling -> dropout -> Dense) | hf (the head of transformers'
    # <Model>ForSequenceClassification, loaded from such a checkpoint when it has one).
    c.head = "linear"
    c.pooling = ""  # linear head: mean (masked, the default) | cls | pooler (BERT only)
    c.classifier_dropout = 0.1
    c.custom_task = custom_task()
    c.max_length = 128  # tokens, truncating

    # LoRA (experiment ft_lora); names are shared by BERT, DistilBERT and ELECTRA.
    c.lora = ml_collections.ConfigDict(
        {"r": 4, "alpha": 32.0, "dropout": 0.1, "targets": ("query", "key", "value")})
    c.trainable = ()  # regexes on variable paths; empty: the experiment's default
    return c
