"""AttEns at paper scale, one backbone per argument: bert, distilbert, electra_small, electra_base
(GLUE from the Hugging Face hub; needs internet or a cache).

Modules: one FT_LoRA per GLUE task with the authors' settings (r=4, alpha=32, dropout 0.1 on
query/key/value, AdamW 2e-5, wd 0.01, batch 16, 5 epochs), here for DistilBERT:

    python -m ensemble.train_modules --sweep configs/glue_paper.py:distilbert \
      --workdir runs/glue_distilbert \
      --tasks sst2,cola,mnli,qnli,rte,wnli,mrpc,qqp --out runs/modules/distilbert

Combiner on a target task (a module task, or unseen: imdb, ag_news, trec, stsb):

    python train.py --config configs/attens_paper.py:distilbert \
      --workdir runs/attens_distilbert/rte --config.task=rte

`configs/attens_bert.py` is ``attens_paper.py:bert``. The module set of backbone B is read from
runs/modules/B, the folder the command above writes.
"""

from configs.attens_common import attens_config
from configs.glue_paper import BACKBONES


def get_config(backbone: str = "bert"):
    if backbone not in BACKBONES:
        raise ValueError(f"configs/attens_paper.py:{backbone}: unknown backbone; use one of "
                         f"{', '.join(BACKBONES)}")
    model, _ = BACKBONES[backbone]  # pooling comes with the module set
    return attens_config(model, f"runs/modules/{backbone}")
