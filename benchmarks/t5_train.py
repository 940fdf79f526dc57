"""T5 prompt tuning + LoRA train step: JAX/Flax against PyTorch + PEFT, same random model and
batch, one run.

    python -m benchmarks.t5_train --batch 16 --source 64 --target 16

Both sides: the random T5 v1.1 of `benchmarks.t5_generate`, a 30-token soft prompt before the
source, LoRA r=4, alpha=4, dropout 0.05 on q and v of every attention (PEFT's targets), AdamW
(lr 1e-3, weight decay 1e-3) on the prompt and the adapters only, teacher-forced token
cross-entropy of a fixed batch of random ids. PyTorch: PEFT's LoRA model, the prompt
prepended to the input embeddings (what PEFT's prompt tuning does; PEFT cannot stack its prompt
tuning on a LoRA model), AMP when bf16 on CUDA. Timed after warm-up in alternating rounds;
medians of examples/s, and each side's FLOP/s (`roofline.t5_train_step_flops`) as a fraction of
a large GEMM's rate measured in the same run.
"""

from __future__ import annotations

import sys

import numpy as np

from benchmarks.common import (
    emit_measured,
    jax_step_runner,
    require_positive,
    torch_step_runner,
    train_step_comparison,
)
from benchmarks.roofline import t5_train_step_flops
from benchmarks.t5_generate import random_t5
from lora_jax.cli import ArgumentParser

PROMPT_TOKENS, RANK, ALPHA, DROPOUT, TARGETS = 30, 4, 4.0, 0.05, ("q", "v")
LR, WEIGHT_DECAY = 1e-3, 1e-3


def make_runners(batch: int, source: int, target: int, dtype: str = "float32"):
    """(jax run(n), torch run(n), our T5 config), both warmed up, same weights and batch."""
    import jax
    import jax.numpy as jnp
    import optax
    import peft
    import torch

    from lora_jax import lora as lora_lib
    from lora_jax.lora import DTYPES
    from lora_jax.trainer import make_train_step
    from t5_hybrid import adapters
    from t5_hybrid.train import make_loss_fn

    tm, cfg, model, variables = random_t5(lora_dropout=DROPOUT, dtype=DTYPES[dtype])
    rng = np.random.default_rng(0)
    ids = rng.integers(2, 32000, (batch, source))
    labels = rng.integers(2, 32000, (batch, target))

    spec = lora_lib.LoRASpec(r=RANK, alpha=ALPHA, dropout=DROPOUT, targets=TARGETS)
    variables = adapters.init_variables(jax.random.PRNGKey(0), variables["params"],
                                        "prompt_lora", spec, PROMPT_TOKENS)
    prompt_init = np.array(variables["prompt"]["embedding"])  # before the step donates it
    trainable, frozen = lora_lib.split(variables, lora_lib.trainable_mask(
        variables, adapters.trainable_patterns("prompt_lora")))
    tx = optax.adamw(LR, weight_decay=WEIGHT_DECAY)
    step = jax.jit(make_train_step(make_loss_fn(model), tx, jax.random.PRNGKey(1)),
                   donate_argnums=(0, 1))
    jbatch = {"input_ids": jnp.asarray(ids, jnp.int32), "attention_mask": jnp.ones(ids.shape,
                                                                                   jnp.int32),
              "labels": jnp.asarray(labels, jnp.int32), "label_mask": jnp.ones(labels.shape)}
    jax_run = jax_step_runner(step, trainable, tx.init(trainable), frozen, jbatch)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    pm = peft.get_peft_model(tm, peft.LoraConfig(
        task_type="SEQ_2_SEQ_LM", r=RANK, lora_alpha=ALPHA, lora_dropout=DROPOUT,
        target_modules=list(TARGETS))).to(device)
    pm.train()
    prompt = torch.nn.Parameter(torch.tensor(prompt_init, device=device))
    opt = torch.optim.AdamW([prompt, *(p for p in pm.parameters() if p.requires_grad)], lr=LR,
                            weight_decay=WEIGHT_DECAY)
    tids, tlabels = (torch.tensor(x, device=device) for x in (ids, labels))
    mask = torch.ones((batch, PROMPT_TOKENS + source), dtype=torch.long, device=device)
    amp = torch.autocast(device, dtype=torch.bfloat16, enabled=dtype == "bfloat16")
    embed = pm.get_input_embeddings()

    def one():
        opt.zero_grad()
        with amp:
            x = torch.cat([prompt.expand(batch, -1, -1).to(embed.weight.dtype), embed(tids)], 1)
            loss = pm(inputs_embeds=x, attention_mask=mask, labels=tlabels).loss
        loss.backward()
        opt.step()

    return jax_run, torch_step_runner(one), cfg


def measure(batch: int, source: int, target: int, steps: int, rounds: int,
            dtype: str = "float32", gemm_size: int = 2048) -> dict:
    """The benchmark's figures (see the module docstring) as a dict with one comparison;
    `gemm_size` is the side of the roofline's square matmul."""
    jax_run, torch_run, cfg = make_runners(batch, source, target, dtype)
    flops = t5_train_step_flops(batch, PROMPT_TOKENS + source, target, cfg.d_model,
                                cfg.num_heads * cfg.d_kv, cfg.d_ff, cfg.num_layers,
                                cfg.num_decoder_layers, cfg.vocab_size, RANK)
    row, gemm = train_step_comparison(
        f"T5 prompt + LoRA train step, batch {batch}, {PROMPT_TOKENS} + {source} -> {target} "
        "tokens", jax_run, torch_run, batch=batch, steps=steps, rounds=rounds, dtype=dtype,
        step_flops=flops, gemm_size=gemm_size)
    return {"benchmark": "t5_train_step", "batch": batch, "source_tokens": source,
            "target_tokens": target, "prompt_tokens": PROMPT_TOKENS, "steps": steps,
            "rounds": rounds, "dtype": dtype, "comparisons": [row], **gemm}


def main() -> int:
    p = ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--source", type=int, default=64, help="source tokens (after the prompt)")
    p.add_argument("--target", type=int, default=16, help="target tokens")
    p.add_argument("--steps", type=int, default=10, help="steps per timed round")
    p.add_argument("--rounds", type=int, default=3, help="alternating JAX/PyTorch rounds")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--out", default="")
    a = p.parse_args()
    require_positive(a, "batch", "source", "target", "steps", "rounds")
    emit_measured(measure(a.batch, a.source, a.target, a.steps, a.rounds, a.dtype), a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
