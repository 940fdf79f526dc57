"""AttEns reproduction at CPU scale (issue 3): Tables 2 and 3 and the k sweep, MiniLM-L3.

Needs the module set first (FT_LoRA seed-0 runs of configs/glue_cpu.py, exported):

    python -m ensemble.train_modules --sweep configs/glue_cpu.py --workdir runs/glue_cpu \
      --tasks sst2,cola,mrpc,rte,stsb,wnli --out runs/modules/minilm_l3

Then every row (Model, FFN, FT_LoRA x3 seeds, AttEns x3 seeds, AttEns with k=2 and k=4):

    python -m lora_jax.sweep --config configs/attens_cpu_sweep.py --workdir runs/attens_cpu \
      --out results/attens_minilm_l3
    python -m ensemble.report --sweep results/attens_minilm_l3.json --out results/attens_minilm_l3

Targets: the six module tasks (seen) and imdb, trec (unseen). SST-2 targets use a 20,000-row
sample of train; IMDB 5,000 train and 5,000 test reviews at 128 tokens (CPU budget).
"""

import ml_collections

from configs.common import minilm_cpu_sweep

MODULES = ("sst2", "cola", "mrpc", "rte", "stsb", "wnli")
ATTENS = "configs/attens_minilm_cpu.py"


def get_config():
    c = ml_collections.ConfigDict()
    c.name = "AttEns vs single-task baselines, MiniLM-L3 modules, CPU scale"
    c.experiments = ("zero_shot", "ffn", "ft_lora", "attens", "attens_k2", "attens_k4")
    c.experiment_configs = ml_collections.ConfigDict(
        {"attens": ATTENS, "attens_k2": ATTENS, "attens_k4": ATTENS})
    c.tasks = (*MODULES, "imdb", "trec")
    c.seeds = (0, 1, 2)
    c.row_seeds = ml_collections.ConfigDict(
        {"zero_shot": (0,), "ffn": (0,), "attens_k2": (0,), "attens_k4": (0,)})
    shared = minilm_cpu_sweep()  # configs/common.py
    c.common = ml_collections.ConfigDict(shared["common"])
    tasks = shared["task_overrides"]
    c.task_overrides = ml_collections.ConfigDict({
        **tasks, "sst2": {**tasks["sst2"], "max_train_examples": 20000},
        "trec": {"max_length": 64},
        "imdb": {"num_epochs": 3, "max_train_examples": 5000, "max_eval_examples": 5000},
    })
    attens = {"num_epochs": 20, "optimizer": {"learning_rate": 1e-3}}
    c.experiment_overrides = ml_collections.ConfigDict({
        **shared["experiment_overrides"],
        "attens": attens,
        "attens_k2": {**attens, "k": 2},
        "attens_k4": {**attens, "k": 4},
    })
    return c
