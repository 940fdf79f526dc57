"""Post-LN Transformer encoder in flax.linen covering BERT, DistilBERT and ELECTRA.

Parameter names are architecture-neutral (see `lora_jax.models.hf_import` for the mapping to
each Hugging Face layout)::

    embeddings/{word_embeddings, position_embeddings, token_type_embeddings, LayerNorm, projection}
    layer_{i}/attention/{query, key, value, output}, layer_{i}/attention_norm,
    layer_{i}/intermediate, layer_{i}/output, layer_{i}/output_norm
    pooler                                         (BERT only)

Shapes: ``input_ids``/``attention_mask``/``token_type_ids`` are int (B, T); the encoder returns
hidden states (B, T, hidden_size) in the compute dtype.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from lora_jax.lora import register_adaptable
from lora_jax.models.config import EncoderConfig
from lora_jax.models.layers import ACTIVATIONS, Dropout, LoRADense, gelu_exact, heads_major

POOLINGS = ("mean", "cls", "pooler")
HEADS = ("linear", "hf")

# The Dense layers of these encoders that can take an adapter.
register_adaptable("encoder", r"(^|/)layer_\d+/(attention/(query|key|value|output)|intermediate|output)$")


class Embeddings(nn.Module):
    config: EncoderConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, input_ids, token_type_ids, deterministic: bool, inputs_embeds=None):
        """inputs_embeds: (B, T, embedding_size) word embeddings to use instead of looking up
        `input_ids` (attribution interpolates them); positions and token types are added."""
        cfg = self.config
        init = nn.initializers.normal(stddev=0.02)
        positions = jnp.arange(input_ids.shape[-1])[None, :]
        x = nn.Embed(cfg.vocab_size, cfg.embedding_size, embedding_init=init,
                     name="word_embeddings")(input_ids)
        if inputs_embeds is not None:
            x = inputs_embeds.astype(x.dtype)
        x = x + nn.Embed(cfg.max_position_embeddings, cfg.embedding_size, embedding_init=init,
                         name="position_embeddings")(positions)
        if cfg.type_vocab_size:
            x = x + nn.Embed(cfg.type_vocab_size, cfg.embedding_size, embedding_init=init,
                             name="token_type_embeddings")(token_type_ids)
        x = nn.LayerNorm(epsilon=cfg.layer_norm_eps, dtype=self.dtype, name="LayerNorm")(x)
        x = Dropout(cfg.hidden_dropout)(x, deterministic=deterministic)
        if cfg.embedding_size != cfg.hidden_size:
            x = nn.Dense(cfg.hidden_size, dtype=self.dtype, name="projection")(x)
        return x.astype(self.dtype)


def attention_probs(q: jax.Array, k: jax.Array, attention_mask: jax.Array) -> jax.Array:
    """Softmax attention weights (B, H, Tq, Tk), float32, of queries q (B, Tq, H, Dh) over keys
    k (B, Tk, H, Dh), scaled by 1 / sqrt(Dh); attention_mask (B, Tk), 1 = token, 0 = padding
    (a padded key gets weight 0).

    Both dots (here and in `attention_context`) take heads-major operands and give heads-major
    results; the transposes are explicit. Measured on a quiet 2-core Intel Xeon (jaxlib 0.10.2,
    MiniLM-L3 shapes, batch 32, fp32, alternating rounds in one process) against einsums over
    the (B, T, H, Dh) layout: the eval attention core (these two functions) 26.2 -> 20.7 ms at
    length 128 and 6.9 -> 6.0 ms at length 64 (the probabilities x values dot writing
    (B, Tq, H, Dh) ran at about half the rate of the heads-major one); the LoRA train step
    68.0 -> 69.6 examples/s at length 128 and 153.3 -> 154.2 at length 64."""
    scores = jnp.einsum("bhqd,bhkd->bhqk", heads_major(q), heads_major(k))
    scores = scores.astype(jnp.float32) / jnp.sqrt(q.shape[-1])
    keep = attention_mask[:, None, None, :].astype(bool)
    scores = jnp.where(keep, scores, jnp.finfo(jnp.float32).min)
    return jax.nn.softmax(scores, axis=-1)


def attention_context(probs: jax.Array, v: jax.Array) -> jax.Array:
    """The weighted values, (B, Tq, H * Dh), of weights probs (B, H, Tq, Tk) over values
    v (B, Tk, H, Dh), in v's dtype (heads-major dot, see `attention_probs`)."""
    ctx = jnp.einsum("bhqk,bhkd->bhqd", probs, heads_major(v)).transpose(0, 2, 1, 3)
    return ctx.reshape(*ctx.shape[:2], -1)


