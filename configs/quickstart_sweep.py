"""The quickstart's table (``python -m ensemble.quickstart``): the paper's Table 2 rows Model /
FFN / FT_LoRA / AttEns, the simpler combiners Average / Scalar weights, the weight-space merges
(linear, TIES, DARE), LoraHub's searched merge and AdapterFusion inside the layers (Fusion) over
the same k = 3 modules, on three synthetic tasks, a tiny random BERT, fully offline.

LoraHub needs its extra (``pip install -e '.[lorahub]'``, the CMA-ES library); without it the
table leaves that row out and the quickstart says so.

The FT_LoRA runs double as the k = 3 modules that AttEns combines. After the quickstart has made
its assets, the same table by hand:

    python -m ensemble.train_modules --sweep configs/quickstart_sweep.py \
      --workdir runs/quickstart --tasks synth_sentiment,synth_topic,synth_negation \
      --out runs/quickstart/modules
    python -m lora_jax.sweep --config configs/quickstart_sweep.py --workdir runs/quickstart \
      --out runs/quickstart/table
"""

import ml_collections

try:  # LoraHub's row runs where its optional CMA-ES library imports
    import cma  # noqa: F401

    HAS_LORAHUB = True
except ImportError:
    HAS_LORAHUB = False

TASKS = ("synth_sentiment", "synth_topic", "synth_negation")
HEAD = {"num_epochs": 4, "optimizer": {"learning_rate": 1e-2}}  # every combiner row but AttEns
COMBINERS = ("average", "scalar", "merge_linear", "merge_ties", "merge_dare",
             *(("lorahub",) if HAS_LORAHUB else ()), "fusion")


def get_config():
    c = ml_collections.ConfigDict()
    c.name = "Quickstart smoke run: tiny random BERT, synthetic tasks, k=3 modules"
    c.experiments = ("zero_shot", "ffn", "ft_lora", "attens", *COMBINERS)
    attens = "configs/attens_quickstart.py"
    c.experiment_configs = ml_collections.ConfigDict({
        "zero_shot": "configs/quickstart.py", "ffn": "configs/quickstart.py",
        "ft_lora": "configs/quickstart.py", "attens": attens,
        **{row: attens for row in COMBINERS}})
    c.tasks = TASKS
    c.seeds = (0,)
    c.common = ml_collections.ConfigDict({"progress": False})
    c.task_overrides = ml_collections.ConfigDict({})
    c.experiment_overrides = ml_collections.ConfigDict({
        "zero_shot": {"experiment": "zero_shot"},
        "ffn": {"experiment": "ffn", "optimizer": {"learning_rate": 1e-2}},
        "ft_lora": {"experiment": "ft_lora", "num_epochs": 3},
        "attens": {"num_epochs": 4},
        # the same cached features, other combiners (ensemble/combiner.py); a plain head
        # wants a larger step than the attention combiner (as FFN's)
        "average": {**HEAD, "combiner": {"method": "average"}},
        "scalar": {**HEAD, "combiner": {"method": "scalar"}},
        # one merged adapter (PEFT's add_weighted_adapter semantics) and a head on its output
        "merge_linear": {**HEAD, "combiner": {"method": "merge", "merge_method": "linear"}},
        "merge_ties": {**HEAD, "combiner": {"method": "merge", "merge_method": "ties",
                                            "merge_density": 0.2}},
        "merge_dare": {**HEAD, "combiner": {"method": "merge", "merge_method": "dare_linear",
                                            "merge_density": 0.5}},
        # merge weights searched by CMA-ES on the train rows, then the same head
        "lorahub": {**HEAD, "combiner": {"method": "lorahub"}},
        # the fusion kernels inside the encoder and the same head, trained through the encoder
        "fusion": {**HEAD, "combiner": {"method": "fusion"}},
    })
    return c
