"""FT_LoRA: single-task LoRA on a frozen encoder (the paper's FT_LoRA row).

LoRA r=4, alpha=32, dropout 0.1 on query/key/value, linear head trained. Paper-scale (online):

    python train.py --config configs/ft_lora.py --config.task=rte --workdir runs/ft_lora_rte

CPU scale on the offline data and MiniLM-L3 (SST-2 validation accuracy 0.86, ~20 min on 2 cores;
see results/glue_minilm_l3.md):

    python train.py --config configs/ft_lora.py --workdir runs/ft_lora_sst2 \
      --config.model=../shared/models/paraphrase-MiniLM-L3-v2 --config.data_dir=../shared/data \
      --config.task=sst2
"""

from configs import default


def get_config():
    c = default.get_config()
    c.experiment = "ft_lora"
    return c
