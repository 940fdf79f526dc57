"""Export a finished run for PyTorch tools.

    python -m lora_jax.export --workdir RUN --format peft --out DIR
    python -m lora_jax.export --workdir RUN --format merged --out DIR

``peft``: the LoRA adapters (and the classification head, as ``modules_to_save``) in PEFT's
layout; load with ``PeftModel.from_pretrained(AutoModelForSequenceClassification
.from_pretrained(BASE, num_labels=C), DIR)``. ``merged``: a transformers model folder
(``config.json``, ``model.safetensors`` with every adapter folded into its kernel, the head, the
tokenizer) that ``AutoModelForSequenceClassification.from_pretrained(DIR)`` loads with the same
logits. The run's best checkpoint (the one its results.json reports) is exported.
"""

from __future__ import annotations

import logging
import os
import sys

import numpy as np

from lora_jax.cli import ArgumentParser, run_main
from lora_jax.errors import UserError

FORMATS = ("peft", "merged")
log = logging.getLogger(__name__)


def _hf_head(run) -> dict | None:
    """The run's head in transformers' layout, or None (with the reason logged) when the run's
    linear head has no transformers equivalent."""
    from lora_jax.peft_io import linear_head_as_hf

    head = run.variables["params"]["head"]
    if run.model.head == "hf":
        return head
    try:
        return linear_head_as_hf(head, run.pooling, run.model.config)
    except UserError as e:
        log.warning("the head is not exported: %s", e)
        return None


def export_classifier(run, out_dir: str, fmt: str) -> str:
    """Write `run` (a `lora_jax.inference.ClassifierRun`) as `fmt`; returns what was written."""
    import jax

    from lora_jax import lora as lora_lib
    from lora_jax.models.hf_import import ARCH_PREFIX, head_state_dict, to_hf_state_dict
    from lora_jax.peft_io import export_peft

    cfg = run.model.config
    variables = jax.device_get(run.variables)
    if fmt == "peft":
        if not variables.get("lora"):
            raise UserError("this run has no LoRA adapters (an FFN, zero-shot or full run); "
                            "use --format merged")
        head = _hf_head(run)
        export_peft(out_dir, variables["lora"], run.spec, cfg, head=head, base_model=run.model_dir)
        return f"PEFT adapter{' and head' if head is not None else ' (no head)'} in {out_dir}"
    if fmt != "merged":
        raise UserError(f"--format {fmt!r} is unknown; use one of {', '.join(FORMATS)}")
    head = _hf_head(run)
    if head is None:
        raise UserError("a merged transformers model needs a transformers head; train with "
                        "--config.head=hf (or BERT with --config.pooling=pooler)")
    params = lora_lib.merge(variables["params"], variables.get("lora", {}))
    state = to_hf_state_dict(params["encoder"], cfg, prefix=ARCH_PREFIX[cfg.model_type])
    state.update(head_state_dict(head, cfg.model_type))
    write_hf_folder(out_dir, state, classifier_config(cfg, run.task), run.tokenizer)
    return f"transformers model (adapters merged) in {out_dir}"


def classifier_config(cfg, task) -> dict:
    """config.json of the ``<Model>ForSequenceClassification`` for `task`."""
    from lora_jax.models.hf_import import hf_config_dict

    arch = {"bert": "Bert", "distilbert": "DistilBert", "electra": "Electra"}[cfg.model_type]
    names = task.label_names or tuple(f"LABEL_{i}" for i in range(task.num_labels))
    d = hf_config_dict(cfg)
    d.update({"architectures": [f"{arch}ForSequenceClassification"],
              "num_labels": task.num_labels,
              "id2label": {str(i): n for i, n in enumerate(names)},
              "label2id": {n: i for i, n in enumerate(names)}})
    if task.is_regression:
        d["problem_type"] = "regression"
    return d


def write_hf_folder(out_dir: str, state: dict, config: dict, tokenizer) -> None:
    """config.json, model.safetensors (float32) and the tokenizer files in `out_dir`."""
    import json

    from safetensors.numpy import save_file

    os.makedirs(out_dir, exist_ok=True)
    save_file({k: np.ascontiguousarray(np.asarray(v, np.float32)) for k, v in state.items()},
              os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)


def main(argv=None) -> int:
    p = ArgumentParser(prog="python -m lora_jax.export", description=__doc__.splitlines()[0])
    p.add_argument("--workdir", required=True, help="a finished run (train.py --workdir)")
    p.add_argument("--format", required=True, choices=FORMATS)
    p.add_argument("--out", required=True, help="folder to write")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")

    def body():
        from lora_jax.runs import load_run

        if os.path.exists(args.out) and os.listdir(args.out):
            raise UserError(f"--out {args.out} exists and is not empty; choose a new folder")
        print(load_run(args.workdir).export(args.out, args.format))

    return run_main(body)


if __name__ == "__main__":
    sys.exit(main())
