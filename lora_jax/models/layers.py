"""Layers shared by every encoder: a Dense that consumes an optional LoRA adapter.

The adapter lives in its own variable collection, ``"lora"``, next to ``"params"``::

    model.apply({"params": frozen_base, "lora": adapter}, ...)

so the base tree is never copied or mutated. A `LoRADense` whose scope has ``lora/A`` (in, r),
``lora/B`` (r, out) and ``lora/alpha`` (a scalar) computes
``y = x W0 + b + (alpha / r) * dropout(x) A B``; without them it is a plain Dense. The adapter
carries its own alpha, so an adapter is never scaled by another adapter's setting. Which kernels
get adapters is decided by `lora_jax.lora.init_lora`, not here.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

LORA_COLLECTION = "lora"

ACTIVATIONS = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
}

default_kernel_init = nn.initializers.normal(stddev=0.02)


class LoRADense(nn.Module):
    """Dense layer ``x @ kernel + bias`` plus an optional low-rank update from the lora collection.

    Attributes:
      features: output width.
      lora_dropout: dropout rate applied to the LoRA input only (as PEFT does).
      dtype: compute dtype (params are kept in ``param_dtype``).
    """

    features: int
    use_bias: bool = True
    lora_dropout: float = 0.0
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    kernel_init: Any = default_kernel_init

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
        kernel = self.param("kernel", self.kernel_init, (x.shape[-1], self.features),
                            self.param_dtype)
        x = x.astype(self.dtype)
        y = jnp.dot(x, kernel.astype(self.dtype))
        if self.use_bias:
            bias = self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype)
            y = y + bias.astype(self.dtype)
        if self.has_variable(LORA_COLLECTION, "A"):
            a = self.get_variable(LORA_COLLECTION, "A")
            b = self.get_variable(LORA_COLLECTION, "B")
            if not self.has_variable(LORA_COLLECTION, "alpha"):
                raise ValueError(f"the adapter of {'/'.join(self.scope.path)} has A and B but no "
                                 "alpha; build adapters with lora_jax.lora.init_lora")
            # alpha is a hyper-parameter stored with the adapter, never trained
            alpha = jax.lax.stop_gradient(self.get_variable(LORA_COLLECTION, "alpha"))
            scale = (alpha / a.shape[-1]).astype(self.dtype)
            x_drop = nn.Dropout(self.lora_dropout)(x, deterministic=deterministic)
            y = y + scale * jnp.dot(jnp.dot(x_drop, a.astype(self.dtype)), b.astype(self.dtype))
        return y
