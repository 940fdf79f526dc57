"""LoRA adapters to and from the Hugging Face PEFT format.

A PEFT adapter folder holds ``adapter_config.json`` and ``adapter_model.safetensors`` with keys
``base_model.model.<arch>.<module>.lora_A.weight`` of shape (r, in) and ``...lora_B.weight``
(out, r); our Flax ``A`` (in, r) and ``B`` (r, out) are their transposes. For BERT the linear
head can travel too, as ``base_model.model.classifier.{weight,bias}`` (``modules_to_save``);
it equals transformers' `BertForSequenceClassification` when the model uses ``pooling="pooler"``.
"""

from __future__ import annotations

import json
import os
import re

import numpy as np

from lora_jax.errors import UserError
from lora_jax.lora import ALPHA, LoRASpec, adapter_alphas
from lora_jax.models import EncoderConfig
from lora_jax.models.hf_import import hf_module_map

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
_ARCH_PREFIX = {"bert": "bert.", "distilbert": "distilbert.", "electra": "electra."}
_ROOT = "base_model.model."


def _layer_free(hf_module: str) -> str:
    """'encoder.layer.3.attention.self.query' -> 'attention.self.query' (a PEFT target name)."""
    return re.sub(r"^(encoder|transformer)\.layer\.\d+\.", "", hf_module)


def export_peft(out_dir: str, lora_tree: dict, spec: LoRASpec, config: EncoderConfig,
                head: dict | None = None, base_model: str = "") -> None:
    """Write `lora_tree` (the ``lora`` collection of a SequenceClassifier) as a PEFT adapter.

    head: the ``params["head"]`` tree ({"kernel": (d, C), "bias": (C,)}) to save as the BERT
      classifier, or None.
    spec: r and dropout of the adapter; ``lora_alpha`` is the one the adapter tree carries.
    """
    from safetensors.numpy import save_file

    module_map = hf_module_map(config)
    prefix = _ROOT + _ARCH_PREFIX[config.model_type]
    alphas = sorted(set(adapter_alphas(lora_tree).values()))
    if len(alphas) != 1:
        raise UserError(f"the adapters carry {len(alphas)} different alphas ({alphas}); a PEFT "
                        "LORA adapter has one lora_alpha, export each alpha group separately")
    tensors, targets = {}, set()
    for layer_path, leaves in _encoder_adapters(lora_tree).items():
        hf = module_map[layer_path]
        targets.add(_layer_free(hf))
        tensors[f"{prefix}{hf}.lora_A.weight"] = np.ascontiguousarray(np.asarray(leaves["A"]).T)
        tensors[f"{prefix}{hf}.lora_B.weight"] = np.ascontiguousarray(np.asarray(leaves["B"]).T)
    modules_to_save = None
    if head is not None:
        if config.model_type != "bert":
            raise UserError("the head can be exported for BERT only (DistilBERT and ELECTRA "
                            "classification heads have extra layers); export adapters alone")
        tensors[_ROOT + "classifier.weight"] = np.ascontiguousarray(np.asarray(head["kernel"]).T)
        tensors[_ROOT + "classifier.bias"] = np.asarray(head["bias"])
        modules_to_save = ["classifier"]
    os.makedirs(out_dir, exist_ok=True)
    save_file({k: v.astype(np.float32) for k, v in tensors.items()},
              os.path.join(out_dir, WEIGHTS_NAME))
    with open(os.path.join(out_dir, CONFIG_NAME), "w") as f:
        json.dump({"peft_type": "LORA", "task_type": "SEQ_CLS" if head is not None else None,
                   "r": spec.r, "lora_alpha": alphas[0], "lora_dropout": spec.dropout,
                   "target_modules": sorted(targets), "modules_to_save": modules_to_save,
                   "bias": "none", "fan_in_fan_out": False, "use_rslora": False,
                   "use_dora": False, "init_lora_weights": True, "inference_mode": True,
                   "base_model_name_or_path": base_model or None}, f, indent=2)


def _encoder_adapters(lora_tree: dict) -> dict[tuple, dict]:
    from flax import traverse_util

    grouped: dict[tuple, dict] = {}
    for path, leaf in traverse_util.flatten_dict(lora_tree.get("encoder", {})).items():
        grouped.setdefault(path[:-1], {})[path[-1]] = leaf
    return grouped


def import_peft(adapter_dir: str, config: EncoderConfig) -> tuple[dict, LoRASpec, dict | None]:
    """Read a PEFT LoRA adapter: (lora_tree, spec, head or None), in our Flax layout."""
    from safetensors.numpy import load_file

    cfg_path = os.path.join(adapter_dir, CONFIG_NAME)
    if not os.path.isfile(cfg_path):
        raise UserError(f"{adapter_dir!r} has no {CONFIG_NAME}; point at a PEFT adapter folder")
    with open(cfg_path) as f:
        pc = json.load(f)
    if pc.get("peft_type") != "LORA":
        raise UserError(f"{cfg_path} is a {pc.get('peft_type')} adapter; only LORA is supported")
    unsupported = [k for k in ("use_rslora", "use_dora", "fan_in_fan_out") if pc.get(k)]
    unsupported += [k for k in ("rank_pattern", "alpha_pattern") if pc.get(k)]
    if unsupported:
        raise UserError(f"{cfg_path} uses {', '.join(unsupported)}, which this loader does not "
                        "implement; export a plain LoRA adapter")
    state = load_file(os.path.join(adapter_dir, WEIGHTS_NAME))
    by_hf = {hf: path for path, hf in hf_module_map(config).items()}
    prefix = _ROOT + _ARCH_PREFIX[config.model_type]
    tree: dict = {}
    modules: set[str] = set()
    head = None
    for key, value in state.items():
        if key.startswith(_ROOT + "classifier."):
            head = head or {}
            head["kernel" if key.endswith("weight") else "bias"] = (
                value.T if key.endswith("weight") else value)
            continue
        m = re.fullmatch(re.escape(prefix) + r"(.+)\.lora_([AB])\.(?:\w+\.)?weight", key)
        if not m or m.group(1) not in by_hf:
            raise UserError(f"adapter tensor {key} does not map onto a {config.model_type} "
                            "layer; was it trained on another architecture?")
        modules.add("/".join(("encoder", *by_hf[m.group(1)])))
        node = tree.setdefault("encoder", {})
        for part in by_hf[m.group(1)]:
            node = node.setdefault(part, {})
        node[m.group(2)] = np.asarray(value.T, np.float32)
        node[ALPHA] = np.asarray(pc["lora_alpha"], np.float32)  # the adapter's own alpha
    spec = LoRASpec(r=int(pc["r"]), alpha=float(pc["lora_alpha"]),
                    dropout=float(pc.get("lora_dropout") or 0.0),
                    targets=tuple(re.escape(m) for m in sorted(modules)))
    return tree, spec, head
