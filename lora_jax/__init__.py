"""lora_jax: pure-functional LoRA fine-tuning of frozen Flax encoders."""

from lora_jax.compilation_cache import enable_default_cache
from lora_jax.host_malloc import keep_heap_memory
from lora_jax.xla_flags import apply_default_flags

apply_default_flags()  # before any JAX backend exists; see lora_jax/xla_flags.py
# compiled programs kept on disk for later runs; see lora_jax/compilation_cache.py
COMPILATION_CACHE = enable_default_cache()
# XLA:CPU's per-step buffers reused, not remapped; see lora_jax/host_malloc.py
MALLOC_KEEPS_HEAP = keep_heap_memory()


from lora_jax.errors import UserError  # noqa: E402

__all__ = ["UserError", "LoRASpec", "init_lora", "merge", "split", "combine", "trainable_mask"]
__version__ = "0.1.0"
_FROM_LORA = {"LoRASpec", "init_lora", "merge", "split", "combine", "trainable_mask"}


def __getattr__(name: str):
    """`lora_jax.LoRASpec` and the other LoRA functions, imported on first use (PEP 562): a
    command that stops at a bad flag or config value then answers without importing JAX."""
    if name in _FROM_LORA:
        from lora_jax import lora

        return getattr(lora, name)
    raise AttributeError(f"module 'lora_jax' has no attribute {name!r}")
