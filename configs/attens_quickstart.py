"""AttEns in the quickstart: the combiner over the three synthetic FT_LoRA modules of
`configs/quickstart_sweep.py` on a tiny random BERT (a smoke run, offline).

    python train.py --config configs/attens_quickstart.py --workdir runs/quickstart/attens_rte \
      --config.task=synth_topic      # after python -m ensemble.quickstart made the module set
"""

from configs.attens_common import attens_config
from configs.quickstart import ASSETS

MODULES = ("synth_sentiment", "synth_topic", "synth_negation")


def get_config():
    c = attens_config(f"{ASSETS}/tiny-bert", "runs/quickstart/modules", MODULES)
    c.data_dir = f"{ASSETS}/data"
    c.task = "synth_sentiment"
    c.max_length = 32
    c.buckets = (16, 32)
    c.selection_size = 200
    c.num_epochs = 10
    c.feature_cache = "runs/quickstart/feature_cache"
    c.log_every_steps = 20
    return c
