"""Module sets: k single-task LoRA modules (adapter + head + task metadata) on one base model.

Layout of a module set folder::

    <dir>/moduleset.json            {"model": ..., "modules": [task, ...], "lora": {...}}
    <dir>/<task>/module.json        task, num_labels, metrics, source run, training config
    <dir>/<task>/weights/           Orbax checkpoint of {"lora": {...}, "head": {...}}

`export_module` turns a finished FT_LoRA run (its best checkpoint) into a module,
`module_from_peft` a PEFT SEQ_CLS adapter trained anywhere (its transformers head included);
`load_module_set` reads modules back in a chosen order.
"""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import numpy as np
import orbax.checkpoint as ocp

from lora_jax.checkpoint import restore_trainable
from lora_jax.classifier import head_num_labels, pooling_of
from lora_jax.errors import UserError
from lora_jax.lora import ALPHA, LoRASpec
from lora_jax.writers import write_json_atomic


@dataclasses.dataclass
class Module:
    task: str
    num_labels: int
    lora: dict  # the "lora" collection's "encoder" subtree: {layer_i: {...: {"A", "B"}}}
    head: dict  # {"kernel": (d, C), "bias": (C,)}
    meta: dict


@dataclasses.dataclass
class ModuleSet:
    model: str
    spec: LoRASpec
    pooling: str
    max_length: int
    modules: list[Module]

    @property
    def tasks(self) -> list[str]:
        return [m.task for m in self.modules]


def export_module(run_dir: str, out_dir: str) -> dict:
    """Write the best checkpoint of an FT_LoRA run (train.py workdir) as a module; returns meta."""
    results_path = os.path.join(run_dir, "results.json")
    if not os.path.isfile(results_path):
        raise UserError(f"{run_dir} has no results.json; finish the FT_LoRA run first")
    with open(results_path) as f:
        results = json.load(f)
    if results["experiment"] != "ft_lora":
        raise UserError(f"{run_dir} is a {results['experiment']} run; modules come from ft_lora")
    trainable, _ = restore_trainable(run_dir, "best_trainable")
    tree = {"lora": jax.device_get(trainable["lora"]["encoder"]),
            "head": jax.device_get(trainable["params"]["head"])}
    cfg = results["config"]
    head = tree["head"]
    meta = {"task": results["task"],
            "num_labels": head_num_labels(head),
            "main_metric": results["main_metric"], "metrics": results["metrics"],
            "model": cfg["model"], "pooling": pooling_of(cfg), "head": cfg.get("head", "linear"),
            "max_length": cfg["max_length"],
            "lora": dict(cfg["lora"]), "source_run": os.path.abspath(run_dir),
            "seed": results["seed"]}
    return write_module(out_dir, tree, meta)


def write_module(out_dir: str, tree: dict, meta: dict) -> dict:
    """<out_dir>/weights (Orbax: {"lora", "head"}) and <out_dir>/module.json; returns meta."""
    weights = os.path.abspath(os.path.join(out_dir, "weights"))
    if os.path.exists(weights):
        import shutil

        shutil.rmtree(weights)
    os.makedirs(out_dir, exist_ok=True)
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(weights, tree)
    ckptr.wait_until_finished()
    write_json_atomic(os.path.join(out_dir, "module.json"), meta)
    return meta


SIDECAR = "lora_jax_module.json"  # optional, beside adapter_config.json: {"task": "sst2"}


def module_from_peft(adapter: str, model: str, out_dir: str, task: str = "",
                     max_length: int = 128) -> dict:
    """Write a PEFT SEQ_CLS adapter (folder or hub id) of `model` as a module; returns meta.

    The task name comes from `task`, else the adapter's sidecar ``lora_jax_module.json``; the
    number of labels from the adapter's head (checked against a registered task of that name).
    """
    from lora_jax.classifier import checked_head
    from lora_jax.peft_io import load_seq_cls
    from lora_jax.tasks import task_names

    _, peft, head = load_seq_cls(model, adapter)
    sidecar = os.path.join(peft.source, SIDECAR)
    if not task and os.path.isfile(sidecar):
        with open(sidecar) as f:
            task = json.load(f).get("task", "")
    if not task:
        raise UserError(f"no task name for adapter {adapter}: pass --tasks, or put "
                        f'{SIDECAR} with {{"task": "<name>"}} beside its adapter_config.json')
    num_labels = head_num_labels(head)
    if task in task_names():
        from lora_jax.tasks import get_task

        checked_head(head, get_task(task).num_labels, adapter)
    spec = peft.spec
    meta = {"task": task, "num_labels": num_labels, "main_metric": "", "metrics": {},
            "model": model, "pooling": "head", "head": "hf", "max_length": max_length,
            "lora": {"r": spec.r, "alpha": spec.alpha, "dropout": spec.dropout,
                     "targets": list(spec.targets)},
            "source_adapter": adapter if not os.path.isdir(adapter) else os.path.abspath(adapter),
            "base_model_recorded_by_adapter": peft.base_model, "seed": None}
    return write_module(out_dir, {"lora": peft.lora["encoder"], "head": head}, meta)


