"""Per-row adapter routing speed: one batch whose rows name n different adapters.

    python -m benchmarks.routing --adapters 1,4,16 --batch 32 --length 128

n random classifier adapters of the encoder (LoRA r=4, alpha=32 on query/key/value, B drawn
from N(0, 0.02^2); each with its own random transformers head), exported as PEFT SEQ_CLS
folders (`lora_jax.peft_io.export_peft`) so that both sides run the same weights. Row b of the
batch takes adapter b mod n. Per n, three sides on the same batch of random ids, alternating
rounds after warm-up, medians:

  routed    ours: `lora_jax.adapter_bank.AdapterBank` (every adapted layer gathers A/B per row,
            one jitted program, each row's own head);
  peft      PyTorch + PEFT's mixed batch, ``model(..., adapter_names=[...])`` (one sub-batch
            per distinct adapter in every LoRA layer and head);
  single    ours with ONE adapter for the whole batch (`SequenceClassifier`, jitted): what
            routing costs over a batch that needs none;
  peft_single  PEFT with one adapter for the whole batch: what PEFT's mixed batch costs it
            (the row "PEFT's mixed batch against PEFT's one-adapter batch"; both sides PEFT).

The routed logits are checked against PEFT's (1e-4) before timing. FLOP/s: the encoder's
forward (`roofline.encoder_forward_flops`; ours computes the last layer at [CLS] alone, which
the heads read, PEFT every row) over a large GEMM's rate measured in the same run.
"""

from __future__ import annotations

import os
import sys
import tempfile

import numpy as np

from benchmarks.common import alternating_rounds, comparison, emit_measured, require_positive
from benchmarks.roofline import best_gemm_rate, encoder_forward_flops, gemm_fields, gemm_rates
from lora_jax.cli import ArgumentParser

RANK, ALPHA, TARGETS, B_STD, HEAD_STD, LABELS = 4, 32.0, ("query", "key", "value"), 0.02, 0.2, 2


def random_adapters(encoder_params: dict, config, n: int, max_length: int):
    """n `NamedAdapter`s with random LoRA trees and transformers heads (BERT's ``classifier``)."""
    import jax

    from lora_jax import lora as lora_lib
    from lora_jax.adapter_bank import NamedAdapter
    from lora_jax.tasks import custom_task

    spec = lora_lib.LoRASpec(r=RANK, alpha=ALPHA, dropout=0.0, targets=TARGETS)
    task = custom_task({"name": "random", "text_keys": ["text"], "num_labels": LABELS})
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        key_lora, key_b = jax.random.split(jax.random.PRNGKey(i))
        tree = lora_lib.init_lora(key_lora, encoder_params, spec)
        leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
        keys = jax.random.split(key_b, len(leaves))
        tree = jax.tree_util.tree_unflatten(treedef, [
            B_STD * jax.random.normal(kk, x.shape) if getattr(p[-1], "key", None) == "B" else x
            for (p, x), kk in zip(leaves, keys, strict=True)])
        head = {"classifier": {
            "kernel": rng.normal(0, HEAD_STD, (config.hidden_size, LABELS)).astype(np.float32),
            "bias": rng.normal(0, HEAD_STD, (LABELS,)).astype(np.float32)}}
        out.append(NamedAdapter(f"a{i}", task, jax.device_get(tree), head, "hf", "head",
                                max_length, "random"))
    return out, spec


