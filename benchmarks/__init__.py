"""Benchmarks against PyTorch + PEFT (`python -m benchmarks.run`)."""

# lora_jax's process settings (XLA flags, glibc malloc) first, before numpy, torch or JAX start
# any thread: both sides of every comparison run under them.
import lora_jax  # noqa: F401
