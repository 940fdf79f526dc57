"""FFN: frozen encoder, trained linear head (the paper's FFN row).

    python train.py --config configs/ffn.py --workdir runs/ffn_sst2 \
      --config.model=../shared/models/paraphrase-MiniLM-L3-v2 --config.data_dir=../shared/data \
      --config.task=sst2
"""

from configs import default


def get_config():
    c = default.get_config()
    c.experiment = "ffn"
    c.optimizer.learning_rate = 1e-3  # only a linear head: a larger step is stable
    return c
