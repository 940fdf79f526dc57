"""Defaults shared by every single-task experiment (FT_LoRA, FFN, zero-shot).

Not run directly; `ft_lora.py`, `ffn.py` and `zero_shot.py` start from `get_config()` here.
Every field can be overridden on the command line, e.g. ``--config.task=rte``.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.experiment = "ft_lora"  # ft_lora | ffn | zero_shot | full
    # Model: a local Hugging Face folder or a hub id (downloaded when online).
    c.model = "bert-base-uncased"
    c.tokenizer = ""  # default: the model folder's tokenizer
    c.dtype = "float32"  # compute dtype: float32 | bfloat16 (params stay float32)
    c.pooling = "mean"  # mean (masked) | cls | pooler (BERT only)
    c.classifier_dropout = 0.1

    # Task and data.
    c.task = "sst2"  # see lora_jax/tasks.py
    c.data_source = "auto"  # auto: local if data_dir, files if data_files, else hub | tfds
    c.data_dir = ""  # root in the ../shared/data layout: <data_dir>/glue/sst2/train.jsonl.gz
    c.data_files = ml_collections.ConfigDict({"train": "", "validation": ""})
    # Your own task: --config.custom_task.name=mine --config.custom_task.text_keys="('text',)"
    c.custom_task = ml_collections.ConfigDict(
        {"name": "", "text_keys": ("text",), "label_key": "label", "num_labels": 2,
         "metrics": ()})
    c.max_length = 128  # tokens, truncating
    c.buckets = (16, 32, 64, 128, 256, 512)  # padded lengths jit compiles for
    c.length_grouping = True  # sort within chunks of 50 batches: less padding
    c.max_train_examples = 0  # 0: all (after the held-out slice)
    c.max_eval_examples = 0  # 0: all
    c.selection_size = 0.1  # held-out slice of train for model selection (fraction or count)

    # LoRA (experiment ft_lora); names are shared by BERT, DistilBERT and ELECTRA.
    c.lora = ml_collections.ConfigDict(
        {"r": 4, "alpha": 32.0, "dropout": 0.1, "targets": ("query", "key", "value")})
    c.trainable = ()  # regexes on variable paths; empty: the experiment's default

    # Optimisation (the AttEns authors' module training: AdamW 2e-5, wd 0.01, batch 16).
    c.optimizer = ml_collections.ConfigDict(
        {"learning_rate": 2e-5, "weight_decay": 0.01, "b1": 0.9, "b2": 0.999, "eps": 1e-8,
         "schedule": "linear", "warmup_ratio": 0.06, "grad_clip": 1.0})
    c.batch_size = 16
    c.eval_batch_size = 128
    c.num_epochs = 5
    c.max_steps = 0  # 0: num_epochs * steps per epoch

    # Bookkeeping.
    c.seed = 0
    c.log_every_steps = 50
    c.eval_every_steps = 0  # 0: once per epoch
    c.checkpoint_every_steps = 1000
    c.resume = False  # continue from the latest checkpoint in --workdir
    c.stop_after_steps = 0  # >0: checkpoint and stop at this step (resume later); no results
    c.progress = True  # tqdm bars
    return c
