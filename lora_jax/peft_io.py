"""LoRA adapters (and classification heads) to and from the Hugging Face PEFT format.

A PEFT adapter folder holds ``adapter_config.json`` and ``adapter_model.safetensors`` (or, from
older PEFT, ``adapter_model.bin``) with keys ``base_model.model.<module>.lora_A.weight`` of shape
(r, in) and ``...lora_B.weight`` (out, r); our Flax ``A`` (in, r) and ``B`` (r, out) are their
transposes. A ``SEQ_CLS`` adapter also carries the classification head (``modules_to_save``) as
``base_model.model.<head module>.{weight,bias}``, in transformers' layout for each model
(`lora_jax.models.hf_import.hf_head_module_map`).

Nothing is guessed: every tensor of an adapter file maps onto a layer of the model or the import
stops naming it; r, alpha, dropout, targets and the head come from the adapter; PEFT options
that change the computation and that this project does not implement are refused by name.

The core (`read_adapter`, `write_adapter`) is architecture-neutral: a model family gives the map
from PEFT module names to its Flax paths (`encoder_module_map` here, the T5 one in
`t5_hybrid.peft_io`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re

import numpy as np

from lora_jax.errors import UserError
from lora_jax.lora import ALPHA, LoRASpec, adapter_alphas, adapter_layers
from lora_jax.models import EncoderConfig
from lora_jax.models.hf_import import (
    ARCH_PREFIX,
    head_state_dict,
    hf_head_module_map,
    hf_head_name_map,
    hf_module_map,
)

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
TORCH_WEIGHTS_NAME = "adapter_model.bin"
ROOT = "base_model.model."

# PEFT options that change what an adapter computes; a truthy value is refused by name.
UNSUPPORTED_OPTIONS = (
    "use_dora", "use_rslora", "fan_in_fan_out", "rank_pattern", "alpha_pattern", "lora_bias",
    "use_qalora", "layer_replication", "trainable_token_indices", "target_parameters",
    "alora_invocation_tokens", "megatron_config", "use_bdlora", "arrow_config",
    "monteclora_config", "kasa_config", "velora_config",
)

Path = tuple[str, ...]


@dataclasses.dataclass
class PeftAdapter:
    """A PEFT adapter read into our Flax layout."""

    lora: dict  # the "lora" collection: {"encoder": {...: {"A", "B", "alpha"}}}
    spec: LoRASpec  # r, alpha, dropout and the targets (the adapted modules, as regexes)
    head: dict | None  # modules_to_save head in the `HFClassificationHead` layout, or None
    task_type: str | None
    base_model: str | None  # base_model_name_or_path as the adapter records it
    source: str  # the folder it was read from


# ---------------------------------------------------------------- architecture-neutral core


def resolve_adapter_dir(adapter: str) -> str:
    """A local PEFT adapter folder, or a hub id downloaded with `snapshot_download`."""
    if os.path.isdir(adapter):
        if not os.path.isfile(os.path.join(adapter, CONFIG_NAME)):
            raise UserError(f"{adapter!r} has no {CONFIG_NAME}; point at a PEFT adapter folder")
        return adapter
    if adapter.startswith((".", "/", "~")) or adapter.count("/") > 1:
        raise UserError(f"adapter path {adapter!r} does not exist; pass a PEFT adapter folder "
                        "or a hub id such as user/my-lora-adapter")
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(adapter, allow_patterns=[CONFIG_NAME, "adapter_model.*"])
    except Exception as e:  # offline, unknown id, gated repo...
        raise UserError(f"could not get adapter {adapter!r} from the Hugging Face Hub "
                        f"({type(e).__name__}); when offline, download it elsewhere and pass the "
                        "local folder") from None


def read_adapter_config(adapter_dir: str, peft_type: str = "LORA") -> dict:
    """adapter_config.json, refused unless it is a `peft_type` adapter this project computes
    exactly as PEFT does."""
    path = os.path.join(adapter_dir, CONFIG_NAME)
    try:
        with open(path) as f:
            pc = json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {path} ({type(e).__name__}); is it a PEFT adapter "
                        "folder?") from None
    if pc.get("peft_type") != peft_type:
        raise UserError(f"{path} is a {pc.get('peft_type')} adapter; {peft_type} is expected here")
    used = [k for k in UNSUPPORTED_OPTIONS if pc.get(k)]
    if pc.get("bias", "none") != "none":
        used.append(f"bias={pc['bias']!r}")
    if used:
        raise UserError(f"{path} uses {', '.join(used)}, which this loader does not implement; "
                        "export a plain adapter")
    return pc


def read_adapter_tensors(adapter_dir: str) -> dict[str, np.ndarray]:
    """Every tensor of the adapter's weights file as float32 numpy (names unchanged)."""
    from lora_jax.models.hf_import import _read_safetensors, _read_torch_bin

    st = os.path.join(adapter_dir, WEIGHTS_NAME)
    if os.path.isfile(st):
        return _read_safetensors(st)
    pt = os.path.join(adapter_dir, TORCH_WEIGHTS_NAME)
    if os.path.isfile(pt):
        return _read_torch_bin(pt)
    raise UserError(f"{adapter_dir!r} has no {WEIGHTS_NAME} or {TORCH_WEIGHTS_NAME}")


