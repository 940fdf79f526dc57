"""T5 architecture hyper-parameters, read from a Hugging Face `config.json`.

Two families share one computation (pre-norm RMSNorm blocks, relative position buckets shared
per stack, no biases, no attention scaling):

* T5 v1.0: ReLU feed-forward (``wi``, ``wo``), LM head tied to the token embedding and scaled
  by ``d_model ** -0.5``;
* T5 v1.1 / FLAN-T5: gated-GELU feed-forward (``wi_0``, ``wi_1``, ``wo``), untied LM head.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from lora_jax.errors import UserError

FEED_FORWARD = ("relu", "gated-gelu", "gated-relu", "gelu")


@dataclasses.dataclass(frozen=True)
class T5Config:
    """Sizes are counts (tokens, units), not bytes."""

    vocab_size: int = 32128
    d_model: int = 768
    d_kv: int = 64
    d_ff: int = 2048
    num_layers: int = 12
    num_decoder_layers: int = 12
    num_heads: int = 12
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    dropout_rate: float = 0.1
    layer_norm_epsilon: float = 1e-6
    feed_forward_proj: str = "gated-gelu"
    tie_word_embeddings: bool = False
    pad_token_id: int = 0
    eos_token_id: int = 1
    decoder_start_token_id: int = 0

    def __post_init__(self):
        if self.feed_forward_proj not in FEED_FORWARD:
            raise UserError(f"feed_forward_proj {self.feed_forward_proj!r} is not supported; use "
                            f"one of {', '.join(FEED_FORWARD)}")

    @property
    def is_gated(self) -> bool:
        return self.feed_forward_proj.startswith("gated-")

    @property
    def activation(self) -> str:
        """Name in `lora_jax.models.layers.ACTIVATIONS` (HF maps gated-gelu to gelu_new)."""
        act = self.feed_forward_proj.removeprefix("gated-")
        return "gelu_new" if act == "gelu" and self.is_gated else act

    @property
    def inner_dim(self) -> int:
        return self.num_heads * self.d_kv

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> T5Config:
        if hf.get("model_type") not in ("t5", "mt5"):
            raise UserError(f"config.json has model_type {hf.get('model_type')!r}; t5_hybrid "
                            "needs a T5 / FLAN-T5 checkpoint (model_type 't5')")
        fields = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in hf.items() if k in fields and v is not None}
        kw.setdefault("num_decoder_layers", hf.get("num_layers", cls.num_layers))
        # v1.0 ties and scales the LM head; v1.1 does neither. transformers >= 5 stores the
        # scaling as `scale_decoder_outputs` and always reports tie_word_embeddings=True.
        kw["tie_word_embeddings"] = bool(hf.get("scale_decoder_outputs",
                                                hf.get("tie_word_embeddings", True)))
        return cls(**kw)

    def to_hf(self) -> dict[str, Any]:
        """A `config.json` dict that transformers' T5Config reads back to this architecture."""
        return {"model_type": "t5", "architectures": ["T5ForConditionalGeneration"],
                "is_encoder_decoder": True, **dataclasses.asdict(self)}
