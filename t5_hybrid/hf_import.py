"""Hugging Face T5 checkpoints <-> the Flax tree of `t5_hybrid.model`.

`load_pretrained("google/flan-t5-base")` (hub id, downloaded when online) or a local folder
(config.json + model.safetensors / pytorch_model.bin) returns the architecture and params.
Unused and missing weights are reported the way transformers reports them.
"""

from __future__ import annotations

import functools
import json
import logging
import operator
import os

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax.errors import UserError
from lora_jax.models import hf_import as base
from t5_hybrid.config import T5Config
from t5_hybrid.model import T5ForConditionalGeneration

log = logging.getLogger(__name__)

Path = tuple[str, ...]
# Tied copies of `shared.weight` that some checkpoints also store.
_TIED_COPIES = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight")


def hf_name_map(config: T5Config) -> dict[str, tuple[Path, str]]:
    """HF tensor name -> (Flax path, transform); "T" transposes torch's (out, in) Linear."""
    out = {"shared.weight": (("shared", "embedding"), "")}
    if not config.tie_word_embeddings:
        out["lm_head.weight"] = (("lm_head", "kernel"), "T")
    mlp = ("wi_0", "wi_1", "wo") if config.is_gated else ("wi", "wo")
    for stack, n in (("encoder", config.num_layers), ("decoder", config.num_decoder_layers)):
        out[f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"] = (
            (stack, "relative_attention_bias", "embedding"), "")
        out[f"{stack}.final_layer_norm.weight"] = ((stack, "final_norm", "scale"), "")
        for i in range(n):
            hf, fx = f"{stack}.block.{i}.layer", (stack, f"blocks_{i}")
            parts = [("0.SelfAttention", "self_attention", "0.layer_norm", "self_attention_norm")]
            if stack == "decoder":
                parts.append(("1.EncDecAttention", "cross_attention", "1.layer_norm",
                              "cross_attention_norm"))
            for attn_hf, attn_fx, norm_hf, norm_fx in parts:
                for proj in "qkvo":
                    out[f"{hf}.{attn_hf}.{proj}.weight"] = ((*fx, attn_fx, proj, "kernel"), "T")
                out[f"{hf}.{norm_hf}.weight"] = ((*fx, norm_fx, "scale"), "")
            ff = len(parts)
            for name in mlp:
                out[f"{hf}.{ff}.DenseReluDense.{name}.weight"] = ((*fx, "mlp", name, "kernel"), "T")
            out[f"{hf}.{ff}.layer_norm.weight"] = ((*fx, "mlp_norm", "scale"), "")
    return out


def load_config(model_dir: str) -> T5Config:
    with open(os.path.join(model_dir, "config.json")) as f:
        return T5Config.from_hf(json.load(f))


def param_shapes(config: T5Config) -> dict:
    """The model's params as ShapeDtypeStructs (nothing allocated)."""
    ids = jnp.zeros((1, 4), jnp.int32)
    model = T5ForConditionalGeneration(config)
    return jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), ids, ids, ids))["params"]


def convert_state_dict(state: dict[str, np.ndarray], config: T5Config,
                       model_dir: str = "<state dict>") -> dict:
    """Flax params (nested dict of float32 numpy arrays) from a HF T5 state dict.

    Missing weights are an error (a T5 checkpoint has them all); unused ones are reported.
    """
    state = {k: v for k, v in state.items() if k not in _TIED_COPIES}
    if not config.tie_word_embeddings and "lm_head.weight" not in state and "shared.weight" in state:
        state["lm_head.weight"] = state["shared.weight"]  # saved with the head tied to shared
    params, missing, unexpected = base.convert_state_dict(state, None, param_shapes(config),
                                                          name_map=hf_name_map(config))
    base.report_keys(model_dir, [], unexpected)
    if missing:
        raise UserError(f"the checkpoint at {model_dir} lacks {len(missing)} T5 weights (e.g. "
                        f"{missing[0]}); is it a T5ForConditionalGeneration checkpoint?")
    return params


def load_pretrained(model: str) -> tuple[str, T5Config, dict]:
    """(model_dir, config, params) for a local folder or a hub id such as google/flan-t5-base."""
    model_dir = base.resolve_model_dir(model)
    config = load_config(model_dir)
    return model_dir, config, convert_state_dict(base.read_state_dict(model_dir), config,
                                                 model_dir)


def to_hf_state_dict(params: dict, config: T5Config) -> dict[str, np.ndarray]:
    """Inverse of `convert_state_dict` (float32 numpy, torch's (out, in) layout)."""
    out = {}
    for name, (path, transform) in hf_name_map(config).items():
        value = np.asarray(functools.reduce(operator.getitem, path, params), np.float32)
        out[name] = np.ascontiguousarray(value.T if transform == "T" else value)
    return out
