"""AttEns on ELECTRA-small at paper scale (GLUE from the Hugging Face hub; needs internet or a cache).

Modules: one FT_LoRA per GLUE task (the authors' settings: r=4, alpha=32, dropout 0.1 on
query/key/value, AdamW 2e-5, wd 0.01, batch 16, 5 epochs):

    python -m ensemble.train_modules --sweep configs/glue_paper.py:electra_small \
      --workdir runs/glue_electra_small \
      --tasks sst2,cola,mnli,qnli,rte,wnli,mrpc,qqp --out runs/modules/electra_small

Combiner on a target task (a module task, or unseen: imdb, ag_news, trec, stsb):

    python train.py --config configs/attens_electra_small.py \
      --workdir runs/attens_electra_small/rte --config.task=rte
"""

from configs.attens_common import attens_config


def get_config():
    return attens_config("google/electra-small-discriminator", "runs/modules/electra_small")
