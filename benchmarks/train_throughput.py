"""Training throughput, JAX/Flax LoRA vs PyTorch + PEFT, same model, batch and length, one run.

    python -m benchmarks.train_throughput --batch 32 --length 64   # --out FILE: also write it

Both sides: LoRA r=4, alpha=32, dropout 0.1 on query/key/value, a head over [CLS] trained
(ours linear, PEFT's `BertForSequenceClassification` pooler + classifier), AdamW, dropout on, a
fixed batch of random token ids (no padding), fp32. Our encoder computes only [CLS] in its last
layer, the one row its head reads (`lora_jax.models.Encoder`'s ``cls_only``; same logits and
gradients, tests/test_peft_io.py); PyTorch computes every row. Timed after warm-up (JAX
compilation excluded) in alternating rounds; medians. Prints one JSON line: examples/s of each,
the ratio JAX / PyTorch, and the roofline: each side's FLOP/s (`roofline.lora_encoder_step_flops`,
each counting the rows it computes) as a fraction of the machine's large-GEMM rate measured in
the same run (`roofline.gemm_rates`: JAX and PyTorch, before and after the rounds, the best of
them).
"""

from __future__ import annotations

import os
import sys

import numpy as np

from benchmarks.common import (
    emit_measured,
    jax_step_runner,
    require_positive,
    torch_step_runner,
    train_step_comparison,
)
from benchmarks.roofline import lora_encoder_step_flops
from lora_jax.cli import ArgumentParser, fail

RANK, ADAPTED = 4, ("query", "key", "value")


def make_jax_runner(model_dir: str, batch: int, length: int, dtype: str):
    """(run(n_steps), encoder config) of a warmed-up jitted LoRA train step."""
    import jax
    import jax.numpy as jnp
    import optax

    from lora_jax import lora
    from lora_jax.classifier import make_loss_fn
    from lora_jax.lora import DTYPES
    from lora_jax.models import SequenceClassifier
    from lora_jax.models.hf_import import load_pretrained
    from lora_jax.trainer import make_train_step

    _, cfg, encoder, _, _ = load_pretrained(model_dir)
    model = SequenceClassifier(cfg, 2, pooling="cls", lora_dropout=0.1,
                               dtype=DTYPES[dtype])
    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(1000, cfg.vocab_size, (batch, length)), jnp.int32)
    ones = jnp.ones_like(ids)
    params = model.init(jax.random.PRNGKey(0), ids, ones, ids * 0)["params"]
    params["encoder"] = jax.tree_util.tree_map(jnp.asarray, {**params["encoder"], **encoder})
    variables = {"params": params, "lora": lora.init_lora(jax.random.PRNGKey(1), params,
                                                          lora.LoRASpec(r=RANK, alpha=32.0, targets=ADAPTED))}
    trainable, frozen = lora.split(variables, lora.trainable_mask(variables,
                                                                  ("^lora/", "^params/head/")))
    tx = optax.multi_transform({"trainable": optax.adamw(5e-4, weight_decay=0.01),
                                "frozen": optax.set_to_zero()}, lora.optimizer_labels)
    opt_state = tx.init(trainable)
    step = jax.jit(make_train_step(make_loss_fn(model, False), tx, jax.random.PRNGKey(2)),
                   donate_argnums=(0, 1))
    b = dict(input_ids=ids, attention_mask=ones, token_type_ids=ids * 0,
             labels=jnp.asarray(rng.integers(0, 2, batch)), weights=jnp.ones(batch))
    return jax_step_runner(step, trainable, opt_state, frozen, b), cfg


def make_torch_runner(model_dir: str, batch: int, length: int, dtype: str = "float32"):
    """run(n_steps) of a warmed-up PyTorch + PEFT train step: on CUDA when there is one, with
    bf16 autocast (AMP) when `dtype` is bfloat16."""
    import peft
    import torch
    import transformers

    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = transformers.BertForSequenceClassification.from_pretrained(model_dir, num_labels=2)
    model = peft.get_peft_model(model, peft.LoraConfig(
        task_type="SEQ_CLS", r=RANK, lora_alpha=32, lora_dropout=0.1,
        target_modules=list(ADAPTED))).to(device)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-4,
                            weight_decay=0.01)
    rng = np.random.default_rng(0)
    ids = torch.tensor(rng.integers(1000, model.config.vocab_size, (batch, length)),
                       device=device)
    labels = torch.tensor(rng.integers(0, 2, batch), device=device)
    amp = torch.autocast(device, dtype=torch.bfloat16, enabled=dtype == "bfloat16")

    def one():
        opt.zero_grad()
        with amp:
            loss = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels).loss
        loss.backward()
        opt.step()

    return torch_step_runner(one)


def measure(model: str, batch: int, length: int, steps: int, rounds: int,
            dtype: str = "float32", gemm_size: int = 2048) -> dict:
    """The benchmark's figures (see the module docstring) as a dict with one comparison;
    `gemm_size` is the side of the roofline's square matmul."""
    jax_run, cfg = make_jax_runner(model, batch, length, dtype)
    torch_run = make_torch_runner(model, batch, length, dtype)
    def flops(last_layer_rows):
        return lora_encoder_step_flops(batch, length, cfg.hidden_size, cfg.intermediate_size,
                                       cfg.num_layers, RANK, ADAPTED, last_layer_rows)

    # our classifier's last layer computes [CLS] alone (the head reads nothing else); PEFT's
    # computes every row: each side's FLOP rate counts the work it does
    row, gemm = train_step_comparison(
        f"LoRA train step, batch {batch}, length {length}", jax_run, torch_run, batch=batch,
        steps=steps, rounds=rounds, dtype=dtype, step_flops=flops(1), gemm_size=gemm_size,
        peer_step_flops=flops(None))
    return {"benchmark": "lora_train_step", "model": model, "batch": batch, "length": length,
            "steps": steps, "rounds": rounds, "dtype": dtype, "comparisons": [row], **gemm}


def main() -> int:
    p = ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="../shared/models/paraphrase-MiniLM-L3-v2")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--length", type=int, default=64)
    p.add_argument("--steps", type=int, default=30, help="steps per timed round")
    p.add_argument("--rounds", type=int, default=3, help="alternating JAX/PyTorch rounds")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--out", default="")
    a = p.parse_args()
    if not os.path.isdir(a.model):
        fail(f"model folder {a.model!r} does not exist; pass --model")
    require_positive(a, "batch", "length", "steps", "rounds")
    emit_measured(measure(a.model, a.batch, a.length, a.steps, a.rounds, a.dtype), a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