def _set(tree: dict, path: Path, value) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


_LORA_KEY = re.compile(re.escape(ROOT) + r"(.+)\.lora_([AB])\.(?:\w+\.)?weight")


def read_adapter(adapter: str, module_map: dict[str, Path],
                 head_names: dict[str, tuple[Path, str]] | None = None,
                 arch: str = "this model") -> PeftAdapter:
    """Read a PEFT LORA adapter onto a model.

    module_map: PEFT module name (after ``base_model.model.``) -> Flax path in the ``lora``
      collection of every layer that can take an adapter.
    head_names: head tensor name (after ``base_model.model.``) -> (path in the head tree,
      transform "T" or ""), for SEQ_CLS adapters.
    """
    adapter_dir = resolve_adapter_dir(adapter)
    pc = read_adapter_config(adapter_dir)
    head_names = head_names or {}
    alpha = np.asarray(pc["lora_alpha"], np.float32)
    tree: dict = {}
    head: dict = {}
    modules: set[Path] = set()
    for key, value in read_adapter_tensors(adapter_dir).items():
        name = key[len(ROOT):] if key.startswith(ROOT) else None
        if name in head_names:
            path, transform = head_names[name]
            _set(head, path, value.T if transform == "T" else value)
            continue
        m = _LORA_KEY.fullmatch(key)
        if not m or m.group(1) not in module_map:
            raise UserError(f"adapter tensor {key} in {adapter_dir} does not map onto a layer of "
                            f"{arch}; was the adapter trained on another architecture?")
        path = module_map[m.group(1)]
        matrix = np.asarray(value.T, np.float32)
        rank = matrix.shape[1] if m.group(2) == "A" else matrix.shape[0]
        if rank != int(pc["r"]):
            raise UserError(f"adapter tensor {key} has rank {rank} but {CONFIG_NAME} says "
                            f"r={pc['r']}")
        modules.add(path)
        _set(tree, (*path, m.group(2)), matrix)
        _set(tree, (*path, ALPHA), alpha)  # the adapter's own alpha
    for path in modules:
        node = tree
        for part in path:
            node = node[part]
        if "A" not in node or "B" not in node:
            raise UserError(f"{adapter_dir} has lora_{'B' if 'A' in node else 'A'} of "
                            f"{'/'.join(path)} but not its partner; the adapter file is incomplete")
    spec = LoRASpec(r=int(pc["r"]), alpha=float(pc["lora_alpha"]),
                    dropout=float(pc.get("lora_dropout") or 0.0),
                    targets=tuple(re.escape("/".join(p)) for p in sorted(modules)))
    return PeftAdapter(tree, spec, head or None, pc.get("task_type"),
                       pc.get("base_model_name_or_path"), adapter_dir)


def single_alpha(lora_tree: dict) -> float:
    """The one alpha every adapter of `lora_tree` carries (a PEFT adapter has one)."""
    alphas = sorted(set(adapter_alphas(lora_tree).values()))
    if len(alphas) != 1:
        raise UserError(f"the adapters carry {len(alphas)} different alphas ({alphas}); a PEFT "
                        "LORA adapter has one lora_alpha, export each alpha group separately")
    return float(alphas[0])


def write_adapter(out_dir: str, tensors: dict[str, np.ndarray], peft_config: dict) -> None:
    """Write ``adapter_model.safetensors`` (float32) and ``adapter_config.json``."""
    from safetensors.numpy import save_file

    os.makedirs(out_dir, exist_ok=True)
    save_file({k: np.ascontiguousarray(np.asarray(v, np.float32)) for k, v in tensors.items()},
              os.path.join(out_dir, WEIGHTS_NAME))
    with open(os.path.join(out_dir, CONFIG_NAME), "w") as f:
        json.dump(peft_config, f, indent=2)


def lora_config_dict(*, r: int, alpha: float, dropout: float, targets, task_type: str | None,
                     modules_to_save: list[str] | None, base_model: str = "") -> dict:
    """A PEFT LoraConfig as adapter_config.json holds it (plain LoRA, nothing else)."""
    return {"peft_type": "LORA", "task_type": task_type, "r": r, "lora_alpha": alpha,
            "lora_dropout": dropout, "target_modules": sorted(targets),
            "modules_to_save": modules_to_save, "bias": "none", "fan_in_fan_out": False,
            "use_rslora": False, "use_dora": False, "init_lora_weights": True,
            "inference_mode": True, "base_model_name_or_path": base_model or None}


