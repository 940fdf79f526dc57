"""Shared AttEns settings; the attens_*.py configs pick the backbone and the module set.

Not run directly. The combiner follows ../shared/DESIGN.md; quirk flags reproduce the authors'
PyTorch code (all off by default). The LoRA settings, pooling and head come with the module set
(`ensemble.train_modules`), so this config has no ``lora``, ``pooling`` or ``trainable`` keys.
"""

import ml_collections

from configs.common import common_config, custom_task

GLUE_MODULES = ("sst2", "cola", "mnli", "qnli", "rte", "wnli", "mrpc", "qqp")


def attens_config(model: str, module_dir: str, modules=GLUE_MODULES) -> ml_collections.ConfigDict:
    c = common_config()
    c.experiment = "attens"
    c.model = model  # "" = the module set's model
    c.custom_task = custom_task()
    c.max_length = 128  # tokens, truncating
    c.module_dir = module_dir  # made by python -m ensemble.train_modules
    c.modules = tuple(modules)  # module order; the k sweep takes the first k
    c.k = 0  # 0: all modules
    c.task = "rte"  # target: a module task, or an unseen one (imdb, ag_news, trec, stsb)
    c.combiner = ml_collections.ConfigDict({
        # attens (the paper) | average | scalar | merge | lorahub (ensemble/combiner.py) |
        # fusion (AdapterFusion inside every adapted layer, ensemble/fusion.py: no cache)
        "method": "attens",
        # merge: the k adapters merged into one (PEFT add_weighted_adapter semantics), a head
        "merge_method": "ties",  # linear | magnitude_prune | ties | dare_linear | dare_ties
        "merge_density": 0.2,  # fraction of entries kept by ties / dare / magnitude_prune
        "merge_majority_sign": "total",  # ties sign election: total | frequency
        "merge_weights": (),  # one per module; (): 1/k each (linear, dare_linear), 1 (ties);
        # lorahub: () = search them (then recorded here in the run's config), or fixed weights
        # lorahub: CMA-ES (pip install -e '.[lorahub]') over k weights in [-bound, bound]
        "lorahub_evaluations": 40,  # objective evaluations (LoraHub's budget)
        "lorahub_l1": 0.05,  # + l1 * sum |w| (LoraHub's regulariser)
        "lorahub_bound": 1.5,
        "lorahub_search_rows": 256,  # at most this many train and selection rows per candidate
        "num_heads": 4,
        "agg1": "mean",  # over tokens: mean (masked) | max | min | sum
        "agg2": "mean",  # over modules after attention
        "output": "hidden",  # hidden (reference code) | logits (paper text)
        "base_pooling": "mean",  # the base encoder's pooled output: mean | cls | pooler
        "dropout": 0.1,
    })
    c.quirks = ml_collections.ConfigDict({
        "attend_across_batch": False,  # nn.MultiheadAttention without batch_first
        "shared_layernorm": False,  # one LayerNorm instance for all four normalisations
        "count_padding": False,  # token mean over padding too
        "encoder_dropout": False,  # dropout on in the frozen encoders: no cache, slow
    })
    c.feature_cache = "runs/feature_cache"
    c.feature_batch_size = 64
    c.num_epochs = 20
    c.batch_size = 32
    c.optimizer.learning_rate = 1e-3
    c.optimizer.warmup_ratio = 0.0
    c.length_grouping = False  # features have no padding: plain shuffled batches
    c.log_every_steps = 100
    return c
