"""Many named classifier adapters on one base model, each input row scored by its own adapter.

    adapters = load_adapters("sst2=runs/ft_lora_sst2,cola=peft/cola,SET", model_dir)
    routed = RoutedClassifier.build(model_dir, adapters)
    outputs = routed.predict(rows, where, adapter_key="adapter")

An entry is ``NAME=DIR`` or a bare ``DIR`` (named by its folder, or, for a module set, by each
module's task). DIR is a finished FT_LoRA run (its best checkpoint), a PEFT SEQ_CLS adapter of
the base model, or anything a package registered under the entry-point group
``lora_jax.adapter_sets`` (the AttEns module sets of `ensemble.modules`).

`RoutedClassifier` stacks the adapters (`lora_jax.routing`) and scores every batch in one jit
program: the base encoder with each row's adapter gathered per layer, then each row's own head
(its kind, pooling and label count). Rows keep their input order; each row is tokenized with
its adapter's task columns and max_length, as the adapter alone would be.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from lora_jax import data as data_lib
from lora_jax import routing
from lora_jax.distributed import map_batches
from lora_jax.errors import UserError
from lora_jax.lora import adapter_layers
from lora_jax.models import Encoder
from lora_jax.models.encoder import HFClassificationHead, pool, reads_cls_only
from lora_jax.models.hf_import import Pretrained, init_around, load_pretrained
from lora_jax.tasks import Task

ADAPTER_SETS_GROUP = "lora_jax.adapter_sets"
BUCKETS = (16, 32, 64, 128, 256, 512)


@dataclasses.dataclass(frozen=True)
class NamedAdapter:
    """One classifier adapter: its LoRA tree (the encoder's, `lora_jax.lora` layout), its head
    (``head_kind`` "linear" with ``pooling``, or "hf": transformers' head) and its task."""

    name: str
    task: Task
    lora: dict
    head: dict
    head_kind: str
    pooling: str
    max_length: int
    source: str
    base_encoder: dict | None = None  # the encoder weights it was trained on, when known

    @property
    def head_group(self) -> tuple[str, str]:
        return (self.head_kind, self.pooling if self.head_kind == "linear" else "head")


# ----------------------------------------------------------------------------- loading


def _from_classifier_run(name: str, run, source: str) -> NamedAdapter:
    lora = run.variables.get("lora", {}).get("encoder")
    if not lora:
        raise UserError(f"adapter {name!r} ({source}) is a {run.config.experiment} run without "
                        "LoRA adapters; route ft_lora runs, PEFT adapters or module sets")
    model = run.model
    return NamedAdapter(name, run.task, lora, run.variables["params"]["head"], model.head,
                        model.pooling, run.max_length, source, run.variables["params"]["encoder"])


def _adapters_in(path: str, model: str) -> list[tuple[str, NamedAdapter]] | NamedAdapter:
    """What DIR holds: one adapter, or [(name, adapter), ...] from a registered adapter set."""
    from lora_jax import inference, runs

    if not os.path.isdir(path):
        raise UserError(f"adapter folder {path!r} does not exist")
    if os.path.isfile(os.path.join(path, "results.json")):
        run = runs.load_run(path)
        if not isinstance(run, inference.ClassifierRun):
            raise UserError(f"{path} is a {run.config.experiment} run; per-row routing takes "
                            "classifier adapters (ft_lora runs, PEFT SEQ_CLS adapters, module "
                            "sets)")
        return _from_classifier_run("", run, path)
    if os.path.isfile(os.path.join(path, "adapter_config.json")):
        return _from_classifier_run("", inference.peft_classifier(model, path), path)
    for entry in importlib.metadata.entry_points(group=ADAPTER_SETS_GROUP):
        found = entry.load()(path)
        if found is not None:
            return found
    raise UserError(f"{path} is neither a finished run (results.json), a PEFT adapter "
                    "(adapter_config.json) nor a module set (moduleset.json)")


def load_adapters(spec: str, model: str) -> list[NamedAdapter]:
    """The adapters of ``NAME=DIR,DIR,...`` (see the module docstring), in the order given."""
    out: list[NamedAdapter] = []
    for entry in (e.strip() for e in spec.split(",")):
        if not entry:
            continue
        name, sep, path = entry.partition("=")
        if not sep:
            name, path = "", entry
        found = _adapters_in(path, model)
        if isinstance(found, NamedAdapter):
            name = name or os.path.basename(os.path.normpath(path))
            out.append(dataclasses.replace(found, name=name))
        else:
            prefix = f"{name}/" if name else ""
            out.extend(dataclasses.replace(a, name=prefix + n) for n, a in found)
    if not out:
        raise UserError("--adapters names no adapter; give NAME=DIR,...")
    names = [a.name for a in out]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise UserError(f"adapter name(s) {', '.join(twice)} given twice; name each entry "
                        "NAME=DIR")
    return out


def check_fits(adapter: NamedAdapter, encoder_params: Mapping, model: str) -> None:
    """UserError naming the adapter and the layer unless it was made for this base model."""
    base = traverse_util.flatten_dict(encoder_params)
    for layer, leaves in adapter_layers(adapter.lora).items():
        kernel = base.get((*layer, "kernel"))
        where = "/".join(layer)
        if kernel is None:
            raise UserError(f"adapter {adapter.name!r} ({adapter.source}) adapts {where}, which "
                            f"{model} does not have: it was made for another base model")
        want = (kernel.shape[0], kernel.shape[1])
        got = (leaves["A"].shape[0], leaves["B"].shape[-1])
        if want != got:
            raise UserError(f"adapter {adapter.name!r} ({adapter.source}) does not fit {model}: "
                            f"its {where} maps {got[0]} -> {got[1]} features, the base "
                            f"{want[0]} -> {want[1]}")
    if adapter.base_encoder is not None:
        theirs = traverse_util.flatten_dict(adapter.base_encoder)
        for key, value in base.items():
            if key in theirs and not np.array_equal(np.asarray(theirs[key]), np.asarray(value)):
                raise UserError(f"adapter {adapter.name!r} ({adapter.source}) was trained on "
                                f"other base weights than {model} ({'/'.join(key)} differs)")


def reads_pooler(adapter: NamedAdapter, model_type: str) -> bool:
    """Whether the adapter's head reads the encoder's pooled output (BERT's pooler)."""
    return adapter.pooling == "pooler" or (adapter.head_kind == "hf" and model_type == "bert")


def complete_encoder(encoder: Encoder, pre: Pretrained, adapters: Sequence[NamedAdapter],
                     model: str) -> dict:
    """The checkpoint's encoder weights with the leaves it lacks (``pre.missing``, e.g. the
    pooler of a sentence-transformers BERT) filled in, as a run that trained on it fills them:
    from seed 0, which changes nothing for heads that do not read them; a head that reads the
    pooler takes it from its adapter's own training run when every such adapter agrees on one,
    else it is refused by name."""
    if not pre.missing:
        return pre.encoder
    ids = jnp.zeros((1, 8), jnp.int32)
    flat = traverse_util.flatten_dict(init_around(encoder, pre.encoder, jax.random.PRNGKey(0), ids))
    missing = [tuple(m.split("/")) for m in pre.missing]
    pooler = [p for p in missing if p[0] == "pooler"]
    readers = [a for a in adapters if reads_pooler(a, encoder.config.model_type)]
    if pooler and readers:
        found = {}
        for a in readers:
            theirs = traverse_util.flatten_dict(a.base_encoder or {})
            if not all(p in theirs for p in pooler):
                raise UserError(f"adapter {a.name!r} ({a.source}) reads BERT's pooler, which "
                                f"{model} does not have and its adapter does not carry; route "
                                "it with a base model that has a pooler")
            found[a.name] = tuple(np.asarray(theirs[p]).tobytes() for p in pooler)
            for p in pooler:
                flat[p] = jnp.asarray(theirs[p])
        if len(set(found.values())) > 1:
            raise UserError(f"adapters {', '.join(found)} read BERT's pooler, which {model} does "
                            "not have, and their runs drew different ones; route them in "
                            "separate calls")
    return traverse_util.unflatten_dict(flat)


# ----------------------------------------------------------------------------- the routed model


def head_logits(head_kind: str, pooling: str, model_type: str, head: Mapping, hidden, pooled,
                mask) -> jax.Array:
    """(B, C) float32 logits of one head over encoder outputs hidden (B, T, d), pooled (B, d)
    or None, mask (B, T): the linear head (pooling -> Dense) or transformers' head."""
    if head_kind == "hf":
        num_labels = np.shape(head.get("out_proj", head.get("classifier", {})).get("bias"))[0]
        return HFClassificationHead(model_type, int(num_labels)).apply(
            {"params": head}, hidden, pooled, True)
    x = pool(hidden, pooled, mask, pooling)
    return x @ head["kernel"].astype(jnp.float32) + head["bias"].astype(jnp.float32)


def make_routed_logits(encoder: Encoder, groups: Sequence[tuple[str, str]], model_type: str):
    """logits(encoder_params, bank, heads, group_rows, batch) -> (B, Cmax) float32.

    bank: `routing.stack_adapters` of the n adapters. heads: one stacked head tree per group
    (`routing.stack_heads`; a group = the adapters of one head kind and pooling, in `groups`'
    order). group_rows: (n,) int32 group of each adapter and (n,) its row in its group's stack.
    batch["adapter_index"] (B,) picks each row's adapter; logits past a head's own label count
    are 0. When no group's head reads more than [CLS], the encoder's last layer computes that
    position alone (``cls_only``, as `SequenceClassifier` does; the same logits).
    """
    cls_only = all(reads_cls_only(kind, pooling) for kind, pooling in groups)

    def logits(encoder_params, bank, heads, group_rows, batch):
        index = batch["adapter_index"]
        hidden, pooled = encoder.apply(
            {"params": encoder_params, "lora": routing.route(bank, index)},
            batch["input_ids"], batch["attention_mask"], batch["token_type_ids"],
            deterministic=True, cls_only=cls_only)
        group_of, row_in_group = group_rows
        width = max(h_out(h) for h in heads)
        out = jnp.zeros((index.shape[0], width), jnp.float32)
        for g, ((kind, pooling), stacked) in enumerate(zip(groups, heads, strict=True)):
            rows = routing.gather_rows(stacked, row_in_group[index])

            def one(head, h, p, m, kind=kind, pooling=pooling):
                p = None if p is None else p[None]
                return head_logits(kind, pooling, model_type, head, h[None], p, m[None])[0]

            per_row = jax.vmap(one, in_axes=(0, 0, None if pooled is None else 0, 0))(
                rows, hidden, pooled, batch["attention_mask"])
            per_row = jnp.pad(per_row, ((0, 0), (0, width - per_row.shape[-1])))
            out = jnp.where((group_of[index] == g)[:, None], per_row, out)
        return out

    return logits


def h_out(stacked_head: Mapping) -> int:
    """The (padded) label count of a stacked head: its last layer's bias width."""
    head = stacked_head.get("out_proj", stacked_head.get("classifier", stacked_head))
    return int(head["bias"].shape[-1])


@dataclasses.dataclass(frozen=True)
class AdapterBank:
    """The stacked form of n `NamedAdapter`s: the LoRA bank (`routing.stack_adapters`), one
    stacked head tree per head group (kind, pooling), and each adapter's (group, row in
    group)."""

    adapters: tuple[NamedAdapter, ...]
    lora: dict
    groups: tuple[tuple[str, str], ...]
    heads: tuple[dict, ...]
    group_rows: tuple[np.ndarray, np.ndarray]

    @classmethod
    def of(cls, adapters: Sequence[NamedAdapter]) -> AdapterBank:
        names = [a.name for a in adapters]
        groups = tuple(sorted({a.head_group for a in adapters}))
        group_of = np.array([groups.index(a.head_group) for a in adapters], np.int32)
        row_in_group = np.array([int((group_of[:i] == group_of[i]).sum())
                                 for i in range(len(adapters))], np.int32)
        heads = tuple(routing.stack_heads([a.head for a in adapters if a.head_group == g],
                                          [a.name for a in adapters if a.head_group == g])
                      for g in groups)
        return cls(tuple(adapters), routing.stack_adapters([a.lora for a in adapters], names),
                   groups, heads, (group_of, row_in_group))

    def logits_fn(self, encoder: Encoder):
        """jit-compiled (encoder_params, batch) -> (B, Cmax) routed logits of this bank."""
        fn = jax.jit(make_routed_logits(encoder, self.groups, encoder.config.model_type))
        return lambda encoder_params, batch: fn(encoder_params, self.lora, self.heads,
                                                self.group_rows, batch)


@dataclasses.dataclass
class RoutedClassifier:
    """n classifier adapters on one base encoder; `logits`/`predict` route every row."""

    bank: AdapterBank
    encoder: Encoder
    encoder_params: dict
    tokenizer: Any
    pad_id: int
    batch_size: int

    @classmethod
    def build(cls, model: str, adapters: Sequence[NamedAdapter], batch_size: int = 64
              ) -> RoutedClassifier:
        pre = load_pretrained(model)
        for adapter in adapters:
            check_fits(adapter, pre.encoder, model)
        encoder = Encoder(pre.config)
        tokenizer = data_lib.load_tokenizer(pre.model_dir)
        return cls(AdapterBank.of(adapters), encoder,
                   complete_encoder(encoder, pre, adapters, model), tokenizer,
                   tokenizer.pad_token_id or 0, batch_size)

    @property
    def adapters(self) -> tuple[NamedAdapter, ...]:
        return self.bank.adapters

    @property
    def names(self) -> list[str]:
        return [a.name for a in self.adapters]

    def encode(self, texts: Sequence[tuple[str, ...]], index: np.ndarray) -> data_lib.Encoded:
        """Each row tokenized at its adapter's max_length (rows in input order)."""
        ids: list = [None] * len(texts)
        types: list = [None] * len(texts)
        for i, adapter in enumerate(self.adapters):
            rows = np.flatnonzero(index == i)
            if not len(rows):
                continue
            enc = data_lib.encode(
                data_lib.Examples([texts[r] for r in rows], np.zeros(len(rows), np.int32)),
                self.tokenizer, adapter.max_length)
            for r, x, t in zip(rows, enc.input_ids, enc.token_type_ids, strict=True):
                ids[r], types[r] = x, t
        return data_lib.Encoded(ids, types, np.zeros(len(texts), np.int32))

    def logits(self, texts: Sequence[tuple[str, ...]], index: np.ndarray,
               progress: bool = False) -> list[np.ndarray]:
        """Per row, the logits (C_i,) of its adapter's head: row r scored by adapter index[r]."""
        index = routing.check_index(index, len(self.adapters))
        if (index < 0).any():
            raise UserError("a classifier row needs an adapter: the base model has no head")
        enc = self.encode(texts, index)
        longest = max(a.max_length for a in self.adapters)
        buckets = data_lib.bucket_lengths(longest, BUCKETS)
        fn = self.bank.logits_fn(self.encoder)

        def batch_of(idx, size, step_rows):
            batch = data_lib.make_batch(enc, idx, size, buckets, self.pad_id, step_rows)
            batch["adapter_index"] = np.zeros((size,), np.int32)
            batch["adapter_index"][: len(idx)] = index[idx]
            return batch

        out = map_batches(lambda b: fn(self.encoder_params, b), len(enc), enc.lengths,
                          self.batch_size, batch_of, desc="predict", progress=progress,
                          shrink_short=True)  # each row its own encoder pass
        return [row[: self.adapters[i].task.num_labels] for row, i in zip(out, index,
                                                                           strict=True)]

    def index_of(self, rows: Sequence[dict], key: str, where: str) -> np.ndarray:
        """Each row's adapter index from its `key` column; UserError naming the first row whose
        column is missing or names no adapter."""
        names = {n: i for i, n in enumerate(self.names)}
        index = np.zeros(len(rows), np.int32)
        for r, row in enumerate(rows):
            if key not in row:
                raise UserError(f"row {r + 1} of {where} has no {key!r} column naming its "
                                f"adapter (columns: {', '.join(map(str, row))}); set "
                                "--adapter-key to the column that names it")
            if str(row[key]) not in names:
                raise UserError(f"row {r + 1} of {where} names adapter {row[key]!r}, which is "
                                f"not among --adapters ({', '.join(self.names)})")
            index[r] = names[str(row[key])]
        return index

    def predict(self, rows: Sequence[dict], where: str, adapter_key: str,
                progress: bool = False) -> list[dict]:
        """One output per row, in order: its adapter's name plus the classifier outputs of
        `lora_jax.inference.classification_outputs` under that adapter's task."""
        from lora_jax.inference import classification_outputs
        from lora_jax.runs import texts_of

        index = self.index_of(rows, adapter_key, where)
        texts: list = [None] * len(rows)
        for i, adapter in enumerate(self.adapters):
            mine = np.flatnonzero(index == i)
            if len(mine):
                for r, t in zip(mine, texts_of([rows[r] for r in mine], adapter.task,
                                               f"the {adapter.name!r} rows of {where}"),
                                strict=True):
                    texts[r] = t
        logits = self.logits(texts, index, progress)
        return [{"adapter": self.adapters[i].name,
                 **classification_outputs(row[None], self.adapters[i].task)[0]}
                for row, i in zip(logits, index, strict=True)]
