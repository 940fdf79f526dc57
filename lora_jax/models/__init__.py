"""Flax encoders (BERT, DistilBERT, ELECTRA) and their Hugging Face checkpoint import."""

from lora_jax.models.config import EncoderConfig
from lora_jax.models.encoder import Encoder, SequenceClassifier

__all__ = ["EncoderConfig", "Encoder", "SequenceClassifier"]
