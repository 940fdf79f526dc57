"""Quickstart smoke run: a tiny random BERT on a synthetic sentiment task, fully offline.

`python -m ensemble.quickstart` creates the assets (a WordPiece vocabulary counted on the fly,
a randomly initialised 2-layer BERT, and three synthetic tasks under runs/quickstart/assets) and
runs this config as zero_shot, ffn and ft_lora on each task (the FT_LoRA runs are AttEns's
modules; see configs/quickstart_sweep.py). Once the assets exist, one experiment alone:

    python train.py --config configs/quickstart.py --workdir runs/quickstart/ft_lora

The encoder is random, so the numbers say that the machinery works, not how good LoRA is.
"""

from configs import default

ASSETS = "runs/quickstart/assets"


def on_synthetic_data(c):
    """The quickstart's data settings on config `c` (also AttEns's, configs/attens_quickstart.py):
    the synthetic tasks under ASSETS, 32 tokens, a 200-row selection slice."""
    c.data_dir = f"{ASSETS}/data"
    c.task = "synth_sentiment"
    c.max_length = 32
    c.buckets = (16, 32)
    c.selection_size = 200
    c.log_every_steps = 20
    return c


def get_config():
    c = on_synthetic_data(default.get_config())
    c.experiment = "ft_lora"
    c.model = f"{ASSETS}/tiny-bert"
    c.batch_size = 32
    c.num_epochs = 6
    c.optimizer.learning_rate = 3e-3
    c.checkpoint_every_steps = 200
    return c
