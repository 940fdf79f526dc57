"""Keys every experiment shares: the model, the task's data, optimisation and bookkeeping.

Not run directly. `default.py` (the sequence classifier), `attens_common.py` (AttEns) and
`t5_hybrid.py` start from `common_config()` and add only the keys they honour, so a key that an
experiment would ignore is not in its config at all and ``--config.KEY=...`` is refused by name.
Every value is checked up front (`lora_jax.config_check`).
"""

import ml_collections


def common_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.experiment = ""  # which runner: ft_lora | ffn | zero_shot | full | attens | t5_hybrid
    # Model: a local Hugging Face folder or a hub id (downloaded when online).
    c.model = ""
    c.tokenizer = ""  # default: the model folder's tokenizer
    c.dtype = "float32"  # compute dtype: float32 | bfloat16 (trainable params stay float32)
    # storage of the frozen pretrained weights: bfloat16 halves their memory (trainable
    # parameters and optimizer state stay float32)
    c.param_dtype = "float32"

    # Task and data.
    c.task = "sst2"
    c.data_source = "auto"  # auto: local if data_dir, files if data_files, else hub | tfds
    c.data_dir = ""  # root in the ../shared/data layout: <data_dir>/glue/sst2/train.jsonl.gz
    c.data_files = ml_collections.ConfigDict({"train": "", "validation": ""})
    c.buckets = (16, 32, 64, 128, 256, 512)  # padded lengths jit compiles for
    c.length_grouping = True  # sort within chunks of 50 batches: less padding
    c.max_train_examples = 0  # 0: all (after the held-out slice)
    c.max_eval_examples = 0  # 0: all
    c.selection_size = 0.1  # held-out slice of train for model selection (fraction or count)
    c.train_budget = 0  # few-shot: labelled train rows in all, selection slice included; 0: all

    # Optimisation: AdamW with warmup and a schedule (the AttEns authors' module training:
    # lr 2e-5, wd 0.01, batch 16).
    c.optimizer = ml_collections.ConfigDict(
        {"learning_rate": 2e-5, "weight_decay": 0.01, "b1": 0.9, "b2": 0.999, "eps": 1e-8,
         "schedule": "linear", "warmup_ratio": 0.06, "warmup_steps": 0, "grad_clip": 1.0})
    c.batch_size = 16
    c.eval_batch_size = 128
    c.num_epochs = 5
    c.max_steps = 0  # 0: num_epochs * steps per epoch
    c.early_stopping_patience = 0  # evaluations without a new best; 0: never stop early
    # Devices: (data, fsdp). Batches split over all devices; pretrained weights sharded over
    # fsdp (1: replicated). -1 in one place takes the rest. See lora_jax/sharding.py.
    c.mesh = ml_collections.ConfigDict({"shape": (-1, 1)})
    # Processes (python -m lora_jax.launch, or a cluster) need no setting: every process walks
    # the same global batches and feeds its slice of each, so a run trains identically on any
    # process count that divides the batch sizes. See lora_jax/distributed.py.

    # Bookkeeping.
    c.seed = 0
    c.log_every_steps = 50
    c.eval_every_steps = 0  # 0: once per epoch
    c.checkpoint_every_steps = 1000
    c.resume = False  # continue from the latest checkpoint in --workdir
    c.stop_after_steps = 0  # >0: checkpoint and stop at this step (resume later); no results
    c.progress = True  # tqdm bars
    return c


def custom_task() -> ml_collections.ConfigDict:
    """Your own classification task: --config.custom_task.name=mine
    --config.custom_task.text_keys="('text',)" --config.data_files.train=...;"""
    return ml_collections.ConfigDict(
        {"name": "", "text_keys": ("text",), "label_key": "label", "num_labels": 2,
         "metrics": ()})


# ----------------------------------------------------------------------------- CPU-scale sweeps


def minilm_cpu_sweep() -> dict:
    """What the CPU-scale sweeps on the offline data share (`glue_cpu.py`, `attens_cpu_sweep.py`):
    the overrides of every run (`common`), of the baselines (`experiment_overrides`) and of the
    short-text tasks (`task_overrides`; SST-2 is large and short: 2 epochs at 64 tokens on a
    1000-row selection slice). Each sweep copies what it needs and adds its own keys."""
    return {
        "common": {
            "model": "../shared/models/paraphrase-MiniLM-L3-v2",
            "data_dir": "../shared/data",
            "batch_size": 32,
            "max_length": 128,
            "num_epochs": 5,
            "progress": False,
            "checkpoint_every_steps": 5000,
        },
        "experiment_overrides": {
            "ft_lora": {"optimizer": {"learning_rate": 5e-4}},
            "ffn": {"optimizer": {"learning_rate": 2e-3}},
        },
        "task_overrides": {
            "sst2": {"num_epochs": 2, "max_length": 64, "selection_size": 1000},
            "cola": {"max_length": 64},
        },
    }
