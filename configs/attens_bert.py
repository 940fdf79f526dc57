"""AttEns on BERT-base at paper scale (GLUE from the Hugging Face hub; needs internet or a cache).

Modules: one FT_LoRA per GLUE task (the authors' settings: r=4, alpha=32, dropout 0.1 on
query/key/value, AdamW 2e-5, wd 0.01, batch 16, 5 epochs):

    python -m ensemble.train_modules --sweep configs/glue_paper.py:bert \
      --workdir runs/glue_bert \
      --tasks sst2,cola,mnli,qnli,rte,wnli,mrpc,qqp --out runs/modules/bert

Combiner on a target task (a module task, or unseen: imdb, ag_news, trec, stsb):

    python train.py --config configs/attens_bert.py \
      --workdir runs/attens_bert/rte --config.task=rte
"""

from configs.attens_common import attens_config


def get_config():
    return attens_config("bert-base-uncased", "runs/modules/bert")
