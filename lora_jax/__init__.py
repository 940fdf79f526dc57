"""lora_jax: pure-functional LoRA fine-tuning of frozen Flax encoders."""

from lora_jax.host_malloc import keep_heap_memory
from lora_jax.xla_flags import apply_default_flags

apply_default_flags()  # before any JAX backend exists; see lora_jax/xla_flags.py
# XLA:CPU's per-step buffers reused, not remapped; see lora_jax/host_malloc.py
MALLOC_KEEPS_HEAP = keep_heap_memory()


from lora_jax.errors import UserError  # noqa: E402
from lora_jax.lora import LoRASpec, combine, init_lora, merge, split, trainable_mask  # noqa: E402

__all__ = ["UserError", "LoRASpec", "init_lora", "merge", "split", "combine", "trainable_mask"]
__version__ = "0.1.0"
