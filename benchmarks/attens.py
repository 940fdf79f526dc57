"""AttEns speed: stacked k-adapter features, and the whole combiner run against the authors'
structure, on one random module set, in one run.

    python -m benchmarks.attens --k 6 --train 512 --validation 256 --epochs 20

The module set: k random LoRA modules (r=4, alpha=32 on query/key/value, B drawn from
N(0, 0.02^2) so that every module differs from the base) on the given encoder, written as
`ensemble.train_modules` writes one. The target: the embedded synthetic sentiment task
(`lora_jax.synthetic`), so the benchmark needs no data folder.

  features    our stacked pass (one jitted vmap over the k adapters and the all-zero base slot,
              `ensemble.features.make_feature_fn`, compiled as the library does with
              `jit_feature_fn`) against k + 1 sequential single-adapter
              passes, two peers: PyTorch + PEFT (`set_adapter` per module, then the base with
              adapters disabled; no gradient: the authors' way) and our own jitted encoder with
              one adapter at a time; same batch of random ids, masked-mean pooling; all three
              checked equal (1e-4). Alternating rounds after warm-up; medians; FLOP/s
              (k + 1 times `roofline.encoder_forward_flops`) as a fraction of a large GEMM's
              rate measured in the same run.
  end_to_end  our pipeline as a user runs it (`ensemble.train.train_attens`: tokenize, every
              row's features once, then `--epochs` combiner epochs on them, selecting on the
              held-out slice of train, checkpoints, results) against the authors' structure in
              PyTorch + PEFT: per step, k + 1 encoder passes (each PEFT adapter, then the base
              with adapters disabled; no gradient) and the combiner
              (`torch.nn.MultiheadAttention`, batch_first) for every batch of every epoch,
              rows padded to max_length as their tokenizer call does (their token mean counts
              padding, ../shared/DESIGN.md), the selection slice evaluated every epoch, the
              best epoch's combiner evaluated on validation. Ours twice, with a compilation
              cache of its own that starts empty: a first run (every program compiled and
              written to it) and a later run (the programs loaded from it, the features
              computed again), which must reach the first run's metrics. Same rows
              (`lora_jax.data.load_examples`), same adapters (exported with
              `lora_jax.peft_io.export_peft`, features checked equal), same batch sizes, same
              optimiser (AdamW, constant lr 1e-3, no weight decay, no clipping), same seed:
              the torch combiner starts from our run's initial weights (checked to give our
              logits, 1e-4) and sees our run's batches in our order (`train_order`); only the
              dropout masks differ. Wall time of each run (ours first, JAX compilation
              included), and both validation accuracies (the masked token mean on both sides,
              so padding changes only their cost) with a paired comparison of the two
              combiners' validation predictions (our best combiner restored from its
              checkpoint, `ensemble.inference.attens_run`): the rows each gets right alone and
              McNemar's exact test, p >= 0.05 reading as equal accuracy. No roofline: the two
              sides do different amounts of encoder work (that is the point), so a FLOP rate
              would not compare them.
"""

from __future__ import annotations

import copy
import os
import sys
import tempfile
import time

import numpy as np

from benchmarks.common import alternating_rounds, comparison, emit_measured, require_positive
from benchmarks.roofline import best_gemm_rate, encoder_forward_flops, gemm_fields, gemm_rates
from lora_jax.cli import ArgumentParser, fail
from lora_jax.compilation_cache import cache_at

RANK, ALPHA, TARGETS, B_STD = 4, 32.0, ("query", "key", "value"), 0.02
TASK, BATCH, EVAL_BATCH, LR = "synth_sentiment", 32, 64, 1e-3


