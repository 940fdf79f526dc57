"""STS-B as an unseen target (the paper's Table 3): every combiner over the five MiniLM-L6 modules
trained without it (issue 28).

The modules are the FT_LoRA runs of configs/attens_minilm_l6_sweep.py (run those first, as its
docstring says); export the five without STS-B, then the rows and the report:

    python -m ensemble.train_modules --sweep configs/attens_minilm_l6_sweep.py \
      --workdir runs/attens_l6 --tasks sst2,cola,mrpc,rte,wnli --out runs/modules/minilm_l6_no_stsb
    python -m lora_jax.sweep --config configs/attens_minilm_l6_stsb_unseen_sweep.py \
      --workdir runs/attens_l6_stsb_unseen --out results/attens_minilm_l6_stsb_unseen
    python -m ensemble.report --sweep results/attens_minilm_l6_stsb_unseen.json \
      --out results/attens_minilm_l6_stsb_unseen

Same rows and settings as the main grid on all of STS-B's train split (no few-shot budgets, no k
rows), 3 seeds.
"""

import ml_collections

from configs import attens_minilm_l6_sweep as grid

MODULES = ("sst2", "cola", "mrpc", "rte", "wnli")
MODULE_DIR = "runs/modules/minilm_l6_no_stsb"


def get_config():
    c = grid.get_config()
    c.name = "STS-B unseen: combiners over five MiniLM-L6 modules trained without it, CPU scale"
    rows = tuple(r for r in c.experiments if r not in grid.K_ROWS)
    c.experiments = rows
    c.experiment_configs = ml_collections.ConfigDict(
        {r: f for r, f in c.experiment_configs.items() if r in rows})
    c.tasks = ("stsb",)
    del c.budgets, c.row_budgets
    for row in rows:
        if "module_dir" in c.experiment_overrides.get(row, {}):
            c.experiment_overrides[row].module_dir = MODULE_DIR
            c.experiment_overrides[row].modules = MODULES
    return c
