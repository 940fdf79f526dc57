"""Flax T5 encoder-decoder (v1.0 and v1.1 / FLAN-T5) with LoRA-capable projections, an optional
soft prompt and an explicit key/value cache for incremental decoding.

Variables:
  ``params``  the pretrained model (frozen in prompt/LoRA training);
  ``lora``    adapters for any `LoRADense` (attention q/k/v/o, feed-forward), see `lora_jax.lora`;
  ``prompt``  ``{"embedding": (P, d_model)}``: P soft tokens prepended to the encoder input
              (routed, one prompt per row: ``{"embedding": (B, P, d), "mask": (B, P)}``).

Entry points (all pure; use ``model.apply(variables, ..., method=...)``):
  `__call__`   teacher-forced logits (B, T, vocab) float32;
  `encode`     encoder states (B, P + L, d_model) and the matching mask;
  `init_cache` per-layer decoder caches for `decode` (self-attention K/V zeros, cross K/V filled);
  `decode`     logits for some decoder positions, with or without a cache.

Attention uses no 1/sqrt(d) scaling (T5 folds it into the initialisation); softmax and RMSNorm run
in float32 whatever the compute dtype; masks are additive (0 or `NEG_INF`).
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from lora_jax.lora import register_adaptable
from lora_jax.models.layers import ACTIVATIONS, Dropout, LoRADense, heads_major
from t5_hybrid.config import T5Config

PROMPT_COLLECTION = "prompt"
NEG_INF = -1e9

# The projections that can take an adapter (PEFT's names: q, k, v, o, wi, wi_0, wi_1, wo).
register_adaptable("t5", r"(^|/)blocks_\d+/((self|cross)_attention/[qkvo]|mlp/(wi|wi_0|wi_1|wo))$")


def relative_position_bucket(relative_position: jax.Array, bidirectional: bool, num_buckets: int,
                             max_distance: int) -> jax.Array:
    """T5's bucket of ``key_position - query_position``: exact for small distances, log-spaced
    up to `max_distance`, and (bidirectional) half the buckets for keys after the query."""
    buckets = jnp.zeros_like(relative_position)
    if bidirectional:
        num_buckets //= 2
        buckets += (relative_position > 0).astype(jnp.int32) * num_buckets
        distance = jnp.abs(relative_position)
    else:
        distance = -jnp.minimum(relative_position, 0)
    max_exact = num_buckets // 2
    is_small = distance < max_exact
    large = max_exact + (jnp.log(jnp.maximum(distance, 1).astype(jnp.float32) / max_exact)
                         / math.log(max_distance / max_exact)
                         * (num_buckets - max_exact)).astype(jnp.int32)
    large = jnp.minimum(large, num_buckets - 1)
    return buckets + jnp.where(is_small, distance, large)


def padding_bias(mask: jax.Array) -> jax.Array:
    """(B, L) 1/0 key mask -> (B, 1, 1, L) additive float32 bias."""
    return jnp.where(mask[:, None, None, :] > 0, 0.0, NEG_INF).astype(jnp.float32)


class RMSNorm(nn.Module):
    """T5's LayerNorm: scale only, no mean subtraction, statistics in float32."""

    eps: float = 1e-6

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), jnp.float32)
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), -1, keepdims=True) + self.eps)
        return (y * scale).astype(x.dtype)


class T5Module(nn.Module):
    """Fields shared by every T5 part: the architecture, LoRA dropout, compute dtype."""

    config: T5Config
    lora_dropout: float = 0.0
    dtype: Any = jnp.float32

    @property
    def part_kwargs(self) -> dict:
        return dict(config=self.config, lora_dropout=self.lora_dropout, dtype=self.dtype)

    def dense(self, features: int, **kw) -> LoRADense:
        """A bias-free LoRA-capable projection (T5 initialisation scale)."""
        return LoRADense(features, use_bias=False, lora_dropout=self.lora_dropout,
                         dtype=self.dtype,
                         kernel_init=nn.initializers.normal(self.config.d_model ** -0.5), **kw)