def random_module_set(model_dir: str, out_dir: str, k: int, max_length: int) -> list[str]:
    """Write k random modules of `model_dir` as a module set in `out_dir`; returns their names."""
    import jax

    from ensemble.modules import write_module, write_moduleset_index
    from lora_jax import lora as lora_lib
    from lora_jax.models.hf_import import load_pretrained

    pretrained = load_pretrained(model_dir)
    spec = lora_lib.LoRASpec(r=RANK, alpha=ALPHA, dropout=0.1, targets=TARGETS)
    d = pretrained.config.hidden_size
    names, metas = [], []
    for i in range(k):
        key_lora, key_b = jax.random.split(jax.random.PRNGKey(i))
        lora = lora_lib.init_lora(key_lora, pretrained.encoder, spec)
        leaves, tree = jax.tree_util.tree_flatten_with_path(lora)
        keys = jax.random.split(key_b, len(leaves))
        lora = jax.tree_util.tree_unflatten(tree, [
            B_STD * jax.random.normal(kk, x.shape) if getattr(p[-1], "key", None) == "B" else x
            for (p, x), kk in zip(leaves, keys, strict=True)])
        name = f"random_{i}"
        meta = {"task": name, "num_labels": 2, "main_metric": "", "metrics": {},
                "model": model_dir, "pooling": "mean", "head": "linear",
                "max_length": max_length, "lora": {"r": RANK, "alpha": ALPHA, "dropout": 0.1,
                                                   "targets": list(TARGETS)}, "seed": i}
        head = {"kernel": np.zeros((d, 2), np.float32), "bias": np.zeros(2, np.float32)}
        metas.append(write_module(os.path.join(out_dir, name),
                                  {"lora": jax.device_get(lora), "head": head}, meta))
        names.append(name)
    write_moduleset_index(out_dir, metas)
    return names


def attens_config(model_dir: str, data_dir: str, module_dir: str, modules: list[str],
                  n_train: int, n_validation: int, epochs: int, max_length: int, cache: str):
    """The AttEns config of the end-to-end comparison (`configs/attens_minilm_cpu.py` with the
    benchmark's model, data, module set and sizes)."""
    from lora_jax.experiments import load_config

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _, c = load_config(os.path.join(root, "configs", "attens_minilm_cpu.py"))
    c.model, c.data_dir, c.module_dir, c.modules = model_dir, data_dir, module_dir, tuple(modules)
    c.task, c.feature_cache, c.progress = TASK, cache, False
    c.num_epochs, c.max_length, c.selection_size = epochs, max_length, 0.1
    c.max_train_examples, c.max_eval_examples = n_train, n_validation
    c.batch_size, c.eval_batch_size, c.feature_batch_size = BATCH, EVAL_BATCH, EVAL_BATCH
    # the optimiser both sides use: AdamW at a constant rate, no weight decay, no clipping
    c.optimizer.update(learning_rate=LR, schedule="constant", warmup_ratio=0.0, warmup_steps=0,
                       weight_decay=0.0, grad_clip=0.0)
    return c