class EncoderPart(nn.Module):
    """The fields every adapted part of the encoder takes: the architecture, the LoRA dropout
    rate and the compute dtype."""

    config: EncoderConfig
    lora_dropout: float = 0.0
    dtype: Any = jnp.float32


class SelfAttention(EncoderPart):
    """Multi-head self-attention. x: (B, T, d); attention_mask: (B, T), 1 = token, 0 = padding.

    queries: when set, only the first `queries` positions ask (their keys and values still come
    from all T tokens) and the output is (B, queries, d); otherwise (B, T, d).
    """

    @nn.compact
    def __call__(self, x, attention_mask, deterministic: bool, queries: int | None = None):
        cfg = self.config
        dense = lambda name: LoRADense(cfg.hidden_size, lora_dropout=self.lora_dropout,
                                       dtype=self.dtype, name=name)
        xq = x if queries is None else x[:, :queries]
        split = lambda y: y.reshape(*y.shape[:2], cfg.num_heads, cfg.head_dim)
        q = split(dense("query")(xq, deterministic))
        k = split(dense("key")(x, deterministic))
        v = split(dense("value")(x, deterministic))
        probs = attention_probs(q, k, attention_mask).astype(self.dtype)
        probs = Dropout(cfg.attention_dropout)(probs, deterministic=deterministic)
        ctx = attention_context(probs, v)
        return dense("output")(ctx, deterministic)


class TransformerLayer(EncoderPart):
    """One post-LN block, (B, T, d) -> (B, T, d); with `queries` set, -> (B, queries, d): only
    the first positions are computed past the keys and values (see `SelfAttention`)."""

    @nn.compact
    def __call__(self, x, attention_mask, deterministic: bool, queries: int | None = None):
        cfg = self.config
        kw = dict(lora_dropout=self.lora_dropout, dtype=self.dtype)
        norm = lambda name: nn.LayerNorm(epsilon=cfg.layer_norm_eps, dtype=self.dtype, name=name)
        drop = lambda y: Dropout(cfg.hidden_dropout)(y, deterministic=deterministic)
        attn = SelfAttention(cfg, name="attention", **kw)(x, attention_mask, deterministic,
                                                          queries)
        if queries is not None:
            x = x[:, :queries]
        x = norm("attention_norm")(x + drop(attn))
        h = LoRADense(cfg.intermediate_size, name="intermediate", **kw)(x, deterministic)
        h = ACTIVATIONS[cfg.hidden_act](h)
        h = LoRADense(cfg.hidden_size, name="output", **kw)(h, deterministic)
        return norm("output_norm")(x + drop(h))


class Encoder(EncoderPart):
    """Returns last hidden states (B, T, hidden) and, for BERT, the pooled [CLS] (B, hidden).

    cls_only: the last layer computes the [CLS] position alone (its keys and values still come
    from every token) and the hidden states come back as (B, 1, hidden). The values at [CLS],
    the pooler's and every gradient that flows through them are those of the full pass; the
    work saved is the last layer's queries, attention output, feed-forward and norms at the
    other T - 1 positions (MiniLM-L3 at length 128: 28% of the encoder's FLOPs). With dropout
    on, the last layer's masks are drawn for the shapes it computes, so they are other draws
    (of the same law) than a full pass would take. For callers that read [CLS] only
    (`SequenceClassifier` sets it from its head and pooling).
    """

    @nn.compact
    def __call__(self, input_ids, attention_mask=None, token_type_ids=None,
                 deterministic: bool = True, inputs_embeds=None, cls_only: bool = False):
        cfg = self.config
        if attention_mask is None:
            attention_mask = jnp.ones_like(input_ids)
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(input_ids)
        x = Embeddings(cfg, dtype=self.dtype, name="embeddings")(
            input_ids, token_type_ids, deterministic, inputs_embeds)
        last = cfg.num_layers - 1
        for i in range(cfg.num_layers):
            x = TransformerLayer(cfg, self.lora_dropout, self.dtype, name=f"layer_{i}")(
                x, attention_mask, deterministic, 1 if cls_only and i == last else None)
        pooled = None
        if cfg.has_pooler:
            pooled = jnp.tanh(nn.Dense(cfg.hidden_size, dtype=self.dtype, name="pooler")(x[:, 0]))
        return x, pooled


def reads_cls_only(head: str, pooling: str) -> bool:
    """Whether a classifier head reads the [CLS] position alone (transformers' heads, [CLS] and
    BERT-pooler pooling), so that its encoder may run with ``cls_only``; a masked mean reads
    every token."""
    return head == "hf" or pooling in ("cls", "pooler")


