"""FT_LoRA: single-task LoRA on a frozen encoder (the paper's FT_LoRA row).

LoRA r=4, alpha=32, dropout 0.1 on query/key/value, linear head trained. Paper-scale (online):

    python train.py --config configs/ft_lora.py --config.task=rte --workdir runs/ft_lora_rte

CPU scale on the offline data and MiniLM-L3: SST-2 validation accuracy 0.834 in
results/ft_lora_sst2_minilm_l3.json, written by the identical sweep cell
``python -m lora_jax.sweep --config configs/glue_cpu.py --workdir runs/glue_cpu --only sst2
--rows ft_lora --out results/ft_lora_sst2_minilm_l3``; on its own:

    python train.py --config configs/ft_lora.py --workdir runs/ft_lora_sst2 \
      --config.model=../shared/models/paraphrase-MiniLM-L3-v2 --config.data_dir=../shared/data \
      --config.task=sst2 --config.num_epochs=2 --config.batch_size=32 --config.max_length=64 \
      --config.selection_size=1000 --config.optimizer.learning_rate=5e-4 \
      --config.eval_every_steps=1000 --config.progress=False
"""

from configs import default


def get_config():
    c = default.get_config()
    c.experiment = "ft_lora"
    return c