def measure_features(model_dir: str, adapter_dirs: list[str], config, batch: int, length: int,
                     rounds: int, gemm_size: int = 2048) -> dict:
    """Stacked k-adapter features against k + 1 sequential single-adapter passes, of our own
    jitted encoder and of PyTorch + PEFT (`adapter_dirs`: the modules exported by
    `export_adapters`)."""
    import jax
    import jax.numpy as jnp
    import torch

    from ensemble.features import aggregate_tokens, build_feature_extractor, jit_feature_fn
    from lora_jax.models import Encoder

    fx = build_feature_extractor(config)
    encoder = Encoder(load_cfg(model_dir), lora_dropout=0.1)
    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(1000, fx.tokenizer.vocab_size, (batch, length)), jnp.int32)
    b = {"input_ids": ids, "attention_mask": jnp.ones_like(ids), "token_type_ids": ids * 0}
    stacked = jit_feature_fn(fx.feature_fn)

    @jax.jit
    def single(lora, batch):
        hidden, _ = encoder.apply({"params": fx.base_params, "lora": lora}, batch["input_ids"],
                                  batch["attention_mask"], batch["token_type_ids"])
        return aggregate_tokens(hidden, batch["attention_mask"], "mean")

    slots = [jax.tree_util.tree_map(lambda x, i=i: x[i], fx.stacked) for i in range(fx.k + 1)]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    pm, torch_encoder, names = load_peft_modules(model_dir, adapter_dirs)
    pm.to(device)
    torch_ids = torch.tensor(np.asarray(ids), device=device)
    torch_mask = torch.ones_like(torch_ids)

    def peft_passes():
        features = torch_features(torch_encoder, names, pm, torch_ids, torch_mask)
        return tuple(f.cpu() for f in features)  # waits for the GPU's work

    runs = {"stacked": lambda: jax.block_until_ready(stacked(fx.base_params, fx.stacked,
                                                             fx.heads, b)),
            "sequential": lambda: jax.block_until_ready([single(s, b) for s in slots]),
            "peft": peft_passes}
    modules, base = runs["stacked"]()
    one_by_one = runs["sequential"]()
    np.testing.assert_allclose(np.asarray(modules), np.stack(one_by_one[:-1], 1), atol=1e-4)
    np.testing.assert_allclose(np.asarray(base), np.asarray(one_by_one[-1]), atol=1e-4)
    peft_modules, peft_base = runs["peft"]()
    np.testing.assert_allclose(np.asarray(modules), peft_modules.numpy(), atol=1e-4)
    np.testing.assert_allclose(np.asarray(base), peft_base.numpy(), atol=1e-4)
    gemm = [gemm_rates(size=gemm_size)]
    seconds = alternating_rounds(runs, rounds)
    gemm.append(gemm_rates(size=gemm_size))
    cfg = load_cfg(model_dir)
    flops = (fx.k + 1) * encoder_forward_flops(batch, length, cfg.hidden_size,
                                               cfg.intermediate_size, cfg.num_layers)
    what = f"stacked features, k = {fx.k} modules + base, batch {batch}, length {length}"
    rows = [comparison(f"{what}, against {peer}", "examples/s", batch, seconds["stacked"],
                       seconds[side], ours_label="one stacked pass (vmap)",
                       peer_label=f"{fx.k + 1} sequential single-adapter passes, {peer}",
                       flops=flops, gemm_flops_per_s=best_gemm_rate(gemm))
            for side, peer in (("peft", "PyTorch + PEFT"), ("sequential", "our encoder"))]
    return {"benchmark": "attens_features", "k": fx.k, "batch": batch, "length": length,
            "rounds": rounds, "comparisons": rows, **gemm_fields(gemm)}


def load_cfg(model_dir: str):
    from lora_jax.models.hf_import import load_hf_config

    return load_hf_config(model_dir)[0]


def load_peft_modules(model_dir: str, adapter_dirs: list[str]):
    """(PeftModel in eval mode with every adapter loaded as m0, m1, ..., the encoder inside it
    with LoRA layers injected, the adapter names), for `torch_features`."""
    import peft
    import transformers

    model = transformers.AutoModelForSequenceClassification.from_pretrained(model_dir,
                                                                            num_labels=2)
    names = [f"m{i}" for i in range(len(adapter_dirs))]
    pm = peft.PeftModel.from_pretrained(model, adapter_dirs[0], adapter_name=names[0])
    for name, path in zip(names[1:], adapter_dirs[1:], strict=True):
        pm.load_adapter(path, adapter_name=name)
    pm.eval()
    return pm, pm.get_base_model().base_model, names


def torch_features(encoder, adapters: list[str], peft_model, ids, mask):
    """(modules (B, k, d), base (B, d)): masked token means of each adapter's and the base's
    last hidden states, the authors' way (one full encoder pass each)."""
    import torch

    def pooled():
        hidden = encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        m = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * m).sum(1) / m.sum(1).clamp(min=1)

    with torch.no_grad():
        modules = []
        for name in adapters:
            peft_model.set_adapter(name)
            modules.append(pooled())
        with peft_model.disable_adapter():
            base = pooled()
    return torch.stack(modules, 1), base


