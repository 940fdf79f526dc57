"""AttEns: an attention combiner over k frozen LoRA modules on one frozen encoder.

`modules` saves and loads module sets (adapters + heads + task metadata), `features` runs the
k modules and the base as one stacked pass and caches their pooled outputs, `combiner` is the
Flax combiner, `train` fits it on cached features, `report` writes the paper's tables and plots.
"""
