"""Pooled outputs of k frozen LoRA modules and the frozen base, in ONE stacked pass.

The k adapters are stacked on a leading axis and a (k+1)-th all-zero adapter (B = 0, i.e.
exactly the base model) is appended; one `jax.vmap` over that axis runs every encoder pass in a
single jit-compiled program that shares the base weights. In eval mode the adapters of every
module whose input differs per slot are folded into per-slot kernels first (`fold_adapters`).
Per example it yields

  modules: (k, D)  Agg1 over tokens of the last hidden states (D = d, ``output="hidden"``), or of
                   each module's per-token task logits zero-padded to the widest head
                   (D = max C_i, ``output="logits"``);
  base:    (d,)    the base encoder's pooled output (masked mean, [CLS], or BERT pooler).

Because everything here is frozen, each example's features are computed once (eval mode) and
cached on disk (`FeatureStore`), keyed by the model's and the adapters' bytes, the tokenizer,
the settings and the example's text; seeds, k, held-out slices and overlapping samples reuse
them.

`build_feature_extractor(config)` loads a config's module set and base encoder into a
`FeatureExtractor` (what training and prediction both run); a split's features are a
`FeatureSplit`, whose batches `map_combiner` feeds to a combiner.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from ensemble.combiner import AGGREGATIONS, combiner_method
from ensemble.lorahub import require_cma
from ensemble.modules import ModuleSet, load_module_set
from lora_jax import data as data_lib
from lora_jax import host_malloc, xla_flags
from lora_jax import lora as lora_lib
from lora_jax.distributed import BatchShare, barrier, is_main_process, map_batches, map_encoded
from lora_jax.errors import UserError
from lora_jax.merge import merge_adapters, weighted_sum
from lora_jax.models import Encoder
from lora_jax.models.encoder import POOLINGS, pool
from lora_jax.models.hf_import import init_around, load_pretrained

AGG1 = ("mean", "max", "min", "sum")
OUTPUTS = ("hidden", "logits")


def aggregate_tokens(x: jax.Array, mask: jax.Array, how: str, count_padding: bool = False):
    """Agg1 over the token axis of (..., B, T, D) with mask (B, T); returns (..., B, D) float32.

    count_padding=True reproduces the reference code's plain mean over all T positions. A row
    whose mask is all zero aggregates to 0 with every `how`.
    """
    x = x.astype(jnp.float32)
    m = jnp.ones_like(mask) if count_padding else mask
    m = m.astype(bool)[..., None]
    if how == "mean":
        return jnp.sum(jnp.where(m, x, 0.0), -2) / jnp.maximum(m.sum(-2), 1)
    if how == "sum":
        return jnp.sum(jnp.where(m, x, 0.0), -2)
    if how in ("max", "min"):
        reduce, fill = (jnp.max, -jnp.inf) if how == "max" else (jnp.min, jnp.inf)
        # a row without a single token (the rows that fill a short batch) gives 0, not +-inf:
        # an infinity would turn the combiner's LayerNorm, and then every gradient, into NaN
        return jnp.where(m.any(-2), reduce(jnp.where(m, x, fill), -2), 0.0)
    raise ValueError(f"agg1 {how!r} is unknown; use one of {AGG1}")


def stack_trees(trees: list) -> dict:
    """Stack identically shaped pytrees on a new leading axis (k, ...). On the host: eager JAX
    ops would compile one program per leaf shape."""
    return jax.tree_util.tree_map(
        lambda *xs: jnp.asarray(np.stack([np.asarray(x) for x in xs])), *trees)


def with_base_slot(stacked_lora: dict) -> dict:
    """Append one all-zero adapter (k+1-th): with B = 0 it computes exactly the base model."""
    def append_zero(x):
        x = np.asarray(x)
        return jnp.asarray(np.concatenate([x, np.zeros_like(x[:1])], axis=0))

    return jax.tree_util.tree_map(append_zero, stacked_lora)


def stack_heads(heads: list[dict]) -> tuple[jax.Array, jax.Array]:
    """Head kernels (d, C_i) and biases (C_i,) zero-padded to (k, d, Cmax) and (k, Cmax)."""
    cmax = max(h["kernel"].shape[-1] for h in heads)
    pad = lambda x, c: jnp.pad(jnp.asarray(x, jnp.float32),
                               [(0, 0)] * (x.ndim - 1) + [(0, cmax - c)])
    kernels = jnp.stack([pad(h["kernel"], h["kernel"].shape[-1]) for h in heads])
    biases = jnp.stack([pad(h["bias"], h["bias"].shape[-1]) for h in heads])
    return kernels, biases


# The encoder modules that read the embeddings' output, the same array in every slot of the
# stacked pass: vmap leaves their frozen matmul unbatched (one GEMM for all k + 1 slots), so
# their adapters stay as x A B. Every other module reads a per-slot input.
SHARED_INPUT_MODULES = ("layer_0/attention/query", "layer_0/attention/key",
                        "layer_0/attention/value")


def fold_adapters(base_params: dict, stacked: dict,
                  shared_input: tuple[str, ...] = SHARED_INPUT_MODULES) -> tuple[dict, dict, dict]:
    """(params, params_axes, lora) for `jax.vmap(..., in_axes=(params_axes, 0))`: each adapter of
    `stacked` (leading axis k + 1) outside `shared_input` folded into its module's kernel, one
    kernel per slot (`lora.merge`: W + (alpha / r) A B), the others left in `lora`.

    A module whose input differs per slot runs a batched GEMM either way; folded, its
    x W + (x A) B becomes x W_i and the two thin matmuls (N = r, K = r) go. On 2 CPU cores
    (MiniLM-L3, k = 6 + base, batch 32 x 128, alternating rounds in one process) the pass gained
    2.6%: 28.2 against 27.5 examples/s. The features differ by float rounding (2e-7). Eval only:
    LoRA dropout acts on an adapter's input, which a folded kernel no longer has.
    """
    adapters = traverse_util.flatten_dict(stacked)
    folded = {path: leaf for path, leaf in adapters.items()
              if "/".join(path[:-1]) not in shared_input}
    kept = {path: leaf for path, leaf in adapters.items() if path not in folded}
    flat = traverse_util.flatten_dict(base_params)
    kernels = {(*module, "kernel"): flat[(*module, "kernel")]
               for module in {path[:-1] for path in folded}}
    per_slot = jax.vmap(lora_lib.merge, in_axes=(None, 0))(
        traverse_util.unflatten_dict(kernels), traverse_util.unflatten_dict(folded))
    axes = {path: None for path in flat}
    for path, kernel in traverse_util.flatten_dict(per_slot).items():
        flat[path], axes[path] = kernel, 0
    return (traverse_util.unflatten_dict(flat), traverse_util.unflatten_dict(axes),
            traverse_util.unflatten_dict(kept))


def make_feature_fn(encoder: Encoder, *, output: str = "hidden", agg1: str = "mean",
                    base_pooling: str = "mean", count_padding: bool = False) -> Callable:
    """features(base_params, stacked_lora_with_base, heads, batch, rng=None) -> (modules, base).

    stacked_lora_with_base: adapters with leading axis k+1, the last one all-zero
    (`with_base_slot`). heads: (kernels (k, d, Cmax), biases (k, Cmax)), used for logits.
    rng: None for eval mode; a PRNG key turns dropout on inside every encoder pass (the
    reference code's quirk; then features cannot be cached).
    Returns modules (B, k, D) and base (B, d), float32.
    """
    if output not in OUTPUTS:
        raise ValueError(f"output {output!r} is unknown; use one of {OUTPUTS}")

    def features(base_params, stacked, heads, batch, rng=None):
        ids, mask, types = batch["input_ids"], batch["attention_mask"], batch["token_type_ids"]
        k1 = jax.tree_util.tree_leaves(stacked)[0].shape[0]
        rngs = jax.random.split(rng, k1) if rng is not None else None

        def one(params, lora, key=None):
            kw = {"rngs": {"dropout": key}} if key is not None else {}
            return encoder.apply({"params": params, "lora": lora}, ids, mask, types,
                                 deterministic=key is None, **kw)

        if rngs is None:
            params, axes, unfolded = fold_adapters(base_params, stacked)
            hidden, pooled = jax.vmap(one, in_axes=(axes, 0))(params, unfolded)
        else:
            hidden, pooled = jax.vmap(one, in_axes=(None, 0, 0))(base_params, stacked, rngs)
        # hidden (k+1, B, T, d); pooled (k+1, B, d) or None
        base = pool(hidden[-1], None if pooled is None else pooled[-1], mask, base_pooling)
        per_module = hidden[:-1]
        if output == "logits":
            kernels, biases = heads
            per_module = jnp.einsum("kbtd,kdc->kbtc", per_module.astype(jnp.float32),
                                    kernels) + biases[:, None, None, :]
        modules = aggregate_tokens(per_module, mask, agg1, count_padding)  # (k, B, D)
        return jnp.swapaxes(modules, 0, 1), base

    return features


def fingerprint(tree) -> str:
    """sha256 over the bytes of every leaf (in tree order) of a pytree of arrays."""
    h = hashlib.sha256()
    for leaf in jax.tree_util.tree_leaves(tree):
        arr = np.ascontiguousarray(np.asarray(leaf))
        h.update(str(arr.shape).encode() + str(arr.dtype).encode() + arr.tobytes())
    return h.hexdigest()


def module_digests(modules) -> dict[str, str]:
    """{task: the first 16 hex digits of `fingerprint` over the module's adapter and head}:
    which trained modules a run combined (equal digests, bit-identical modules), recorded in
    every combination run's results so that runs on retrained modules are told apart."""
    return {m.task: fingerprint((m.lora, m.head))[:16] for m in modules}


def jit_feature_fn(feature_fn: Callable, out_sharding=None) -> Callable:
    """`feature_fn` (`make_feature_fn`) jitted with the stacked pass's own XLA:CPU options
    (`lora_jax.xla_flags.PROGRAM_OPTIONS`)."""
    return jax.jit(feature_fn, out_shardings=out_sharding,
                   compiler_options=xla_flags.compile_options("stacked_features"))


def compute_split_features(feature_fn: Callable, base_params, stacked, heads,
                           enc: data_lib.Encoded, *, batch_size: int, buckets, pad_id: int,
                           put: Callable = lambda b: b, desc: str = "features",
                           progress: bool = True, rows: np.ndarray | None = None,
                           share: BatchShare | None = None, out_sharding=None):
    """(modules (N, k, D), base (N, d)) float32 numpy for `rows` (default every example) of an
    encoded split, each process feeding its share of every batch (`lora_jax.distributed`).

    The pass's large temporary (k + 1 encoder passes per batch) is mapped and unmapped per
    batch instead of growing the kept heap (`lora_jax.host_malloc.large_blocks_mapped`)."""
    fn = jit_feature_fn(feature_fn, out_sharding)
    with host_malloc.large_blocks_mapped():
        return map_encoded(lambda batch: fn(base_params, stacked, heads, batch), enc,
                           batch_size, buckets, pad_id, put=put, rows=rows, share=share,
                           desc=desc, progress=progress)


def row_keys(texts: list[tuple[str, ...]]) -> np.ndarray:
    """One 24-hex-digit content key per example (its text fields)."""
    return np.array([hashlib.sha256("\x1f".join(t).encode()).hexdigest()[:24] for t in texts])


class FeatureStore:
    """Row-level feature cache: every example's features are computed once per settings.

    ``<cache_dir>/<settings hash>/`` holds ``settings.json`` and shards ``part-*.npz`` with
    ``keys`` (row content keys), ``modules`` (n, k, D) and ``base`` (n, d). Seeds, k, held-out
    slices and overlapping samples all reuse the rows they share.
    """

    def __init__(self, cache_dir: str, settings: dict, writer: bool = True):
        """writer: this process writes (only the first process of a multi-process run does;
        every process reads)."""
        digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:20]
        self.dir = os.path.join(cache_dir, digest)
        self.writer = writer
        if writer:
            os.makedirs(self.dir, exist_ok=True)
            with open(os.path.join(self.dir, "settings.json"), "w") as f:
                json.dump(settings, f, indent=1)

    def _shards(self):
        if not os.path.isdir(self.dir):
            return []
        return sorted(p for p in os.listdir(self.dir) if p.startswith("part-") and
                      p.endswith(".npz") and ".tmp" not in p)

    def lookup(self, keys: np.ndarray):
        """(found (N,) bool, modules, base): arrays hold zeros where not found."""
        found = np.zeros(len(keys), bool)
        modules = base = None
        where: dict[str, list[int]] = {}
        for i, k in enumerate(keys):
            where.setdefault(k, []).append(i)
        for name in self._shards():
            with np.load(os.path.join(self.dir, name)) as z:
                hits = [(i, j) for j, k in enumerate(z["keys"]) for i in where.get(k, ())]
                if not hits:
                    continue
                if modules is None:
                    modules = np.zeros((len(keys), *z["modules"].shape[1:]), np.float32)
                    base = np.zeros((len(keys), *z["base"].shape[1:]), np.float32)
                dst, src = (np.array(x) for x in zip(*hits, strict=True))
                modules[dst], base[dst] = z["modules"][src], z["base"][src]
                found[dst] = True
        return found, modules, base

    def add(self, keys: np.ndarray, modules: np.ndarray, base: np.ndarray) -> None:
        if not self.writer:
            return
        name = f"part-{len(self._shards()):05d}-{os.getpid()}.npz"
        tmp = os.path.join(self.dir, name + ".tmp.npz")
        np.savez(tmp, keys=keys, modules=modules, base=base)
        os.replace(tmp, os.path.join(self.dir, name))


def cached_features(cache_dir: str, settings: dict, texts, compute: Callable):
    """(modules, base, seconds, n_computed) for every row of `texts`.

    `compute(idx)` returns (modules, base) for the rows `idx` only; with a cache_dir, rows that
    were computed before (same settings and text) are read back instead. Every process of a
    multi-process run gets all rows; only the first writes the cache.
    """
    t0 = time.perf_counter()
    if not cache_dir:
        modules, base = compute(np.arange(len(texts)))
        return modules, base, time.perf_counter() - t0, len(texts)
    store = FeatureStore(cache_dir, settings, writer=is_main_process())
    keys = row_keys(texts)
    unique, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
    found, modules, base = store.lookup(keys)
    missing = np.sort(first[~np.isin(unique, keys[found])])
    if len(missing):
        new_m, new_b = compute(missing)
        store.add(keys[missing], new_m, new_b)
        barrier("feature cache written")  # no process looks up the next split before this
        if modules is None:
            modules = np.zeros((len(keys), *new_m.shape[1:]), np.float32)
            base = np.zeros((len(keys), *new_b.shape[1:]), np.float32)
        modules[missing], base[missing] = new_m, new_b
        repeats = ~found  # rows whose text came earlier: copy their first row
        same = first[inverse.reshape(-1)][repeats]
        modules[repeats], base[repeats] = modules[same], base[same]
    return modules, base, time.perf_counter() - t0 if len(missing) else 0.0, len(missing)


# ----------------------------------------------------------------------------- the extractor


def check_feature_config(config) -> None:
    """The combiner keys a config may spell wrong, named in the error."""
    c = config.combiner
    method = combiner_method(config)  # method and merge_* values: checked as config rules
    if method == "lorahub":
        require_cma()
    if method in ("merge", "lorahub") and c.output == "logits":
        raise UserError(f"combiner.method={method!r} merges the adapters, not their heads; use "
                        "combiner.output='hidden'")
    combiner_quirks = [k for k in ("attend_across_batch", "shared_layernorm") if config.quirks[k]]
    if method != "attens" and combiner_quirks:
        raise UserError(f"quirks.{combiner_quirks[0]} changes the attention combiner; "
                        f"combiner.method={method!r} has none, turn the quirk off")
    if c.agg1 not in AGG1:
        raise UserError(f"combiner.agg1 {c.agg1!r} is unknown; use one of {', '.join(AGG1)}")
    if c.agg2 not in AGGREGATIONS:
        raise UserError(f"combiner.agg2 {c.agg2!r} is unknown; use one of "
                        f"{', '.join(AGGREGATIONS)}")
    if c.output not in OUTPUTS:
        raise UserError(f"combiner.output {c.output!r} is unknown; use hidden or logits")
    if c.base_pooling not in POOLINGS:
        raise UserError(f"combiner.base_pooling {c.base_pooling!r} is unknown; use one of "
                        f"{', '.join(POOLINGS)}")


def feature_settings(config, model_params, tokenizer, stacked, heads, modules: list[str],
                     max_len: int, pad_to: tuple[int, ...]) -> dict:
    """The feature-cache key: everything a row's features depend on. The model and adapters by
    content (sha256 of their arrays), the tokenizer by its serialised state, and the padded
    lengths (``count_padding`` features depend on them)."""
    c = config.combiner
    return {"model": fingerprint(model_params), "tokenizer": data_lib.tokenizer_fingerprint(
                tokenizer), "adapters": fingerprint((stacked, heads)), "modules": modules,
            "output": c.output, "agg1": c.agg1, "base_pooling": c.base_pooling,
            "count_padding": config.quirks.count_padding, "max_length": max_len,
            "padded_lengths": list(pad_to), "dtype": config.dtype}


def merge_weights(config, k: int) -> tuple[float, ...]:
    """``config.combiner.merge_weights``, or by default 1/k each for the merges that sum
    (linear, magnitude_prune, dare_linear: the merge is then a mean) and 1 each for the TIES
    merges (their disjoint mean already divides)."""
    c = config.combiner
    weights = tuple(float(w) for w in c.merge_weights)
    if not weights:
        return (1.0 if c.merge_method.endswith("ties") else 1.0 / k,) * k
    if len(weights) != k:
        raise UserError(f"combiner.merge_weights has {len(weights)} weights for k={k} modules; "
                        "give one per module or none")
    return weights


def merged_adapter(config, module_set: ModuleSet, k: int) -> dict:
    """The first k modules' adapters merged into one: ``method='merge'`` as PEFT's
    add_weighted_adapter (``config.combiner.merge_*``; DARE masks drawn from ``config.seed``),
    ``'lorahub'`` summed with its weights (``merge_weights``, found by `ensemble.lorahub`)."""
    c = config.combiner
    loras = [m.lora for m in module_set.modules[:k]]
    if combiner_method(config) == "lorahub":
        return weighted_sum(loras, merge_weights(config, k))
    return merge_adapters(loras, merge_weights(config, k), c.merge_method, c.merge_density,
                          c.merge_majority_sign, key=jax.random.PRNGKey(config.seed))


def merges_adapters(config) -> bool:
    """Whether the features come from ONE merged adapter (merge, or lorahub once its weights
    are known) instead of every module's own."""
    method = combiner_method(config)
    return method == "merge" or (method == "lorahub" and bool(config.combiner.merge_weights))


@dataclasses.dataclass
class FeatureExtractor:
    """The frozen side of AttEns: the base encoder with the modules stacked (plus the all-zero
    base slot), and how its rows are tokenized and padded. Every module of the set has a slot
    (the cache then serves every k); with ``combiner.method='merge'`` one slot holds the merge
    of the first k."""

    module_set: ModuleSet
    k: int  # modules combined: the first k of the set
    slots: int  # feature vectors per row a combiner reads: k, or 1 for a merge
    model: str
    tokenizer: Any
    base_params: dict
    stacked: dict  # the slots' adapters (every module's, or the merge; + 1 on the leading axis)
    heads: tuple  # (kernels (k_all, d, Cmax), biases (k_all, Cmax))
    feature_fn: Any
    max_length: int
    pad_to: tuple[int, ...]  # padded lengths of feature batches
    pad_id: int
    hidden_size: int  # d of the base features
    encoder_config: Any = None  # the base encoder's EncoderConfig

    def with_adapters(self, adapters: list[dict]) -> FeatureExtractor:
        """The same extractor with `adapters` (adapter trees shaped like the modules') in its
        slots instead, e.g. a merge of the modules."""
        return dataclasses.replace(self, stacked=with_base_slot(stack_trees(adapters)),
                                   slots=len(adapters))

    def features(self, enc: data_lib.Encoded, batch_size: int, put=lambda b: b,
                 desc: str = "features", progress: bool = False, rows=None,
                 share: BatchShare | None = None, out_sharding=None):
        """(modules (N, k_all, D), base (N, d)) float32 numpy of `rows` (default all) of
        `enc`; each process feeds its share of every batch, every process gets all rows."""
        return compute_split_features(self.feature_fn, self.base_params, self.stacked,
                                      self.heads, enc, batch_size=batch_size, buckets=self.pad_to,
                                      pad_id=self.pad_id, put=put, desc=desc, progress=progress,
                                      rows=rows, share=share, out_sharding=out_sharding)


def build_feature_extractor(config) -> FeatureExtractor:
    """Load the module set, the base encoder and its tokenizer; check they fit. Reads no data."""
    check_feature_config(config)
    mset = load_module_set(config.module_dir, tuple(config.modules))
    k = config.k or len(mset.modules)
    if not 1 <= k <= len(mset.modules):
        raise UserError(f"k={config.k} but the module set has {len(mset.modules)} modules "
                        f"({', '.join(mset.tasks)}); use 1..{len(mset.modules)} or 0 for all")
    if config.combiner.output == "logits" and any(m.meta.get("head", "linear") != "linear"
                                                  for m in mset.modules):
        raise UserError("combiner.output='logits' applies each module's linear head to every "
                        "token; modules with transformers heads (head='hf', or --from-peft) "
                        "need combiner.output='hidden'")
    model = config.model or mset.model
    model_dir, enc_cfg, pretrained, _, _ = load_pretrained(model)
    if config.combiner.base_pooling == "pooler" and not enc_cfg.has_pooler:
        raise UserError(f"combiner.base_pooling='pooler' needs a BERT pooler; {model} has none, "
                        "use mean or cls")
    tokenizer = data_lib.load_tokenizer(model_dir, config.tokenizer)
    max_len = min(config.max_length, enc_cfg.max_position_embeddings)
    encoder = Encoder(enc_cfg, lora_dropout=mset.spec.dropout,
                      dtype=lora_lib.DTYPES[config.dtype])
    ids = jnp.zeros((1, 8), jnp.int32)
    base_params = lora_lib.cast_floating(
        init_around(encoder, pretrained, jax.random.PRNGKey(config.seed), ids),
        lora_lib.DTYPES[config.param_dtype])
    adapters, slots = [m.lora for m in mset.modules], k
    if merges_adapters(config):
        adapters, slots = [merged_adapter(config, mset, k)], 1
    try:
        stacked = with_base_slot(stack_trees(adapters))
        heads = stack_heads([m.head for m in mset.modules]) if (
            config.combiner.output == "logits") else ()
        jax.eval_shape(lambda: encoder.apply({"params": base_params, "lora": jax.tree_util.tree_map(
            lambda x: x[0], stacked)}, ids))
    except (ValueError, TypeError) as e:
        raise UserError(f"the modules in {config.module_dir} do not fit the encoder {model} "
                        f"({type(e).__name__}); use the base model they were trained on") from None
    feature_fn = make_feature_fn(encoder, output=config.combiner.output, agg1=config.combiner.agg1,
                                 base_pooling=config.combiner.base_pooling,
                                 count_padding=config.quirks.count_padding)
    # A token mean over padding depends on the padded length: with count_padding every row is
    # padded to max_length (as a tokenizer with padding="max_length" does), so a row's features
    # never depend on the batch it lands in; otherwise the usual length buckets.
    pad_to = ((max_len,) if config.quirks.count_padding
              else data_lib.bucket_lengths(max_len, config.buckets))
    return FeatureExtractor(mset, k, slots, model, tokenizer, base_params, stacked, heads, feature_fn,
                            max_len, pad_to, tokenizer.pad_token_id or 0, enc_cfg.hidden_size,
                            enc_cfg)


# ----------------------------------------------------------------------------- cached splits


@dataclasses.dataclass
class FeatureSplit:
    """Cached features of one split: modules (N, k, D), base (N, d), labels (N,)."""

    modules: np.ndarray
    base: np.ndarray
    labels: np.ndarray
    seconds: float  # extraction time (0 when read from the cache)
    cached: bool

    def __len__(self) -> int:
        return len(self.labels)


def _pad_rows(x: np.ndarray, size: int) -> np.ndarray:
    if len(x) == size:
        return x
    return np.concatenate([x, np.zeros((size - len(x), *x.shape[1:]), x.dtype)])


def feature_batch(split: FeatureSplit, idx: np.ndarray, size: int) -> dict:
    """Features of rows `idx`, zero-padded to `size` rows; weights 0 mark the padding rows."""
    weights = np.zeros(size, np.float32)
    weights[: len(idx)] = 1
    return {"modules": _pad_rows(split.modules[idx], size), "base": _pad_rows(split.base[idx], size),
            "labels": _pad_rows(split.labels[idx], size), "weights": weights}


def map_combiner(fn, split: FeatureSplit, batch_size: int, put=lambda b: b,
                 share: BatchShare | None = None):
    """``fn(feature batch)`` over a split, outputs gathered back in row order. Batches hold
    consecutive rows, the same for every evaluation and prediction and any number of
    processes, so the batch-axis quirk always attends to the same neighbours."""
    return map_batches(fn, len(split), np.zeros(len(split), np.int64), batch_size,
                       lambda idx, size, _rows: feature_batch(split, idx, size), put=put,
                       share=share)