def torch_combiner(d: int, num_classes: int, heads: int = 4, dropout: float = 0.1):
    """The combiner of ../shared/DESIGN.md in torch.nn (attention across the k modules), with
    flax's LayerNorm epsilon (1e-6) so that it computes what ours does; its weights come from
    `load_flax_combiner`."""
    from torch import nn

    class Combiner(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln_modules, self.ln_attention, self.ln_base, self.ln_out = (
                nn.LayerNorm(d, eps=1e-6) for _ in range(4))
            self.attention = nn.MultiheadAttention(d, heads, dropout=dropout, batch_first=True)
            self.ffn, self.drop, self.classifier = (nn.Linear(d, d), nn.Dropout(dropout),
                                                    nn.Linear(d, num_classes))

        def forward(self, modules, base):
            m = self.ln_modules(modules)
            h, _ = self.attention(m, m, m, need_weights=False)
            a = self.ln_attention(h.mean(1))
            f = self.ffn(self.ln_base(base))
            return self.classifier(self.drop(self.ln_out(a + f)))

    return Combiner()


def load_flax_combiner(combiner, variables) -> None:
    """Copy our `AttEnsCombiner` variables into the `torch_combiner` in place (kernels
    transposed; the fused q/k/v ``in_proj`` already has torch's [q; k; v] row order)."""
    import jax
    import torch

    params = jax.device_get(variables["params"])

    def copy(weight, bias, tree, weight_name="kernel"):
        w = np.asarray(tree[weight_name])
        weight.copy_(torch.tensor(w.T if weight_name == "kernel" else w))
        bias.copy_(torch.tensor(np.asarray(tree["bias"])))

    with torch.no_grad():
        for name in ("ln_modules", "ln_attention", "ln_base", "ln_out"):
            module = getattr(combiner, name)
            copy(module.weight, module.bias, params[name], "scale")
        for name in ("ffn", "classifier"):
            module = getattr(combiner, name)
            copy(module.weight, module.bias, params[name])
        mha, attention = combiner.attention, params["attention"]
        copy(mha.in_proj_weight, mha.in_proj_bias, attention["in_proj"])
        copy(mha.out_proj.weight, mha.out_proj.bias, attention["out_proj"])


def initial_combiner(config, k: int, d: int) -> dict:
    """Our run's initial combiner variables (`ensemble.train.init_combiner` with the run's
    seed and batch shapes)."""
    import jax.numpy as jnp

    from ensemble.combiner import build_combiner
    from ensemble.train import init_combiner
    from lora_jax.tasks import get_task

    combiner = build_combiner(config, get_task(TASK).num_labels, d)
    return init_combiner(combiner, config.seed, jnp.zeros((BATCH, k, d)), jnp.zeros((BATCH, d)))


def check_same_combiner(config, variables, torch_model, k: int, d: int) -> float:
    """Max |difference| of our combiner's and the torch one's logits (deterministic) on random
    inputs: the weight copy and the two definitions agree."""
    import torch

    from ensemble.combiner import build_combiner
    from lora_jax.tasks import get_task

    rng = np.random.default_rng(1)
    modules = rng.standard_normal((8, k, d)).astype(np.float32)
    base = rng.standard_normal((8, d)).astype(np.float32)
    ours = build_combiner(config, get_task(TASK).num_labels, d).apply(variables, modules, base)
    torch_model.eval()
    with torch.no_grad():
        theirs = torch_model(torch.tensor(modules), torch.tensor(base)).numpy()
    return float(np.abs(np.asarray(ours) - theirs).max())


def paired_accuracy(ours: np.ndarray, theirs: np.ndarray, labels: np.ndarray) -> dict:
    """Whether two classifiers' accuracies on the same rows differ: the rows each gets right
    alone and McNemar's exact test (two-sided binomial test on those discordant rows; p = 1
    when there are none)."""
    import scipy.stats

    ours_right, theirs_right = ours == labels, theirs == labels
    only_ours = int(np.sum(ours_right & ~theirs_right))
    only_theirs = int(np.sum(~ours_right & theirs_right))
    n = only_ours + only_theirs
    p = 1.0 if n == 0 else float(scipy.stats.binomtest(only_ours, n, 0.5).pvalue)
    return {"same_predictions": float(np.mean(ours == theirs)),
            "only_ours_right": only_ours, "only_theirs_right": only_theirs, "mcnemar_p": p}


def our_batches(config, model_dir: str, train, epochs: int) -> list[list[np.ndarray]]:
    """Per epoch, the index batches our run draws from the `train` examples
    (`lora_jax.data.train_order` of their token lengths, as the trainer calls it with one data
    shard)."""
    from lora_jax import data as data_lib

    lengths = data_lib.encode(train, data_lib.load_tokenizer(model_dir, config.tokenizer),
                              config.max_length).lengths
    return [data_lib.train_order(lengths, BATCH, config.seed, epoch, config.length_grouping)
            for epoch in range(epochs)]


def authors_structure(config, model_dir: str, adapter_dirs: list[str], initial: dict,
                      batches: list[list[np.ndarray]]) -> dict:
    """The authors' training structure in PyTorch + PEFT (see the module docstring) for
    len(batches) epochs, starting from our run's initial combiner `initial` and drawing our
    run's `batches` (`our_batches`); returns wall seconds, the best selection accuracy, the
    validation accuracy at that epoch and its predictions, and the logit difference of the two
    combiners at the start."""
    import torch
    import transformers

    from lora_jax import data as data_lib
    from lora_jax.tasks import get_task

    start = time.perf_counter()
    examples, _ = data_lib.load_examples(data_lib.DataSource.of(config), get_task(TASK),
                                         data_lib.SplitSizes.of(config), config.seed)
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)

    def tensors(ex):
        enc = tok([t[0] for t in ex.texts], padding="max_length", truncation=True,
                  max_length=config.max_length, return_tensors="pt")
        return enc["input_ids"], enc["attention_mask"], torch.tensor(np.asarray(ex.labels, np.int64))

    device = "cuda" if torch.cuda.is_available() else "cpu"
    splits = {name: tuple(t.to(device) for t in tensors(ex)) for name, ex in examples.items()}
    pm, encoder, names = load_peft_modules(model_dir, adapter_dirs)
    pm.to(device)
    d, k = encoder.config.hidden_size, len(adapter_dirs)
    combiner = torch_combiner(d, 2, config.combiner.num_heads, config.combiner.dropout)
    load_flax_combiner(combiner, initial)
    start_difference = check_same_combiner(config, initial, combiner, k, d)
    combiner.to(device)
    opt = torch.optim.AdamW(combiner.parameters(), lr=LR, weight_decay=0.0,
                            betas=(config.optimizer.b1, config.optimizer.b2),
                            eps=config.optimizer.eps)
    torch.manual_seed(config.seed)  # dropout

    def predictions(split):
        ids, mask, labels = splits[split]
        combiner.eval()
        preds = []
        for s in range(0, len(labels), EVAL_BATCH):
            modules, base = torch_features(encoder, names, pm, ids[s:s + EVAL_BATCH],
                                           mask[s:s + EVAL_BATCH])
            with torch.no_grad():
                preds.append(combiner(modules, base).argmax(-1))
        return torch.cat(preds).cpu().numpy()

    def accuracy(split):
        return float(np.mean(predictions(split) == splits[split][2].cpu().numpy()))

    ids, mask, labels = splits["train"]
    best, best_state = -1.0, None
    for epoch_batches in batches:
        combiner.train()
        for rows in epoch_batches:
            idx = torch.tensor(rows, device=device)
            modules, base = torch_features(encoder, names, pm, ids[idx], mask[idx])
            loss = torch.nn.functional.cross_entropy(combiner(modules, base), labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        acc = accuracy("selection")
        if acc > best:
            best, best_state = acc, copy.deepcopy(combiner.state_dict())
    combiner.load_state_dict(best_state)
    validation = predictions("validation")  # on the host: the GPU has finished
    return {"seconds": time.perf_counter() - start, "selection_accuracy": best,
            "validation_accuracy": float(np.mean(validation == splits["validation"][2].cpu()
                                                 .numpy())),
            "validation_predictions": validation, "start_logit_difference": start_difference}


def export_adapters(model_dir: str, module_dir: str, names: list[str], out_dir: str) -> list[str]:
    """Each module's adapter as a PEFT folder (what the PyTorch side loads)."""
    from ensemble.modules import load_module_set
    from lora_jax.peft_io import export_peft

    mset = load_module_set(module_dir, tuple(names))
    paths = []
    for m in mset.modules:
        path = os.path.join(out_dir, m.task)
        export_peft(path, {"encoder": m.lora}, mset.spec, load_cfg(model_dir))
        paths.append(path)
    return paths


def check_same_features(config, model_dir: str, adapter_dirs: list[str], texts: list[str]):
    """Our stacked features and the PyTorch side's of the same rows agree (max |difference|)."""
    import transformers

    from ensemble.features import build_feature_extractor
    from lora_jax import data as data_lib
    from lora_jax.data import Examples

    fx = build_feature_extractor(config)
    ex = Examples([(t,) for t in texts], np.zeros(len(texts), np.int64))
    ours_modules, ours_base = fx.features(data_lib.encode(ex, fx.tokenizer, config.max_length),
                                          len(texts))
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    enc = tok(texts, padding=True, truncation=True, max_length=config.max_length,
              return_tensors="pt")
    pm, encoder, names = load_peft_modules(model_dir, adapter_dirs)
    modules, base = torch_features(encoder, names, pm, enc["input_ids"], enc["attention_mask"])
    return max(float(np.abs(ours_modules - modules.numpy()).max()),
               float(np.abs(ours_base - base.numpy()).max()))


def measure_end_to_end(model_dir: str, data_dir: str, module_dir: str, names: list[str],
                       adapter_dirs: list[str], n_train: int, n_validation: int, epochs: int,
                       max_length: int, scratch: str, combiner_dropout: float | None = None
                       ) -> dict:
    """Our whole AttEns run against the authors' structure (see the module docstring);
    `adapter_dirs`: the modules `names` of `module_dir` as PEFT folders (`export_adapters`);
    `combiner_dropout` replaces the config's (0: both sides train the same combiner)."""
    import logging

    from ensemble.inference import attens_run
    from ensemble.train import train_attens
    from lora_jax import data as data_lib
    from lora_jax.tasks import get_task

    logging.getLogger("lora_jax").setLevel(logging.WARNING)
    config = attens_config(model_dir, data_dir, module_dir, names, n_train, n_validation,
                           epochs, max_length, os.path.join(scratch, "cache"))
    if combiner_dropout is not None:
        config.combiner.dropout = combiner_dropout
    difference = check_same_features(config, model_dir, adapter_dirs,
                                     ["the plot was not good", "a film was clever and warm"])
    if difference > 1e-3:
        raise RuntimeError(f"the PyTorch side's features differ from ours by {difference}")
    ours_s, runs = [], []
    # a compilation cache of its own, empty: the first run compiles every program (and writes
    # it), the repeat, with a feature cache of its own, loads them (lora_jax/compilation_cache)
    with cache_at(os.path.join(scratch, "compilation_cache")):
        for name in ("run", "repeat"):
            run_config = copy.deepcopy(config)
            run_config.feature_cache = os.path.join(scratch, f"features_{name}")
            t0 = time.perf_counter()
            runs.append(train_attens(run_config, os.path.join(scratch, name)))
            ours_s.append(time.perf_counter() - t0)
    ours, repeat = runs
    if repeat["metrics"] != ours["metrics"] or repeat["best_step"] != ours["best_step"]:
        raise RuntimeError("the repeat run, with programs from the compilation cache, does not "
                           f"give the first run's metrics ({repeat['metrics']} against "
                           f"{ours['metrics']})")
    # the rows both sides read
    examples = data_lib.load_examples(data_lib.DataSource.of(config), get_task(TASK),
                                      data_lib.SplitSizes.of(config), config.seed)[0]
    initial = initial_combiner(config, len(names), load_cfg(model_dir).hidden_size)
    theirs = authors_structure(config, model_dir, adapter_dirs, initial,
                               our_batches(config, model_dir, examples["train"], epochs))
    if theirs["start_logit_difference"] > 1e-4:
        raise RuntimeError("the PyTorch combiner does not compute ours at the start (logits "
                           f"differ by {theirs['start_logit_difference']})")
    validation = examples["validation"]
    ours_predictions = attens_run(os.path.join(scratch, "run"), ours).logits(
        validation.texts).argmax(-1)
    ours_accuracy = ours["metrics"]["validation"]["accuracy"]
    if not np.isclose(np.mean(ours_predictions == validation.labels), ours_accuracy):
        raise RuntimeError("the restored best combiner does not reproduce the run's validation "
                           "accuracy")
    what = f"AttEns end to end, k = {len(names)}, {n_train} train rows, {epochs} epochs"
    rows = [comparison(f"{what}, {when}", "runs/hour", 3600.0, [seconds], [theirs["seconds"]],
                       ours_label="features once, combiner on the cache (train_attens)",
                       peer_label="authors' structure, PyTorch + PEFT")
            for when, seconds in (("first run (every program compiled)", ours_s[0]),
                                  ("a later run (compiled programs from the persistent cache, "
                                   "features computed again)", ours_s[1]))]
    return {"benchmark": "attens_end_to_end", "k": len(names), "train_rows": n_train,
            "validation_rows": n_validation, "epochs": epochs, "max_length": max_length,
            "combiner_dropout": config.combiner.dropout,
            "seconds": {"ours": ours_s[0], "ours_repeat": ours_s[1],
                        "authors_structure": theirs["seconds"]},
            "validation_accuracy": {"ours": ours_accuracy,
                                    "authors_structure": theirs["validation_accuracy"]},
            "validation_paired": paired_accuracy(ours_predictions,
                                                 theirs["validation_predictions"],
                                                 np.asarray(validation.labels)),
            "start_logit_difference": theirs["start_logit_difference"],
            "selection_accuracy": {"ours": ours["selection_metrics"]["accuracy"],
                                   "authors_structure": theirs["selection_accuracy"]},
            "max_feature_difference": difference, "comparisons": rows}


def measure(model_dir: str, k: int, n_train: int, n_validation: int, epochs: int,
            max_length: int, feature_batch: int, feature_length: int, rounds: int,
            gemm_size: int = 2048, combiner_dropout: float | None = None) -> list[dict]:
    """[features benchmark, end-to-end benchmark] on one random module set (`gemm_size`: the
    side of the roofline's square matmul; `combiner_dropout`: see `measure_end_to_end`)."""
    from lora_jax.synthetic import make_sentiment_task

    with tempfile.TemporaryDirectory() as scratch:
        data_dir = os.path.join(scratch, "data")
        make_sentiment_task(data_dir, n_train=int(n_train / 0.9) + 1, n_validation=n_validation)
        module_dir = os.path.join(scratch, "modules")
        names = random_module_set(model_dir, module_dir, k, max_length)
        adapter_dirs = export_adapters(model_dir, module_dir, names,
                                       os.path.join(scratch, "peft"))
        config = attens_config(model_dir, data_dir, module_dir, names, n_train, n_validation,
                               epochs, max_length, os.path.join(scratch, "unused_cache"))
        features = measure_features(model_dir, adapter_dirs, config, feature_batch,
                                    feature_length, rounds, gemm_size)
        end_to_end = measure_end_to_end(model_dir, data_dir, module_dir, names, adapter_dirs,
                                        n_train, n_validation, epochs, max_length, scratch,
                                        combiner_dropout)
    return [features, end_to_end]


def main() -> int:
    p = ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="../shared/models/paraphrase-MiniLM-L3-v2")
    p.add_argument("--k", type=int, default=6, help="modules")
    p.add_argument("--train", type=int, default=512, help="combiner training rows")
    p.add_argument("--validation", type=int, default=256, help="validation rows")
    p.add_argument("--epochs", type=int, default=20, help="combiner epochs")
    p.add_argument("--max-length", type=int, default=64, help="tokens")
    p.add_argument("--feature-batch", type=int, default=32)
    p.add_argument("--feature-length", type=int, default=128)
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds (features)")
    p.add_argument("--combiner-dropout", type=float, default=None,
                   help="the combiner's dropout on both sides (default: the config's, 0.1); "
                        "0 makes the two sides train the same combiner")
    p.add_argument("--out", default="")
    a = p.parse_args()
    if a.combiner_dropout is not None and not 0 <= a.combiner_dropout < 1:
        fail(f"--combiner-dropout must be in [0, 1), got {a.combiner_dropout}")
    if not os.path.isdir(a.model):
        fail(f"model folder {a.model!r} does not exist; pass --model")
    require_positive(a, "k", "train", "validation", "epochs", "max_length", "feature_batch",
                     "feature_length", "rounds")
    features, end_to_end = measure(a.model, a.k, a.train, a.validation, a.epochs, a.max_length,
                                   a.feature_batch, a.feature_length, a.rounds,
                                   combiner_dropout=a.combiner_dropout)
    emit_measured({"benchmarks": {"attens_features": features, "attens_end_to_end": end_to_end}},
                  a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
