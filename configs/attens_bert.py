"""AttEns on BERT-base at paper scale: ``configs/attens_paper.py:bert`` (see there), under the
name the design card gives. Modules first (``python -m ensemble.train_modules --sweep
configs/glue_paper.py:bert --workdir runs/glue_bert --tasks sst2,cola,mnli,qnli,rte,wnli,mrpc,qqp
--out runs/modules/bert``), then:

    python train.py --config configs/attens_bert.py --workdir runs/attens_bert/rte \
      --config.task=rte
"""

from configs.attens_paper import get_config as paper_config


def get_config():
    return paper_config("bert")
