"""CPU-scale single-task baselines on the offline GLUE data: rows Model / FFN / FT_LoRA.

Regenerates results/glue_minilm_l3.{json,md} (about an hour on 2 CPU cores; the table lists
each FT_LoRA training time):

    python -m lora_jax.sweep --config configs/glue_cpu.py --workdir runs/glue_cpu \
      --out results/glue_minilm_l3

Model: ../shared/models/paraphrase-MiniLM-L3-v2 (3 layers, d=384), masked-mean pooling.
Selection on a held-out 10% of train (1000 rows for SST-2); validation is reported.
"""

import ml_collections

from configs.common import minilm_cpu_sweep


def get_config():
    c = ml_collections.ConfigDict()
    c.name = "GLUE single-task baselines, MiniLM-L3, CPU scale"
    c.experiments = ("zero_shot", "ffn", "ft_lora")  # rows: Model, FFN, FT_LoRA
    c.tasks = ("sst2", "cola", "mrpc", "rte", "stsb")
    c.seeds = (0,)
    shared = minilm_cpu_sweep()  # configs/common.py
    # Overrides applied to every run (on top of configs/<experiment>.py).
    c.common = ml_collections.ConfigDict(shared["common"])
    # Per-experiment overrides.
    c.experiment_overrides = ml_collections.ConfigDict(
        {**shared["experiment_overrides"], "zero_shot": {}})
    # Per-task overrides.
    tasks = shared["task_overrides"]
    c.task_overrides = ml_collections.ConfigDict({
        **tasks, "sst2": {**tasks["sst2"], "eval_every_steps": 1000},
        "mrpc": {}, "rte": {}, "stsb": {}})
    return c
