"""FLAN-T5 prompt tuning + LoRA, and its ablation rows (the paper's Tables 1 and 2).

    python train.py --config configs/t5_hybrid.py:prompt_lora --workdir runs/t5/sst2_prompt_lora \
        --config.task=sst2            # sst2 | samsum | wikisql

Variants (the part after ":"): base (no training, task prefix), prompt_only, lora_only,
prompt_lora (the paper's method), full_finetune (every weight, task prefix). The paper's
settings: google/flan-t5-base, 30 soft tokens initialised from vocabulary embeddings, LoRA r=4,
alpha=4, dropout 0.05 on q and v of every attention, AdamW lr 1e-3 (betas 0.9/0.999, eps 1e-8,
wd 1e-3), cosine schedule with 500 warmup steps, grad-norm clip 1.0, bf16, batch 16, up to 20
epochs with early stopping on validation. Needs the hub (model and data) unless
--config.model / --config.data_dir point at local copies; `configs/t5_hybrid_cpu.py` is the
offline smoke version.
"""

import ml_collections

from configs.common import common_config
from t5_hybrid.adapters import VARIANTS


def get_config(variant: str = "prompt_lora") -> ml_collections.ConfigDict:
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; use one of {', '.join(VARIANTS)}")
    c = common_config()
    c.experiment = "t5_hybrid"
    c.variant = variant
    c.model = "google/flan-t5-base"  # hub id, local HF folder, or random:tiny / random:small
    c.model_seed = 0  # init seed of a random:* model
    c.dtype = "bfloat16"  # compute dtype; trainable params stay float32

    c.task = "sst2"  # sst2 | samsum | wikisql (t5_hybrid/tasks.py)
    c.data_files = ml_collections.ConfigDict({"train": "", "validation": "", "test": ""})
    c.train_split = "train"  # e.g. validation for WikiSQL offline (no train split there)
    c.selection_split = ""  # "": the task's (SST-2: heldout); a split name, or "heldout":
    # a slice of train (selection_size rows), never trained on
    c.selection_size = 0.05  # held-out slice of train when the task selects on train
    c.max_source_length = 0  # tokens; 0: the task's default
    c.max_target_length = 0
    c.buckets = (8, 16, 32, 64, 128, 256, 512)
    c.skip_empty_rows = False  # True: drop rows with an empty text (SAMSum train has one)

    c.prompt = ml_collections.ConfigDict({"num_tokens": 30})
    c.lora = ml_collections.ConfigDict(
        {"r": 4, "alpha": 4.0, "dropout": 0.05, "targets": ("q", "v")})
    c.optimizer = ml_collections.ConfigDict(
        {"learning_rate": 1e-4 if variant == "full_finetune" else 1e-3, "weight_decay": 1e-3,
         "b1": 0.9, "b2": 0.999, "eps": 1e-8, "schedule": "cosine", "warmup_steps": 500,
         "warmup_ratio": 0.0, "grad_clip": 1.0})
    c.eval_batch_size = 64
    c.num_epochs = 20
    c.early_stopping_patience = 3  # evaluations without a new best; 0: never stop early
    c.num_beams = 1  # decoding for evaluation: 1 greedy, >1 beam search
    return c