def write_moduleset_index(set_dir: str, metas: list[dict]) -> None:
    first = metas[0]
    shape_of = lambda m: {"model": m["model"], "lora r": m["lora"]["r"]}
    for m in metas[1:]:
        for key, value in shape_of(m).items():
            if value != shape_of(first)[key]:
                raise UserError(f"module {m['task']} has {key} {value!r} but {first['task']} has "
                                f"{shape_of(first)[key]!r}; the modules of a set share one base "
                                "model and rank (each keeps its own alpha)")
    write_json_atomic(os.path.join(set_dir, "moduleset.json"), {
        "model": first["model"], "lora": first["lora"], "pooling": first["pooling"],
        "max_length": first["max_length"], "modules": [m["task"] for m in metas]})


def with_alpha(lora: dict, alpha: float) -> dict:
    """Adapters saved before each adapter carried its own alpha get the alpha their module was
    trained with (its module.json); adapters that have one keep it."""

    def fill(node):
        if "A" in node and "B" in node:
            return {**node, ALPHA: node.get(ALPHA, np.asarray(alpha, np.float32))}
        return {k: fill(v) for k, v in node.items()}

    return fill(lora)


def load_module_set(set_dir: str, tasks: list[str] | tuple[str, ...] = ()) -> ModuleSet:
    """Modules of `set_dir` in the order of `tasks` (default: the set's own order)."""
    index_path = os.path.join(set_dir, "moduleset.json")
    if not os.path.isfile(index_path):
        raise UserError(f"{set_dir!r} is not a module set (no moduleset.json); create one with "
                        "python -m ensemble.train_modules")
    with open(index_path) as f:
        index = json.load(f)
    order = list(tasks) or index["modules"]
    unknown = [t for t in order if t not in index["modules"]]
    if unknown:
        raise UserError(f"module(s) {', '.join(unknown)} not in {set_dir} (it has "
                        f"{', '.join(index['modules'])}); train them or change config.modules")
    ckptr = ocp.StandardCheckpointer()
    modules = []
    for task in order:
        with open(os.path.join(set_dir, task, "module.json")) as f:
            meta = json.load(f)
        tree = ckptr.restore(os.path.abspath(os.path.join(set_dir, task, "weights")))
        lora = with_alpha(tree["lora"], float(meta["lora"]["alpha"]))
        if modules and (jax.tree_util.tree_structure(lora)
                        != jax.tree_util.tree_structure(modules[0].lora)):
            raise UserError(f"module {task} adapts other layers than module {modules[0].task}; "
                            "the modules of a set need adapters on the same layers")
        modules.append(Module(task, meta["num_labels"], lora, tree["head"], meta))
    lo = index["lora"]
    spec = LoRASpec(r=lo["r"], alpha=lo["alpha"], dropout=lo["dropout"],
                    targets=tuple(lo["targets"]))
    return ModuleSet(index["model"], spec, index["pooling"], index["max_length"], modules)


def routed_adapters(path: str):
    """The modules of the module set at `path` as named adapters for per-row routing
    (`lora_jax.adapter_bank`, entry point ``lora_jax.adapter_sets``), named by task; None when
    `path` is not a module set."""
    from lora_jax.adapter_bank import NamedAdapter
    from lora_jax.tasks import custom_task, get_task, task_names

    if not os.path.isfile(os.path.join(path, "moduleset.json")):
        return None
    found = load_module_set(path)
    out = []
    for m in found.modules:
        task = (get_task(m.task) if m.task in task_names() else custom_task(
            {"name": m.task, "text_keys": ["text"], "num_labels": m.num_labels}))
        head_kind = m.meta.get("head", "linear")
        out.append((m.task, NamedAdapter(m.task, task, m.lora, m.head, head_kind,
                                         m.meta.get("pooling", found.pooling),
                                         int(m.meta.get("max_length", found.max_length)),
                                         os.path.join(path, m.task))))
    return out
