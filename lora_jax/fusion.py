"""AdapterFusion over k frozen LoRA modules, inside every adapted layer.

    lora = init_fusion([lora_1, ..., lora_k], names, jax.random.PRNGKey(0))
    model.apply({"params": base, "lora": lora}, ...)

Each adapted `LoRADense` then adds to its frozen output ``y = x W0 + b`` an attention over its
k module deltas ``delta_i = scale_i (x A_i) B_i``: the query from ``y``, keys and values from
each delta (`lora_jax.models.layers.LoRADense._fused_update`), as AdapterFusion (Pfeiffer et
al., EACL 2021) attends over adapter outputs, here over LoRA deltas and in every adapted
projection rather than once per transformer block. The modules stay frozen; only the fusion
kernels (and a head) train: `TRAINABLE_PATTERN` for `lora_jax.lora.trainable_mask`.

At initialisation the query and key kernels are small (N(0, std^2)) and the value kernel is
the identity, so every module gets weight ~1/k and the model starts close to the average of the
k modules' deltas; with a zero query kernel it is exactly that average (tests/test_fusion.py).
Scores are scaled by 1/sqrt(out) (dot-product attention) instead of AdapterFusion's annealed
softmax temperature.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax
import numpy as np
from flax import traverse_util

from lora_jax.models.layers import FUSION_KERNELS, FUSION_SCALE, ROUTED_SCALE
from lora_jax.routing import stack_adapters

# The trainable leaves of a fused model's variables, for `lora_jax.lora.trainable_mask`: the
# fusion kernels of every adapted layer (the modules' A, B and scales stay frozen).
TRAINABLE_PATTERN = rf"^lora/.*/({'|'.join(FUSION_KERNELS)})$"


def init_fusion(trees: Sequence[Mapping], names: Sequence[str], key: jax.Array,
                std: float = 0.02) -> dict:
    """The "lora" tree of a fused model: per adapted layer the k adapters stacked as in
    `lora_jax.routing.stack_adapters` (A (k, in, R), B (k, R, out), ranks zero-padded, each
    adapter's alpha_i / r_i in ``fusion_scale`` (k,)) plus ``fusion_query`` and ``fusion_key``
    drawn from N(0, std^2) and ``fusion_value`` = identity, each (out, out), float32.

    Raises UserError (from `stack_adapters`) when the adapters do not fit one base model.
    """
    bank = traverse_util.flatten_dict(stack_adapters(trees, names))
    layers = sorted({path[:-1] for path in bank})
    keys = jax.random.split(key, 2 * len(layers))
    out = {}
    for i, layer in enumerate(layers):
        width = bank[(*layer, "B")].shape[-1]
        out[(*layer, "A")], out[(*layer, "B")] = bank[(*layer, "A")], bank[(*layer, "B")]
        out[(*layer, FUSION_SCALE)] = bank[(*layer, ROUTED_SCALE)]
        query, key_kernel = (np.asarray(std * jax.random.normal(k, (width, width)), np.float32)
                             for k in keys[2 * i: 2 * i + 2])
        out[(*layer, FUSION_KERNELS[0])] = query
        out[(*layer, FUSION_KERNELS[1])] = key_kernel
        out[(*layer, FUSION_KERNELS[2])] = np.eye(width, dtype=np.float32)
    return traverse_util.unflatten_dict(out)

