"""The quickstart's table (``python -m ensemble.quickstart``): the paper's Table 2 rows Model /
FFN / FT_LoRA / AttEns, the simpler combiners Average / Scalar weights and AdapterFusion inside
the layers (Fusion) over the same k = 3 modules, on three synthetic tasks, a tiny random BERT,
fully offline.

The FT_LoRA runs double as the k = 3 modules that AttEns combines. After the quickstart has made
its assets, the same table by hand:

    python -m ensemble.train_modules --sweep configs/quickstart_sweep.py \
      --workdir runs/quickstart --tasks synth_sentiment,synth_topic,synth_negation \
      --out runs/quickstart/modules
    python -m lora_jax.sweep --config configs/quickstart_sweep.py --workdir runs/quickstart \
      --out runs/quickstart/table
"""

import ml_collections

TASKS = ("synth_sentiment", "synth_topic", "synth_negation")


def get_config():
    c = ml_collections.ConfigDict()
    c.name = "Quickstart smoke run: tiny random BERT, synthetic tasks, k=3 modules"
    c.experiments = ("zero_shot", "ffn", "ft_lora", "attens", "average", "scalar", "fusion")
    attens = "configs/attens_quickstart.py"
    c.experiment_configs = ml_collections.ConfigDict({
        "zero_shot": "configs/quickstart.py", "ffn": "configs/quickstart.py",
        "ft_lora": "configs/quickstart.py", "attens": attens, "average": attens,
        "scalar": attens, "fusion": attens})
    c.tasks = TASKS
    c.seeds = (0,)
    c.common = ml_collections.ConfigDict({"progress": False})
    c.task_overrides = ml_collections.ConfigDict({})
    c.experiment_overrides = ml_collections.ConfigDict({
        "zero_shot": {"experiment": "zero_shot"},
        "ffn": {"experiment": "ffn", "optimizer": {"learning_rate": 1e-2}},
        "ft_lora": {"experiment": "ft_lora", "num_epochs": 3},
        "attens": {"num_epochs": 4},
        # the same cached features, other combiners (ensemble/combiner.py)
        # a plain head wants a larger step than the attention combiner (as FFN's)
        "average": {"num_epochs": 4, "optimizer": {"learning_rate": 1e-2},
                    "combiner": {"method": "average"}},
        "scalar": {"num_epochs": 4, "optimizer": {"learning_rate": 1e-2},
                   "combiner": {"method": "scalar"}},
        # the fusion kernels inside the encoder and the same head, trained through the encoder
        "fusion": {"num_epochs": 4, "optimizer": {"learning_rate": 1e-2},
                   "combiner": {"method": "fusion"}},
    })
    return c
