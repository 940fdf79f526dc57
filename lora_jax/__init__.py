"""lora_jax: pure-functional LoRA fine-tuning of frozen Flax encoders."""

from lora_jax.errors import UserError
from lora_jax.lora import LoRASpec, combine, init_lora, merge, split, trainable_mask

__all__ = ["UserError", "LoRASpec", "init_lora", "merge", "split", "combine", "trainable_mask"]
__version__ = "0.1.0"
