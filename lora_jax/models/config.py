"""One configuration dataclass for the three post-LN encoder families we support.

BERT, DistilBERT and ELECTRA share one computation (embeddings -> LayerNorm -> N post-LN
Transformer layers); they differ in names, token types, the ELECTRA embedding projection and the
BERT pooler. `EncoderConfig.from_hf` reads a Hugging Face `config.json` dict of any of them.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from lora_jax.errors import UserError

SUPPORTED_MODEL_TYPES = ("bert", "distilbert", "electra")


@dataclasses.dataclass(frozen=True)
class EncoderConfig:
    """Architecture hyper-parameters (sizes are counts, not bytes)."""

    model_type: str = "bert"
    vocab_size: int = 30522
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 512
    type_vocab_size: int = 2  # 0: no token-type embeddings (DistilBERT)
    embedding_size: int = 768  # ELECTRA may use embedding_size != hidden_size
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-12
    hidden_dropout: float = 0.1
    attention_dropout: float = 0.1
    pad_token_id: int = 0
    has_pooler: bool = True  # BERT's dense+tanh over [CLS]

    def __post_init__(self):
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise UserError(
                f"model_type {self.model_type!r} is not supported; use one of "
                f"{', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        if self.hidden_size % self.num_heads:
            raise UserError(
                f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}"
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> EncoderConfig:
        """Build from a Hugging Face `config.json` dict (BERT, DistilBERT or ELECTRA)."""
        model_type = hf.get("model_type")
        if model_type == "distilbert":
            return cls(
                model_type="distilbert",
                vocab_size=hf["vocab_size"],
                hidden_size=hf["dim"],
                num_layers=hf["n_layers"],
                num_heads=hf["n_heads"],
                intermediate_size=hf["hidden_dim"],
                max_position_embeddings=hf["max_position_embeddings"],
                type_vocab_size=0,
                embedding_size=hf["dim"],
                hidden_act=hf.get("activation", "gelu"),
                layer_norm_eps=1e-12,
                hidden_dropout=hf.get("dropout", 0.1),
                attention_dropout=hf.get("attention_dropout", 0.1),
                pad_token_id=hf.get("pad_token_id", 0) or 0,
                has_pooler=False,
            )
        if model_type in ("bert", "electra"):
            if hf.get("position_embedding_type", "absolute") != "absolute":
                raise UserError(
                    f"position_embedding_type={hf['position_embedding_type']!r} is not supported; "
                    "only 'absolute' position embeddings are implemented"
                )
            hidden = hf["hidden_size"]
            return cls(
                model_type=model_type,
                vocab_size=hf["vocab_size"],
                hidden_size=hidden,
                num_layers=hf["num_hidden_layers"],
                num_heads=hf["num_attention_heads"],
                intermediate_size=hf["intermediate_size"],
                max_position_embeddings=hf["max_position_embeddings"],
                type_vocab_size=hf.get("type_vocab_size", 2),
                embedding_size=hf.get("embedding_size", hidden) if model_type == "electra" else hidden,
                hidden_act=hf.get("hidden_act", "gelu"),
                layer_norm_eps=hf.get("layer_norm_eps", 1e-12),
                hidden_dropout=hf.get("hidden_dropout_prob", 0.1),
                attention_dropout=hf.get("attention_probs_dropout_prob", 0.1),
                pad_token_id=hf.get("pad_token_id", 0) or 0,
                has_pooler=model_type == "bert",
            )
        raise UserError(
            f"config.json has model_type {model_type!r}; supported encoders are "
            f"{', '.join(SUPPORTED_MODEL_TYPES)}"
        )
