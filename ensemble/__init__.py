"""AttEns: an attention combiner over k frozen LoRA modules on one frozen encoder.

`modules` saves and loads module sets (adapters + heads + task metadata), `features` runs the
k modules and the base as one stacked pass and caches their pooled outputs, `combiner` is the
Flax combiner, `train` fits it on cached features through the shared loop of `lora_jax.trainer`,
`report` writes the paper's tables and plots, `train_modules` builds a module set and
`quickstart` runs the whole paper at smoke scale.
"""
