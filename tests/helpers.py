"""Small shared builders for tests (no ../shared needed)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax import lora
from lora_jax.models import EncoderConfig, SequenceClassifier

TINY = EncoderConfig(model_type="bert", vocab_size=50, hidden_size=16, num_layers=2, num_heads=2,
                     intermediate_size=32, max_position_embeddings=32, embedding_size=16)


def tiny_model(config: EncoderConfig = TINY, num_labels: int = 3, **kw) -> SequenceClassifier:
    return SequenceClassifier(config, num_labels, **{"lora_alpha": 8.0, **kw})


def tiny_batch(batch: int = 4, length: int = 9, vocab: int = 50, seed: int = 0):
    rng = np.random.default_rng(seed)
    ids = jnp.asarray(rng.integers(1, vocab, (batch, length)), jnp.int32)
    mask = np.ones((batch, length), np.int32)
    mask[1, 5:] = 0
    return ids, jnp.asarray(mask), jnp.zeros_like(ids)


def tiny_variables(model: SequenceClassifier, spec: lora.LoRASpec, seed: int = 0) -> dict:
    ids, mask, types = tiny_batch()
    params = model.init(jax.random.PRNGKey(seed), ids, mask, types)["params"]
    return {"params": params, "lora": lora.init_lora(jax.random.PRNGKey(seed + 1), params, spec)}


def override(config, **dotted):
    """Set ``override(c, **{"optimizer.learning_rate": 1e-3})`` style keys on a ConfigDict."""
    for key, value in dotted.items():
        node = config
        *path, last = key.split(".")
        for part in path:
            node = node[part]
        node[last] = value
    return config
