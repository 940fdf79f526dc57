"""CPU-scale single-task baselines on the offline GLUE data: rows Model / FFN / FT_LoRA.

Regenerates results/glue_minilm_l3.{json,md} (about an hour on 2 CPU cores; the table lists
each FT_LoRA training time):

    python -m lora_jax.sweep --config configs/glue_cpu.py --workdir runs/glue_cpu \
      --out results/glue_minilm_l3

Model: ../shared/models/paraphrase-MiniLM-L3-v2 (3 layers, d=384), masked-mean pooling.
Selection on a held-out 10% of train (1000 rows for SST-2); validation is reported.
"""

import ml_collections


def get_config():
    c = ml_collections.ConfigDict()
    c.name = "GLUE single-task baselines, MiniLM-L3, CPU scale"
    c.experiments = ("zero_shot", "ffn", "ft_lora")  # rows: Model, FFN, FT_LoRA
    c.tasks = ("sst2", "cola", "mrpc", "rte", "stsb")
    c.seeds = (0,)
    # Overrides applied to every run (on top of configs/<experiment>.py).
    c.common = ml_collections.ConfigDict({
        "model": "../shared/models/paraphrase-MiniLM-L3-v2",
        "data_dir": "../shared/data",
        "batch_size": 32,
        "max_length": 128,
        "num_epochs": 5,
        "progress": False,
        "checkpoint_every_steps": 5000,
    })
    # Per-experiment overrides.
    c.experiment_overrides = ml_collections.ConfigDict({
        "ft_lora": {"optimizer": {"learning_rate": 5e-4}},
        "ffn": {"optimizer": {"learning_rate": 2e-3}},
        "zero_shot": {},
    })
    # Per-task overrides (SST-2 is large and short: 2 epochs at 64 tokens).
    c.task_overrides = ml_collections.ConfigDict({
        "sst2": {"num_epochs": 2, "max_length": 64, "selection_size": 1000,
                 "eval_every_steps": 1000},
        "cola": {"max_length": 64},
        "mrpc": {},
        "rte": {},
        "stsb": {},
    })
    return c