class T5Attention(T5Module):
    """Multi-head attention with projections q, k, v, o (no biases); K/V computed separately so
    the caller can cache them."""

    def setup(self):
        cfg = self.config
        dense = self.dense
        self.q = dense(cfg.inner_dim)
        self.k = dense(cfg.inner_dim)
        self.v = dense(cfg.inner_dim)
        self.o = dense(cfg.d_model)
        self.dropout = Dropout(cfg.dropout_rate)

    def _heads(self, x: jax.Array) -> jax.Array:
        """(B, L, inner_dim) -> heads-major (B, heads, L, d_kv)."""
        return heads_major(x.reshape(*x.shape[:-1], self.config.num_heads, self.config.d_kv))

    def key_value(self, x: jax.Array, deterministic: bool) -> tuple[jax.Array, jax.Array]:
        """(B, L, d_model) -> K, V each heads-major (B, heads, L, d_kv).

        Heads-major is the layout the attention dots consume (batch dims b, h leading), so a
        cache kept in it is read in place at every decoding step; in the (B, L, heads, d_kv)
        layout XLA:CPU transposed every layer's self and cross K/V cache at each step (16
        copies per step, a quarter of greedy decoding's time on 2 cores)."""
        return self._heads(self.k(x, deterministic)), self._heads(self.v(x, deterministic))

    def __call__(self, x: jax.Array, key: jax.Array, value: jax.Array, bias: jax.Array,
                 deterministic: bool) -> jax.Array:
        """x (B, Lq, d_model) attends to key/value (B, heads, Lk, d_kv); bias broadcasts to
        (B, heads, Lq, Lk). Returns (B, Lq, d_model)."""
        q = self._heads(self.q(x, deterministic))
        scores = jnp.einsum("bhqd,bhkd->bhqk", q, key.astype(self.dtype),
                            preferred_element_type=jnp.float32) + bias
        probs = self.dropout(jax.nn.softmax(scores, -1), deterministic=deterministic)
        # Heads-major product, then one transpose, as the encoder does (a dot writing
        # (B, Lq, H, d_kv) runs at about half the rate on XLA:CPU, see
        # lora_jax.models.encoder.attention_probs). Quiet 2-core Intel Xeon, alternating rounds:
        # the prompt + LoRA train step (batch 16, 64 + 16 tokens) 1632 -> 1607 ms; greedy and
        # beam decoding (one query row) unchanged within 1%.
        out = jnp.einsum("bhqk,bhkd->bhqd", probs.astype(self.dtype), value.astype(self.dtype))
        out = out.transpose(0, 2, 1, 3)
        return self.o(out.reshape(*out.shape[:2], self.config.inner_dim), deterministic)


class T5FeedForward(T5Module):
    """ReLU (v1.0) or gated-GELU (v1.1): wo(act(wi_0 x) * wi_1 x)."""

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool) -> jax.Array:
        cfg = self.config
        dense = self.dense
        act = ACTIVATIONS[cfg.activation]
        if cfg.is_gated:
            h = act(dense(cfg.d_ff, name="wi_0")(x, deterministic)) * dense(
                cfg.d_ff, name="wi_1")(x, deterministic)
        else:
            h = act(dense(cfg.d_ff, name="wi")(x, deterministic))
        h = Dropout(cfg.dropout_rate)(h, deterministic=deterministic)
        return dense(cfg.d_model, name="wo")(h, deterministic)


def read_cache_rows(cache: jax.Array, rows: jax.Array) -> jax.Array:
    """``out[b, h, t] = cache[rows[b, t], h, t]``: cache (B, heads, T, d_kv), rows (B, T) int32.

    Beam search keeps each beam's K/V where it was written and reorders only this (B, T)
    table when beams are reselected (`t5_hybrid.generate.beam_search`); reordering the caches
    themselves made XLA gather every layer's K and V into a new buffer and copy it back into
    the loop's at every step."""
    return jnp.take_along_axis(cache, rows[:, None, :, None], 0)


class T5Block(T5Module):
    """Pre-norm block: self-attention, (decoder) cross-attention, feed-forward; residuals."""

    is_decoder: bool = False

    def setup(self):
        cfg = self.config
        kw = self.part_kwargs
        self.self_attention = T5Attention(**kw)
        self.self_attention_norm = RMSNorm(cfg.layer_norm_epsilon)
        if self.is_decoder:
            self.cross_attention = T5Attention(**kw)
            self.cross_attention_norm = RMSNorm(cfg.layer_norm_epsilon)
        self.mlp = T5FeedForward(**kw)
        self.mlp_norm = RMSNorm(cfg.layer_norm_epsilon)
        self.dropout = Dropout(cfg.dropout_rate)

    def cross_key_value(self, encoder_states: jax.Array, deterministic: bool):
        return self.cross_attention.key_value(encoder_states, deterministic)

    def __call__(self, x, self_bias, deterministic, cross_bias=None, cross_kv=None, cache=None,
                 cache_index=None, cache_rows=None):
        """x (B, L, d_model). With `cache` ({"k", "v"}: (B, heads, max_len, d_kv)) the new
        positions' K/V are written at `cache_index` and attention runs over the whole cache;
        with `cache_rows` (B, max_len) int32 too, row b attends to position t of cache row
        ``cache_rows[b, t]`` (`read_cache_rows`). Returns (x, updated cache or None)."""
        h = self.self_attention_norm(x)
        key, value = self.self_attention.key_value(h, deterministic)
        if cache is not None:
            at = (0, 0, cache_index, 0)
            key = jax.lax.dynamic_update_slice(cache["k"], key.astype(cache["k"].dtype), at)
            value = jax.lax.dynamic_update_slice(cache["v"], value.astype(cache["v"].dtype), at)
            cache = {"k": key, "v": value}
            if cache_rows is not None:
                key, value = read_cache_rows(key, cache_rows), read_cache_rows(value, cache_rows)
        x = x + self.dropout(self.self_attention(h, key, value, self_bias, deterministic),
                             deterministic=deterministic)
        if self.is_decoder:
            h = self.cross_attention_norm(x)
            x = x + self.dropout(self.cross_attention(h, *cross_kv, cross_bias, deterministic),
                                 deterministic=deterministic)
        x = x + self.dropout(self.mlp(self.mlp_norm(x), deterministic), deterministic=deterministic)
        return x, cache