def lora_tensors(lora_tree: dict, names: dict[Path, str]) -> tuple[dict[str, np.ndarray], set]:
    """PEFT tensors of every adapter in `lora_tree` (named by `names`: Flax path -> PEFT module
    name) and the set of adapted module names."""
    tensors, modules = {}, set()
    for path, leaves in adapter_layers(lora_tree).items():
        if path not in names:
            raise UserError(f"adapter at {'/'.join(path)} has no PEFT name for this model")
        hf = names[path]
        modules.add(hf)
        tensors[f"{ROOT}{hf}.lora_A.weight"] = np.asarray(leaves["A"], np.float32).T
        tensors[f"{ROOT}{hf}.lora_B.weight"] = np.asarray(leaves["B"], np.float32).T
    return tensors, modules


# ---------------------------------------------------------------- BERT / DistilBERT / ELECTRA


def encoder_module_map(config: EncoderConfig) -> dict[str, Path]:
    """PEFT module name (``bert.encoder.layer.0.attention.self.query``) -> path in the
    classifier's ``lora`` collection (``("encoder", "layer_0", "attention", "query")``)."""
    prefix = ARCH_PREFIX[config.model_type]
    return {prefix + hf: ("encoder", *path) for path, hf in hf_module_map(config).items()}


def _layer_free(hf_module: str) -> str:
    """'bert.encoder.layer.3.attention.self.query' -> 'attention.self.query' (a PEFT target)."""
    return re.sub(r"^\w+\.(encoder|transformer)\.layer\.\d+\.", "", hf_module)


def import_peft(adapter: str, config: EncoderConfig) -> PeftAdapter:
    """Read a PEFT LoRA adapter (folder or hub id) of a BERT / DistilBERT / ELECTRA model."""
    return read_adapter(adapter, encoder_module_map(config), hf_head_name_map(config.model_type),
                        arch=config.model_type)


def complete_head(adapter_head: dict | None, checkpoint_head: dict | None, model_type: str,
                  source: str) -> dict:
    """The head a SEQ_CLS adapter runs with in PEFT: the adapter's modules_to_save over the base
    checkpoint's head. A module neither holds would be randomly initialised by transformers, so
    it is an error naming it."""
    head = {**(checkpoint_head or {}), **(adapter_head or {})}
    lacking = [hf for path, hf in hf_head_module_map(model_type).items()
               if path[0] not in head or {"kernel", "bias"} - set(head[path[0]])]
    if lacking:
        raise UserError(
            f"the classification head of {source} lacks {', '.join(lacking)} and the base "
            f"checkpoint has none: transformers would initialise it at random. Save the adapter "
            f"with modules_to_save={[hf.split('.')[0] for hf in hf_head_module_map(model_type).values()]}"
            " or use a base checkpoint that has the head")
    return head


def load_seq_cls(model: str, adapter: str):
    """(the base checkpoint, the adapter, the head PEFT runs it with) for a PEFT SEQ_CLS adapter
    of `model`; an adapter without a head on a base without one is refused."""
    from lora_jax.models.hf_import import load_pretrained

    pre = load_pretrained(model)
    peft = import_peft(adapter, pre.config)
    if peft.head is None and pre.head is None:
        raise UserError(f"adapter {adapter} carries no classification head (task_type "
                        f"{peft.task_type}) and {model} has none; a SEQ_CLS adapter is needed")
    return pre, peft, complete_head(peft.head, pre.head, pre.config.model_type, peft.source)


def linear_head_as_hf(head: dict, pooling: str, config: EncoderConfig) -> dict:
    """Our linear head in transformers' layout; only BERT with ``pooling="pooler"`` computes
    exactly what BertForSequenceClassification does."""
    if config.model_type == "bert" and pooling == "pooler":
        return {"classifier": head}
    raise UserError(f"a linear head on {pooling!r} pooling has no transformers equivalent for "
                    f"{config.model_type}; train with --config.head=hf (or, for BERT, "
                    "--config.pooling=pooler) to export the head, or export the adapters alone")


def export_peft(out_dir: str, lora_tree: dict, spec: LoRASpec, config: EncoderConfig,
                head: dict | None = None, base_model: str = "") -> None:
    """Write `lora_tree` (the ``lora`` collection of a SequenceClassifier) as a PEFT adapter.

    head: an `HFClassificationHead` tree to save as ``modules_to_save`` (task type SEQ_CLS), or
      None (adapters only; see `linear_head_as_hf` for a linear head).
    spec: r and dropout of the adapter; ``lora_alpha`` is the one the adapter tree carries.
    """
    alpha = single_alpha(lora_tree)
    names = {path: hf for hf, path in encoder_module_map(config).items()}
    tensors, modules = lora_tensors(lora_tree, names)
    modules_to_save = None
    if head is not None:
        tensors.update(head_state_dict(head, config.model_type, prefix=ROOT))
        modules_to_save = sorted({hf.split(".")[0]
                                  for hf in hf_head_module_map(config.model_type).values()})
    write_adapter(out_dir, tensors, lora_config_dict(
        r=spec.r, alpha=alpha, dropout=spec.dropout, targets={_layer_free(m) for m in modules},
        task_type="SEQ_CLS" if head is not None else None, modules_to_save=modules_to_save,
        base_model=base_model))