def masked_mean(hidden: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean of (B, T, d) hidden states over the tokens where mask (B, T) is 1, in float32."""
    m = mask.astype(jnp.float32)[..., None]
    return (hidden.astype(jnp.float32) * m).sum(1) / jnp.maximum(m.sum(1), 1.0)


def pool(hidden, pooled, mask, pooling: str) -> jax.Array:
    """Sentence vector (B, d) from hidden states (B, T, d): masked mean, [CLS], or BERT pooler."""
    if pooling == "mean":
        return masked_mean(hidden, mask)
    if pooling == "cls":
        return hidden[:, 0].astype(jnp.float32)
    if pooling == "pooler":
        if pooled is None:
            raise ValueError("pooling='pooler' needs a BERT encoder with a pooler")
        return pooled.astype(jnp.float32)
    raise ValueError(f"unknown pooling {pooling!r}; use one of {POOLINGS}")


class HFClassificationHead(nn.Module):
    """The classification head of transformers' ``<Model>ForSequenceClassification``.

    BERT: pooler output -> dropout -> ``classifier``. DistilBERT: [CLS] -> ``pre_classifier`` ->
    ReLU -> dropout -> ``classifier``. ELECTRA: [CLS] -> dropout -> ``dense`` -> GELU (exact) ->
    dropout -> ``out_proj``. Submodules carry the transformers names (see
    `lora_jax.models.hf_import.hf_head_module_map`). Computes in float32; returns (B, C) logits.
    """

    model_type: str
    num_labels: int
    dropout: float = 0.1

    @nn.compact
    def __call__(self, hidden, pooled, deterministic: bool):
        drop = lambda y: Dropout(self.dropout)(y, deterministic=deterministic)
        dense = lambda n, name: nn.Dense(n, dtype=jnp.float32, name=name,
                                         kernel_init=nn.initializers.normal(stddev=0.02))
        d = hidden.shape[-1]
        if self.model_type == "bert":
            if pooled is None:
                raise ValueError("the BERT head needs the encoder's pooler output")
            return dense(self.num_labels, "classifier")(drop(pooled.astype(jnp.float32)))
        cls = hidden[:, 0].astype(jnp.float32)
        if self.model_type == "distilbert":
            x = jax.nn.relu(dense(d, "pre_classifier")(cls))
            return dense(self.num_labels, "classifier")(drop(x))
        if self.model_type == "electra":
            x = gelu_exact(dense(d, "dense")(drop(cls)))
            return dense(self.num_labels, "out_proj")(drop(x))
        raise ValueError(f"no transformers head for model_type {self.model_type!r}")


class SequenceClassifier(nn.Module):
    """Encoder -> head. Returns float32 logits (B, num_labels); the head is named ``head``.

    head="linear": pooling -> dropout -> one Dense (``head/{kernel, bias}``).
    head="hf": `HFClassificationHead`, the head of transformers' ForSequenceClassification for
    the encoder's model type (its own pooling; ``pooling`` is not used).
    ``num_labels == 1`` is a regression head (STS-B).
    Every head but the masked mean reads [CLS] alone, so the encoder then runs with
    ``cls_only`` (its last layer computes that position only; same logits and gradients).
    """

    config: EncoderConfig
    num_labels: int
    pooling: str = "mean"
    classifier_dropout: float = 0.1
    lora_dropout: float = 0.0
    dtype: Any = jnp.float32
    head: str = "linear"

    @nn.compact
    def __call__(self, input_ids, attention_mask, token_type_ids=None,
                 deterministic: bool = True, inputs_embeds=None):
        hidden, pooled = Encoder(self.config, self.lora_dropout, self.dtype,
                                 name="encoder")(input_ids, attention_mask, token_type_ids,
                                                 deterministic, inputs_embeds,
                                                 reads_cls_only(self.head, self.pooling))
        if self.head == "hf":
            return HFClassificationHead(self.config.model_type, self.num_labels,
                                        self.classifier_dropout, name="head")(
                hidden, pooled, deterministic)
        if self.head != "linear":
            raise ValueError(f"unknown head {self.head!r}; use one of {HEADS}")
        x = pool(hidden, pooled, attention_mask, self.pooling)
        x = Dropout(self.classifier_dropout)(x, deterministic=deterministic)
        return nn.Dense(self.num_labels, dtype=jnp.float32, name="head",
                        kernel_init=nn.initializers.normal(stddev=0.02))(x)