class T5Stack(T5Module):
    """Encoder or decoder: blocks, one relative-position bias table, final RMSNorm."""

    is_decoder: bool = False

    def setup(self):
        cfg = self.config
        n = cfg.num_decoder_layers if self.is_decoder else cfg.num_layers
        self.relative_attention_bias = nn.Embed(cfg.relative_attention_num_buckets,
                                                cfg.num_heads)
        self.blocks = [T5Block(**self.part_kwargs, is_decoder=self.is_decoder)
                       for _ in range(n)]
        self.final_norm = RMSNorm(cfg.layer_norm_epsilon)
        self.dropout = Dropout(cfg.dropout_rate)

    def position_bias(self, query_positions: jax.Array, key_positions: jax.Array) -> jax.Array:
        """(Lq,), (Lk,) int positions -> (1, heads, Lq, Lk) float32 bias."""
        cfg = self.config
        buckets = relative_position_bucket(key_positions[None, :] - query_positions[:, None],
                                           not self.is_decoder,
                                           cfg.relative_attention_num_buckets,
                                           cfg.relative_attention_max_distance)
        return self.relative_attention_bias(buckets).astype(jnp.float32).transpose(2, 0, 1)[None]

    def cross_key_values(self, encoder_states: jax.Array, deterministic: bool) -> list:
        return [b.cross_key_value(encoder_states, deterministic) for b in self.blocks]

    def __call__(self, x, self_bias, deterministic, cross_bias=None, cross_kvs=None, caches=None,
                 cache_index=None, cache_rows=None):
        x = self.dropout(x, deterministic=deterministic)
        new_caches = []
        for i, block in enumerate(self.blocks):
            x, cache = block(x, self_bias, deterministic, cross_bias,
                             None if cross_kvs is None else cross_kvs[i],
                             None if caches is None else caches[i], cache_index, cache_rows)
            new_caches.append(cache)
        x = self.dropout(self.final_norm(x), deterministic=deterministic)
        return x, (new_caches if caches is not None else None)


