"""AttEns at CPU scale: MiniLM-L3 modules on the GLUE tasks that ../shared/data has train for.

Modules first (reuses the FT_LoRA runs of configs/glue_cpu.py when they exist):

    python -m ensemble.train_modules --sweep configs/glue_cpu.py \
      --workdir runs/glue_cpu \
      --tasks sst2,cola,mrpc,rte,stsb,wnli --out runs/modules/minilm_l3

Then the combiner on a target (a module task, or unseen: imdb, trec):

    python train.py --config configs/attens_minilm_cpu.py --workdir runs/attens/rte \
      --config.task=rte

Another way to combine the same modules (combiner.method: average | scalar | merge | lorahub |
fusion; ensemble/combiner.py, ensemble/fusion.py), e.g. AdapterFusion inside every layer:

    python train.py --config configs/attens_minilm_cpu.py --workdir runs/attens/rte_fusion \
      --config.task=rte --config.combiner.method=fusion --config.optimizer.learning_rate=1e-2

The full reproduction (all targets, 3 seeds, the k sweep) is configs/attens_cpu_sweep.py.
"""

from configs.attens_common import attens_config

MODULES = ("sst2", "cola", "mrpc", "rte", "stsb", "wnli")


def get_config():
    c = attens_config("", "runs/modules/minilm_l3", MODULES)
    c.data_dir = "../shared/data"
    c.max_length = 128
    c.task = "rte"
    return c
