"""Frozen weights stored in bf16 against fp32: SST-2 FT_LoRA on MiniLM-L3, CPU scale.

The two rows are the README's CPU command for SST-2 (the ``sst2`` ft_lora cell of
configs/glue_cpu.py), once as it is (fp32 storage) and once with ``param_dtype=bfloat16``
(the frozen encoder in bf16; LoRA, head and optimizer state fp32; compute fp32), same seed,
same code, one command (about 70 minutes on 2 CPU cores):

    python -m lora_jax.sweep --config configs/param_dtype_cpu.py \
      --workdir runs/param_dtype_cpu --out results/param_dtype_sst2_minilm_l3
"""

import ml_collections

from configs import glue_cpu


def get_config():
    c = glue_cpu.get_config()
    c.name = "FT_LoRA on SST-2 with the frozen weights stored in fp32 and in bf16, MiniLM-L3"
    c.experiments = ("ft_lora", "ft_lora_bf16_storage")
    c.experiment_configs = ml_collections.ConfigDict(
        {"ft_lora_bf16_storage": "configs/ft_lora.py"})
    c.tasks = ("sst2",)
    c.experiment_overrides.ft_lora_bf16_storage = ml_collections.ConfigDict(
        {**c.experiment_overrides.ft_lora.to_dict(), "param_dtype": "bfloat16"})
    return c