def measure(model_dir: str, ns: tuple[int, ...], batch: int, length: int, rounds: int,
            gemm_size: int = 2048) -> dict:
    """The three sides for every n in `ns` (see the module docstring)."""
    import jax
    import jax.numpy as jnp
    import peft
    import torch
    import transformers

    from lora_jax.adapter_bank import AdapterBank
    from lora_jax.models import Encoder, SequenceClassifier
    from lora_jax.models.hf_import import load_pretrained
    from lora_jax.peft_io import export_peft

    pre = load_pretrained(model_dir)
    cfg = pre.config
    if cfg.model_type != "bert":
        raise SystemExit(f"error: the routing benchmark uses BERT's head; {model_dir} is "
                         f"{cfg.model_type}")
    torch.manual_seed(0)
    base = transformers.AutoModelForSequenceClassification.from_pretrained(model_dir,
                                                                           num_labels=LABELS)
    # the checkpoint may lack the pooler (transformers then draws one): both sides use torch's
    pooler = base.bert.pooler.dense
    encoder_params = {**pre.encoder, "pooler": {
        "kernel": pooler.weight.detach().numpy().T.copy(),
        "bias": pooler.bias.detach().numpy().copy()}}
    adapters, spec = random_adapters(encoder_params, cfg, max(ns), length)
    rng = np.random.default_rng(1)
    ids = rng.integers(1000, cfg.vocab_size, (batch, length)).astype(np.int32)
    mask = np.ones_like(ids)
    with tempfile.TemporaryDirectory() as tmp:
        dirs = []
        for a in adapters:
            path = os.path.join(tmp, a.name)
            export_peft(path, {"encoder": a.lora}, spec, cfg, head=a.head)
            dirs.append(path)
        pm = peft.PeftModel.from_pretrained(base, dirs[0], adapter_name=adapters[0].name)
        for a, path in zip(adapters[1:], dirs[1:], strict=True):
            pm.load_adapter(path, adapter_name=a.name)
    device = "cuda" if torch.cuda.is_available() else "cpu"  # each side on its default device
    pm.eval().to(device)
    torch_ids = torch.tensor(ids, dtype=torch.long, device=device)
    torch_mask = torch.tensor(mask, device=device)
    single_model = SequenceClassifier(cfg, LABELS, head="hf")
    single = jax.jit(lambda v, b: single_model.apply(v, b["input_ids"], b["attention_mask"],
                                                     b["token_type_ids"]))
    encoder = Encoder(cfg)
    gemm = [gemm_rates(size=gemm_size)]
    rows, checks = [], {}
    # the heads read [CLS] alone: our last layer computes that row only, PEFT's every row
    dims = (batch, length, cfg.hidden_size, cfg.intermediate_size, cfg.num_layers)
    flops = encoder_forward_flops(*dims, last_layer_rows=1)
    peft_flops = encoder_forward_flops(*dims)

    def peft_one_adapter():
        pm.set_adapter(adapters[0].name)
        with torch.no_grad():
            return pm(input_ids=torch_ids, attention_mask=torch_mask).logits.cpu().numpy()

    for n in ns:
        index = np.arange(batch, dtype=np.int32) % n
        names = [adapters[i].name for i in index]
        b = {"input_ids": jnp.asarray(ids), "attention_mask": jnp.asarray(mask),
             "token_type_ids": jnp.zeros_like(jnp.asarray(ids)),
             "adapter_index": jnp.asarray(index)}
        routed = AdapterBank.of(adapters[:n]).logits_fn(encoder)
        one = {"params": {"encoder": encoder_params, "head": adapters[0].head},
               "lora": {"encoder": adapters[0].lora}}

        def peft_mixed(names=names):
            with torch.no_grad():
                return pm(input_ids=torch_ids, attention_mask=torch_mask,
                          adapter_names=names).logits.cpu().numpy()

        runs = {"routed": lambda r=routed, b=b: jax.block_until_ready(r(encoder_params, b)),
                "peft": peft_mixed,
                "single": lambda b=b, one=one: jax.block_until_ready(single(one, b)),
                "peft_single": peft_one_adapter}
        ours = np.asarray(runs["routed"]())
        theirs = runs["peft"]()
        np.testing.assert_allclose(ours, theirs, atol=1e-4)
        checks[n] = float(np.abs(ours - theirs).max())
        runs["single"]()
        seconds = alternating_rounds(runs, rounds)
        rows.append((f"{n} adapter{'s' if n > 1 else ''} in one batch of {batch} x {length}",
                     seconds))
    gemm.append(gemm_rates(size=gemm_size))
    rate = best_gemm_rate(gemm)
    comparisons = []
    for what, seconds in rows:
        comparisons.append(comparison(
            f"routed, {what}, against PyTorch + PEFT adapter_names", "examples/s", batch,
            seconds["routed"], seconds["peft"], ours_label="routed (per-row gathered LoRA)",
            peer_label="PEFT mixed batch (adapter_names)", flops=flops, peer_flops=peft_flops,
            gemm_flops_per_s=rate))
        comparisons.append(comparison(
            f"PEFT's mixed batch, {what}, against PEFT's one-adapter batch", "examples/s",
            batch, seconds["peft"], seconds["peft_single"],
            ours_label="PEFT mixed batch (adapter_names)",
            peer_label="PEFT, one adapter for every row", flops=peft_flops,
            gemm_flops_per_s=rate))
        comparisons.append(comparison(
            f"routed, {what}, against our one-adapter batch", "examples/s", batch,
            seconds["routed"], seconds["single"], ours_label="routed",
            peer_label="ours, one adapter for every row", flops=flops,
            gemm_flops_per_s=rate))
    return {"benchmark": "routing", "adapters": list(ns), "batch": batch, "length": length,
            "rounds": rounds, "max_logit_difference_vs_peft": checks,
            "comparisons": comparisons, **gemm_fields(gemm)}


def main() -> int:
    p = ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="../shared/models/paraphrase-MiniLM-L3-v2")
    p.add_argument("--adapters", default="1,4,16", help="comma list of n")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--length", type=int, default=128)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--out", default="", help="also write the JSON here")
    a = p.parse_args()
    require_positive(a, "batch", "length", "rounds")
    ns = tuple(int(x) for x in a.adapters.split(",") if x)
    if not ns or min(ns) < 1:
        p.error(f"--adapters {a.adapters!r} must list positive counts")
    emit_measured(measure(a.model, ns, a.batch, a.length, a.rounds), a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
