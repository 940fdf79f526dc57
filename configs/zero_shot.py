"""Model: frozen encoder with an untrained (seeded random) head, the paper's `Model` row.

No training step runs; the validation split is scored directly.

    python train.py --config configs/zero_shot.py --workdir runs/zero_shot_sst2 \
      --config.model=../shared/models/paraphrase-MiniLM-L3-v2 --config.data_dir=../shared/data \
      --config.task=sst2
"""

from configs import default


def get_config():
    c = default.get_config()
    c.experiment = "zero_shot"
    c.num_epochs = 0
    c.selection_size = 0
    return c
