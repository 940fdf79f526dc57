"""The FLAN-T5 hybrid's adapters as PEFT adapters: LoRA as a ``LORA`` adapter, the soft prompt
as a ``PROMPT_TUNING`` adapter (task type ``SEQ_2_SEQ_LM``).

PEFT runs one kind at a time on a model, so the hybrid loads into PyTorch in two steps: fold the
LoRA adapter into the weights, then wrap the result with the prompt::

    from peft import PeftModel
    from transformers import AutoModelForSeq2SeqLM

    t5 = AutoModelForSeq2SeqLM.from_pretrained("google/flan-t5-base")
    t5 = PeftModel.from_pretrained(t5, "OUT/lora").merge_and_unload()
    hybrid = PeftModel.from_pretrained(t5, "OUT/prompt")   # soft prompt before every input

`tests/test_t5_peft.py` checks that this model's teacher-forced logits equal ours (1e-4), and
that adapters made that way in PyTorch import here with PEFT's logits.
"""

from __future__ import annotations

import os

import numpy as np

from lora_jax.errors import UserError
from lora_jax.lora import LoRASpec
from lora_jax.peft_io import (
    PeftAdapter,
    lora_config_dict,
    lora_tensors,
    read_adapter,
    read_adapter_config,
    read_adapter_tensors,
    resolve_adapter_dir,
    single_alpha,
    write_adapter,
)
from t5_hybrid.config import T5Config
from t5_hybrid.hf_import import hf_name_map

PROMPT_KEY = "prompt_embeddings"
Path = tuple[str, ...]


def t5_module_map(config: T5Config) -> dict[str, Path]:
    """PEFT module name (``encoder.block.0.layer.0.SelfAttention.q``) -> path in the ``lora``
    collection (``("encoder", "blocks_0", "self_attention", "q")``), for every Linear."""
    return {name.removesuffix(".weight"): path[:-1]
            for name, (path, transform) in hf_name_map(config).items()
            if transform == "T" and name != "lm_head.weight"}


def import_t5_lora(adapter: str, config: T5Config) -> PeftAdapter:
    """A PEFT LORA adapter of a T5 model (folder or hub id), in our ``lora`` layout."""
    return read_adapter(adapter, t5_module_map(config), arch="T5")


def export_t5_lora(out_dir: str, lora_tree: dict, spec: LoRASpec, config: T5Config,
                   base_model: str = "") -> None:
    """Write the hybrid's ``lora`` collection as a PEFT LORA adapter (SEQ_2_SEQ_LM)."""
    names = {path: hf for hf, path in t5_module_map(config).items()}
    tensors, modules = lora_tensors(lora_tree, names)
    targets = {m.rsplit(".", 1)[-1] for m in modules}  # q, k, v, o, wi, wo: PEFT's T5 names
    write_adapter(out_dir, tensors, lora_config_dict(
        r=spec.r, alpha=single_alpha(lora_tree), dropout=spec.dropout, targets=targets,
        task_type="SEQ_2_SEQ_LM", modules_to_save=None, base_model=base_model))


def export_t5_prompt(out_dir: str, prompt: dict, base_model: str = "") -> None:
    """Write the soft prompt ``{"embedding": (P, d)}`` as a PEFT PROMPT_TUNING adapter."""
    embedding = np.asarray(prompt["embedding"], np.float32)
    write_adapter(out_dir, {PROMPT_KEY: embedding}, {
        "peft_type": "PROMPT_TUNING", "task_type": "SEQ_2_SEQ_LM",
        "num_virtual_tokens": int(embedding.shape[0]), "token_dim": int(embedding.shape[1]),
        "num_transformer_submodules": 1, "prompt_tuning_init": "RANDOM",
        "inference_mode": True, "base_model_name_or_path": base_model or None})


def import_t5_prompt(adapter: str, config: T5Config) -> dict:
    """A PEFT PROMPT_TUNING adapter as the hybrid's ``prompt`` collection ``{"embedding"}``.

    PEFT keeps ``num_transformer_submodules`` x P rows for a seq2seq model but feeds only the
    first P to the encoder (prompt tuning never touches the decoder's inputs); those are read.
    """
    folder = resolve_adapter_dir(adapter)
    pc = read_adapter_config(folder, peft_type="PROMPT_TUNING")
    if pc.get("task_type") not in (None, "SEQ_2_SEQ_LM"):
        raise UserError(f"{folder} is a {pc['task_type']} prompt; the hybrid needs SEQ_2_SEQ_LM")
    tensors = read_adapter_tensors(folder)
    unknown = [k for k in tensors if k != PROMPT_KEY]
    if unknown or PROMPT_KEY not in tensors:
        raise UserError(f"{folder} holds {', '.join(unknown) or 'no ' + PROMPT_KEY}; a "
                        f"PROMPT_TUNING adapter holds only {PROMPT_KEY}")
    p, d = int(pc["num_virtual_tokens"]), int(pc.get("token_dim") or config.d_model)
    table = tensors[PROMPT_KEY]
    if d != config.d_model or table.shape[1] != config.d_model or table.shape[0] < p:
        raise UserError(f"{folder}: prompt of shape {table.shape} (num_virtual_tokens {p}, "
                        f"token_dim {d}) does not fit a T5 with d_model {config.d_model}")
    return {"embedding": np.asarray(table[:p], np.float32)}


def export_hybrid(out_dir: str, variables: dict, spec: LoRASpec, config: T5Config,
                  base_model: str = "") -> list[str]:
    """``OUT/lora`` and/or ``OUT/prompt`` for whichever of the two the variables hold."""
    written = []
    if variables.get("lora"):
        export_t5_lora(os.path.join(out_dir, "lora"), variables["lora"], spec, config,
                       base_model)
        written.append("lora")
    if variables.get("prompt"):
        export_t5_prompt(os.path.join(out_dir, "prompt"), variables["prompt"], base_model)
        written.append("prompt")
    if not written:
        raise UserError("this T5 run has no LoRA adapters or soft prompt (variant base or "
                        "full_finetune); use --format merged")
    return written