class T5ForConditionalGeneration(T5Module):
    """T5 with an LM head. See the module docstring for variables and methods."""

    def setup(self):
        cfg = self.config
        self.shared = nn.Embed(cfg.vocab_size, cfg.d_model, dtype=self.dtype,
                               embedding_init=nn.initializers.normal(1.0))
        self.encoder = T5Stack(**self.part_kwargs, is_decoder=False)
        self.decoder = T5Stack(**self.part_kwargs, is_decoder=True)
        if not cfg.tie_word_embeddings:
            self.lm_head = self.dense(cfg.vocab_size)

    def encoder_inputs(self, input_ids: jax.Array, attention_mask: jax.Array
                       ) -> tuple[jax.Array, jax.Array]:
        """(B, L) ids and 1/0 mask -> the encoder's input embeddings (B, P + L, d_model) and
        mask (B, P + L); P soft-prompt tokens come first when the ``prompt`` collection is
        present."""
        x = self.shared(input_ids)
        mask = attention_mask.astype(jnp.int32)
        if self.has_variable(PROMPT_COLLECTION, "embedding"):
            prompt = self.get_variable(PROMPT_COLLECTION, "embedding").astype(x.dtype)
            batch = x.shape[0]
            if prompt.ndim == 3:  # one prompt per row, left-padded (lora_jax.routing)
                prompt_mask = self.get_variable(PROMPT_COLLECTION, "mask").astype(jnp.int32)
            else:
                prompt = jnp.broadcast_to(prompt, (batch, *prompt.shape))
                prompt_mask = jnp.ones(prompt.shape[:2], jnp.int32)
            x = jnp.concatenate([prompt, x], 1)
            mask = jnp.concatenate([prompt_mask, mask], 1)
        return x, mask

    def encode(self, input_ids: jax.Array, attention_mask: jax.Array,
               deterministic: bool = True) -> tuple[jax.Array, jax.Array]:
        """(B, L) ids and 1/0 mask -> states (B, P + L, d_model), mask (B, P + L)."""
        x, mask = self.encoder_inputs(input_ids, attention_mask)
        return self.encode_embeds(x, mask, deterministic), mask

    def encode_embeds(self, x: jax.Array, mask: jax.Array, deterministic: bool = True
                      ) -> jax.Array:
        """Encoder states (B, S, d_model) of input embeddings x (B, S, d_model) and mask (B, S)
        (attribution interpolates x)."""
        positions = jnp.arange(x.shape[1])
        bias = self.encoder.position_bias(positions, positions) + padding_bias(mask)
        states, _ = self.encoder(x, bias, deterministic)
        return states

    def init_cache(self, encoder_states: jax.Array, max_length: int) -> dict:
        """{"cross": per-layer (K, V) of the encoder states, "self": per-layer zero K/V caches of
        `max_length` decoder positions}."""
        cfg = self.config
        batch = encoder_states.shape[0]
        zeros = jnp.zeros((batch, cfg.num_heads, max_length, cfg.d_kv), self.dtype)
        return {"cross": self.decoder.cross_key_values(encoder_states, True),
                "self": [{"k": zeros, "v": zeros} for _ in range(cfg.num_decoder_layers)]}

    def decode(self, decoder_input_ids: jax.Array, encoder_states: jax.Array,
               encoder_mask: jax.Array, deterministic: bool = True, cache: dict | None = None,
               cache_index: jax.Array | int = 0) -> tuple[jax.Array, dict | None]:
        """Logits (B, T, vocab) float32 for decoder positions [cache_index, cache_index + T).

        Without `cache` the T inputs are the whole prefix (teacher forcing, causal mask). With a
        cache from `init_cache` they are the next T tokens; returns the updated cache. A cache
        with ``"rows"`` ((B, max_length) int32, beam search) reads position t of row b's
        self-attention K/V from cache row ``rows[b, t]``; the new positions are row b's own.
        """
        x = self.shared(decoder_input_ids)
        length = x.shape[1]
        if cache is None:
            query_pos = key_pos = jnp.arange(length)
            cross_kvs = self.decoder.cross_key_values(encoder_states, deterministic)
        else:
            query_pos = cache_index + jnp.arange(length)
            key_pos = jnp.arange(cache["self"][0]["k"].shape[2])
            cross_kvs = cache["cross"]
        causal = jnp.where(key_pos[None, :] <= query_pos[:, None], 0.0, NEG_INF)
        self_bias = self.decoder.position_bias(query_pos, key_pos) + causal[None, None]
        rows = None
        if cache is not None and "rows" in cache:
            own = jnp.broadcast_to(jnp.arange(x.shape[0], dtype=jnp.int32)[:, None],
                                   (x.shape[0], length))
            rows = jax.lax.dynamic_update_slice(cache["rows"], own, (0, cache_index))
        states, caches = self.decoder(x, self_bias, deterministic, padding_bias(encoder_mask),
                                      cross_kvs, None if cache is None else cache["self"],
                                      cache_index, rows)
        new_cache = None if cache is None else {"cross": cache["cross"], "self": caches}
        if rows is not None:
            new_cache["rows"] = rows
        return self.logits(states), new_cache

    def logits(self, states: jax.Array) -> jax.Array:
        if self.config.tie_word_embeddings:
            return self.shared.attend(states * self.config.d_model ** -0.5).astype(jnp.float32)
        return self.lm_head(states).astype(jnp.float32)

    def __call__(self, input_ids, attention_mask, decoder_input_ids, deterministic: bool = True):
        """Teacher-forced logits (B, T, vocab) float32."""
        states, mask = self.encode(input_ids, attention_mask, deterministic)
        return self.decode(decoder_input_ids, states, mask, deterministic)[0]


def shift_right(labels: jax.Array, start_id: int, pad_id: int) -> jax.Array:
    """Decoder inputs for teacher forcing: [start, y0, ..., y_{T-2}], -100 ignored ids -> pad."""
    labels = jnp.where(labels < 0, pad_id, labels)
    start = jnp.full((labels.shape[0], 1), start_id, labels.dtype)
    return jnp.concatenate([start, labels[:, :-1]], 1)
