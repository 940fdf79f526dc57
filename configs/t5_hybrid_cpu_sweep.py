"""The FLAN-T5 hybrid's Tables 1 and 2 at smoke scale, offline: every variant on SST-2, SAMSum
and WikiSQL with a small random T5 (no real T5 weights exist on these machines).

    python -m lora_jax.sweep --config configs/t5_hybrid_cpu_sweep.py --workdir runs/t5_cpu \
      --out results/t5_hybrid_cpu

WikiSQL has no train split offline: it trains on validation minus a held-out selection slice
and reports test. The scores show the pipeline end to end, not the paper's numbers (a random
model has no prior skills for prompt tuning or LoRA to steer).
"""

import ml_collections

CPU = "configs/t5_hybrid_cpu.py"
VARIANTS = ("base", "prompt_only", "lora_only", "prompt_lora", "full_finetune")


def get_config():
    c = ml_collections.ConfigDict()
    c.name = "FLAN-T5 hybrid ablation, small random T5 (ByT5 bytes), CPU smoke scale"
    c.table = "t5_hybrid.report:markdown_table"
    c.experiments = VARIANTS
    c.experiment_configs = ml_collections.ConfigDict({v: f"{CPU}:{v}" for v in VARIANTS})
    c.tasks = ("sst2", "samsum", "wikisql")
    c.seeds = (0,)
    c.common = ml_collections.ConfigDict({"progress": False, "max_train_examples": 2000,
                                          "max_eval_examples": 200, "num_epochs": 2})
    c.task_overrides = ml_collections.ConfigDict({
        "samsum": {"max_source_length": 256, "max_target_length": 128,
                   "skip_empty_rows": True},  # one empty dialogue in the real train split
        "wikisql": {"train_split": "validation", "selection_split": "heldout",
                    "max_source_length": 192, "max_target_length": 128},
    })
    c.experiment_overrides = ml_collections.ConfigDict({})
    return c
