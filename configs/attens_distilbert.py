"""AttEns on DistilBERT-base at paper scale (GLUE from the Hugging Face hub; needs internet or a cache).

Modules: one FT_LoRA per GLUE task (the authors' settings: r=4, alpha=32, dropout 0.1 on
query/key/value, AdamW 2e-5, wd 0.01, batch 16, 5 epochs):

    python -m ensemble.train_modules --sweep configs/glue_paper.py:distilbert \
      --workdir runs/glue_distilbert \
      --tasks sst2,cola,mnli,qnli,rte,wnli,mrpc,qqp --out runs/modules/distilbert

Combiner on a target task (a module task, or unseen: imdb, ag_news, trec, stsb):

    python train.py --config configs/attens_distilbert.py \
      --workdir runs/attens_distilbert/rte --config.task=rte
"""

from configs.attens_common import attens_config


def get_config():
    return attens_config("distilbert-base-uncased", "runs/modules/distilbert")
