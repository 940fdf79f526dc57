"""AttEns in the quickstart: the combiner over the three synthetic FT_LoRA modules of
`configs/quickstart_sweep.py` on a tiny random BERT (a smoke run, offline).

    python train.py --config configs/attens_quickstart.py --workdir runs/quickstart/attens_rte \
      --config.task=synth_topic      # after python -m ensemble.quickstart made the module set
"""

from configs.attens_common import attens_config
from configs.quickstart import ASSETS, on_synthetic_data

MODULES = ("synth_sentiment", "synth_topic", "synth_negation")


def get_config():
    c = on_synthetic_data(attens_config(f"{ASSETS}/tiny-bert", "runs/quickstart/modules",
                                        MODULES))
    c.num_epochs = 10
    c.feature_cache = "runs/quickstart/feature_cache"
    return c
