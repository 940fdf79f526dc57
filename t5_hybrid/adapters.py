"""The trainable parts of the hybrid: a soft prompt and LoRA adapters over a frozen T5.

`init_variables(rng, params, config)` returns ``{"params", "lora"?, "prompt"?}`` for one of the
ablation variants; `trainable_patterns(variant)` says which of them the optimiser updates:

==============  ============================  =====================
variant         trainable                     extra inputs
==============  ============================  =====================
base            nothing (evaluation only)     task prefix
prompt_only     prompt/embedding              30 soft tokens
lora_only       lora/** (q, v of every attn)
prompt_lora     prompt/embedding, lora/**     30 soft tokens
full_finetune   params/** (every weight)      task prefix
==============  ============================  =====================
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from lora_jax import lora as lora_lib
from lora_jax.errors import UserError

VARIANTS = {
    "base": (),
    "prompt_only": ("^prompt/",),
    "lora_only": ("^lora/",),
    "prompt_lora": ("^prompt/", "^lora/"),
    "full_finetune": ("^params/",),
}


def check_variant(variant: str) -> None:
    if variant not in VARIANTS:
        raise UserError(f"t5 variant {variant!r} is unknown; use one of {', '.join(VARIANTS)}")


def uses_prompt(variant: str) -> bool:
    return "prompt" in variant


def uses_lora(variant: str) -> bool:
    return "lora" in variant


def uses_prefix(variant: str) -> bool:
    """The rows without trained inputs get the hand-written task instruction."""
    return variant in ("base", "full_finetune")


def trainable_patterns(variant: str) -> tuple[str, ...]:
    check_variant(variant)
    return VARIANTS[variant]


def init_prompt(rng: jax.Array, embedding: jax.Array, num_tokens: int,
                sample_from: int = 5000) -> dict:
    """{"embedding": (num_tokens, d_model) float32}: copies of the token embeddings of
    `num_tokens` distinct ids drawn from the first `sample_from` ids of the vocabulary (the
    frequent ones in a SentencePiece vocabulary), as in Lester et al. (2021)."""
    vocab = embedding.shape[0]
    if not 0 < num_tokens <= min(vocab, sample_from):
        raise UserError(f"prompt.num_tokens={num_tokens} must be in 1..{min(vocab, sample_from)}")
    ids = jax.random.choice(rng, min(vocab, sample_from), (num_tokens,), replace=False)
    return {"embedding": jnp.asarray(embedding, jnp.float32)[ids]}


def init_variables(rng: jax.Array, params: dict, variant: str, lora_spec: lora_lib.LoRASpec,
                   prompt_tokens: int) -> dict:
    """The model's variables for `variant`: the pretrained params plus its adapters."""
    check_variant(variant)
    rng_lora, rng_prompt = jax.random.split(rng)
    variables = {"params": params}
    if uses_lora(variant):
        variables["lora"] = lora_lib.init_lora(rng_lora, params, lora_spec)
    if uses_prompt(variant):
        variables["prompt"] = init_prompt(rng_prompt, params["shared"]["embedding"], prompt_tokens)
    return variables
