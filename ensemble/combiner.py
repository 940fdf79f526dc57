"""The AttEns combiner (flax.linen), exactly as ../shared/DESIGN.md fixes it, and the simpler
combiners it is compared with (``config.combiner.method``: attens | average | scalar | merge |
lorahub).

Inputs: ``modules`` (B, k, d) = Agg1-pooled outputs of the k frozen modules; ``base`` (B, d) =
the frozen encoder's pooled output. Then

    m = LN_in(modules)                      # per module vector
    h = MHA(m, m, m) across the k modules   # num_heads heads, self-attention
    a = LN_a(Agg2_k(h))                     # Agg2 over the k axis
    f = FFN(LN_base(base))                  # Linear(d, d)
    logits = Linear(d, C)(LN_out(a + f))    # Agg3 = sum

Because LN_a follows Agg2, ``agg2="sum"`` equals ``"mean"`` up to the LayerNorm epsilon (the
factor k cancels); max and min differ.

Quirk flags reproduce the authors' PyTorch code (all default off):
  ``attend_across_batch``: `nn.MultiheadAttention` without ``batch_first`` treats the batch axis
    as the sequence, so each module index attends over the examples of the batch (only the real
    ones: ``row_mask`` hides the rows that pad a short batch, which the authors' code never has);
  ``shared_layernorm``: one LayerNorm instance serves all four normalisations.
(The other two quirks, padding counted in the token mean and dropout active in the frozen
encoders, act on the features; see `ensemble.features`.)
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from lora_jax.models.layers import Dropout

AGGREGATIONS = {
    "mean": lambda x, axis: jnp.mean(x, axis=axis),
    "max": lambda x, axis: jnp.max(x, axis=axis),
    "min": lambda x, axis: jnp.min(x, axis=axis),
    "sum": lambda x, axis: jnp.sum(x, axis=axis),
}


class AttEnsCombiner(nn.Module):
    """Attention over k module vectors plus an FFN path from the base. Returns float32 logits.

    Attributes:
      num_classes: C (1 for regression).
      num_heads: attention heads (4 in the paper); d must be divisible by it.
      agg2: aggregation over the k modules after attention: mean | max | min | sum.
      lift_dim: if set, module inputs are first mapped by one shared Dense to this width (used
        when the module outputs are task logits, whose width differs from d).
      dropout: dropout on the attention weights and before the classifier.
    """

    num_classes: int
    num_heads: int = 4
    agg2: str = "mean"
    lift_dim: int | None = None
    dropout: float = 0.1
    attend_across_batch: bool = False
    shared_layernorm: bool = False

    @nn.compact
    def __call__(self, modules: jax.Array, base: jax.Array, deterministic: bool = True,
                 return_attention: bool = False, row_mask: jax.Array | None = None):
        """modules (B, k, D), base (B, d) -> logits (B, C) [, attention weights].

        row_mask: (B,) bool, False for rows that only pad the batch; with
        ``attend_across_batch`` no real row attends to them (other rows are independent anyway).
        Attention weights are (B, heads, k, k), or (k, heads, B, B) across the batch.
        """
        if self.agg2 not in AGGREGATIONS:
            raise ValueError(f"agg2 {self.agg2!r} is unknown; use one of {tuple(AGGREGATIONS)}")
        modules = modules.astype(jnp.float32)
        base = base.astype(jnp.float32)
        if self.lift_dim:
            modules = nn.Dense(self.lift_dim, name="lift")(modules)
        d = modules.shape[-1]
        if base.shape[-1] != d:
            base = nn.Dense(d, name="base_lift")(base)
        shared = nn.LayerNorm(name="layernorm") if self.shared_layernorm else None
        norm = lambda name: shared if shared is not None else nn.LayerNorm(name=name)

        m = norm("ln_modules")(modules)  # (B, k, d)
        key_mask = None
        if self.attend_across_batch:
            m = jnp.swapaxes(m, 0, 1)  # (k, B, d): attention runs over the batch axis
            if row_mask is not None:
                key_mask = jnp.broadcast_to(row_mask[None, :], m.shape[:2])
        h, weights = MultiHeadSelfAttention(self.num_heads, self.dropout, name="attention")(
            m, deterministic, key_mask)
        if self.attend_across_batch:
            h = jnp.swapaxes(h, 0, 1)
        a = norm("ln_attention")(AGGREGATIONS[self.agg2](h, 1))  # (B, d)
        f = nn.Dense(d, name="ffn")(norm("ln_base")(base))
        x = norm("ln_out")(a + f)
        x = Dropout(self.dropout)(x, deterministic=deterministic)
        logits = nn.Dense(self.num_classes, name="classifier")(x)
        return (logits, weights) if return_attention else logits


class MultiHeadSelfAttention(nn.Module):
    """Self-attention over axis 1 of (N, L, d) with in/out projections, as nn.MultiheadAttention
    (one fused ``in_proj`` (d, 3d) for q, k, v; ``out_proj`` (d, d); per-head weights returned).

    key_mask: optional (N, L) bool; False keys get zero attention weight.
    Returns (outputs (N, L, d), attention weights (N, heads, L, L)).
    """

    num_heads: int
    dropout: float = 0.0

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool = True,
                 key_mask: jax.Array | None = None):
        n, length, d = x.shape
        if d % self.num_heads:
            raise ValueError(f"width {d} is not divisible by num_heads {self.num_heads}")
        hd = d // self.num_heads
        qkv = nn.Dense(3 * d, name="in_proj")(x).reshape(n, length, 3, self.num_heads, hd)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        scores = jnp.einsum("nqhd,nkhd->nhqk", q, k) / jnp.sqrt(hd)
        if key_mask is not None:
            scores = jnp.where(key_mask[:, None, None, :], scores, jnp.finfo(scores.dtype).min)
        weights = jax.nn.softmax(scores, axis=-1)
        dropped = Dropout(self.dropout)(weights, deterministic=deterministic)
        out = jnp.einsum("nhqk,nkhd->nqhd", dropped, v).reshape(n, length, d)
        return nn.Dense(d, name="out_proj")(out), weights


class MixCombiner(nn.Module):
    """A trained linear head on one mix of the k module vectors, the simpler combiners AttEns
    is compared with. Same call as `AttEnsCombiner`; no attention (None with
    ``return_attention``).

    learned_weights False (``method="average"``, AdapterHub's ``Average`` over pooled outputs;
    the base is not used):

        logits = Linear(d, C)(Dropout(LN(mean_k modules)))

    learned_weights True (``method="scalar"``, PEFT #1655's learned merge weights, on outputs):
    k + 1 softmax weights over the module vectors and the base, `module_weights(params)`,

        w = softmax(theta)                  # (k + 1,), theta = 0 at the start: a plain mean
        logits = Linear(d, C)(Dropout(LN(sum_i w_i modules_i + w_k base)))

    The LayerNorm is AttEns's own before its classifier (LN_out): the comparison is of how the
    modules are combined, not of how well a raw pooled vector is conditioned.
    """

    num_classes: int
    learned_weights: bool = False
    lift_dim: int | None = None
    dropout: float = 0.1

    @nn.compact
    def __call__(self, modules: jax.Array, base: jax.Array, deterministic: bool = True,
                 return_attention: bool = False, row_mask: jax.Array | None = None):
        modules = modules.astype(jnp.float32)
        if self.lift_dim:
            modules = nn.Dense(self.lift_dim, name="lift")(modules)
        if self.learned_weights:
            base = base.astype(jnp.float32)
            if base.shape[-1] != modules.shape[-1]:
                base = nn.Dense(modules.shape[-1], name="base_lift")(base)
            vectors = jnp.concatenate([modules, base[:, None]], axis=1)  # (B, k + 1, d)
            theta = self.param("module_logits", nn.initializers.zeros, (vectors.shape[1],))
            x = jnp.einsum("m,bmd->bd", jax.nn.softmax(theta), vectors)
        else:
            x = modules.mean(1)
        x = Dropout(self.dropout)(nn.LayerNorm(name="ln_out")(x), deterministic=deterministic)
        logits = nn.Dense(self.num_classes, name="classifier")(x)
        return (logits, None) if return_attention else logits


def module_weights(params) -> list[float] | None:
    """The k + 1 softmax weights (modules, then the base) of a learned-weights `MixCombiner`'s
    variables; None for the other combiners."""
    p = params.get("params", params)
    if "module_logits" not in p:
        return None
    return [round(float(w), 5) for w in jax.nn.softmax(jnp.asarray(p["module_logits"]))]


# config.combiner.method -> what combines the k modules: attention over their outputs (the
# paper), their mean, learned scalar weights, a weight-space merge into one adapter whose
# output a linear head reads (`lora_jax.merge`, or LoraHub's searched sum, `ensemble.lorahub`;
# the head is the average MixCombiner of one slot), or AdapterFusion over the modules' deltas
# inside every adapted layer (`ensemble.fusion`, trained through the encoder, no feature cache)
COMBINER_METHODS = ("attens", "average", "scalar", "merge", "lorahub", "fusion")


def combiner_method(config) -> str:
    """``config.combiner.method``; runs saved before the key existed are AttEns."""
    return config.combiner.get("method", "attens")


def build_combiner(config, num_classes: int, hidden: int) -> nn.Module:
    """The combiner of ``config.combiner`` (its ``method``) and ``config.quirks`` for
    `num_classes` outputs over base features of width `hidden`."""
    c, q = config.combiner, config.quirks
    lift_dim = hidden if c.output == "logits" else None
    method = combiner_method(config)
    if method == "fusion":
        raise ValueError("combiner.method='fusion' sits inside the encoder; ensemble.fusion "
                         "builds its model")
    if method in ("average", "scalar", "merge", "lorahub"):
        return MixCombiner(num_classes, method == "scalar", lift_dim, c.dropout)
    return AttEnsCombiner(num_classes=num_classes, num_heads=c.num_heads, agg2=c.agg2,
                          lift_dim=lift_dim, dropout=c.dropout,
                          attend_across_batch=q.attend_across_batch,
                          shared_layernorm=q.shared_layernorm)
