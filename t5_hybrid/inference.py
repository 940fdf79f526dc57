"""A finished FLAN-T5 hybrid run applied to new text (`lora_jax.predict --workdir RUN`) and
exported (`lora_jax.export`): generation with the run's best soft prompt and LoRA adapters,
decoded as its evaluation decoded (greedy or beam, the run's max_target_length)."""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax

from lora_jax import data as data_lib
from lora_jax import lora as lora_lib
from lora_jax import metrics as metrics_lib
from lora_jax.errors import UserError
from lora_jax.runs import best_variables, run_config
from lora_jax.tasks import Task
from t5_hybrid import adapters
from t5_hybrid.data import encode_pairs, text_pairs
from t5_hybrid.generate import generate_texts, make_generate
from t5_hybrid.tasks import pairs_from_rows
from t5_hybrid.train import prepare


@dataclasses.dataclass
class T5Run:
    task: Task
    model: Any  # T5ForConditionalGeneration
    variables: dict  # {"params", "lora"?, "prompt"?}: the run's best
    tokenizer: Any
    config: Any  # the run's config
    prefix: str  # the task instruction of the variants without trained inputs
    batch_size: int

    @property
    def max_source(self) -> int:
        return self.config.max_source_length or self.task.max_source_length

    @property
    def max_target(self) -> int:
        return self.config.max_target_length or self.task.max_target_length

    def generate(self, sources: list[str], progress: bool = False) -> list[str]:
        """The generated text of every source (already prefixed), in input order."""
        pairs = encode_pairs(text_pairs(sources, [""] * len(sources)), self.tokenizer,
                             self.max_source, self.max_target, "input")
        generate = make_generate(self.model, self.max_target, num_beams=self.config.num_beams)
        return generate_texts(
            lambda ids, mask: generate(self.variables, ids, mask), pairs, self.batch_size,
            data_lib.bucket_lengths(self.max_source, self.config.buckets),
            data_lib.bucket_lengths(self.max_target, self.config.buckets), self.model.config,
            self.tokenizer, desc="generate", progress=progress)

    def sources_of(self, rows: list[dict], where: str) -> list[str]:
        if not rows:
            raise UserError(f"{where} has no rows to predict on")
        return [self.prefix + self.task.source_fn(row, where) for row in rows]

    def predict(self, rows: list[dict], where: str, progress: bool = False) -> list[dict]:
        return [{"prediction": t} for t in self.generate(self.sources_of(rows, where), progress)]

    def evaluate(self, rows: list[dict], outputs: list[dict], where: str) -> dict[str, float]:
        _, targets = pairs_from_rows(rows, self.task, where)
        return metrics_lib.compute(self.task.metrics, [o["prediction"] for o in outputs], targets)

    def attributions(self, rows: list[dict], where: str, steps: int = 64) -> list[dict]:
        from t5_hybrid.attribute import t5_attributions

        return t5_attributions(self, rows, where, steps)

    def plot_attributions(self, record: dict, path: str) -> None:
        from t5_hybrid.attribute import plot_matrix

        plot_matrix(record, path)

    def export(self, out_dir: str, fmt: str) -> str:
        from lora_jax.export import write_hf_folder
        from t5_hybrid.hf_import import to_hf_state_dict
        from t5_hybrid.peft_io import export_hybrid, export_t5_prompt

        variables = jax.device_get(self.variables)
        spec = lora_lib.LoRASpec(r=self.config.lora.r, alpha=self.config.lora.alpha,
                                 dropout=self.config.lora.dropout,
                                 targets=tuple(self.config.lora.targets))
        base = "" if self.config.model.startswith("random:") else self.config.model
        if fmt == "peft":
            written = export_hybrid(out_dir, variables, spec, self.model.config, base)
            return (f"PEFT adapter(s) {', '.join(written)} in {out_dir} (load: see "
                    "t5_hybrid/peft_io.py)")
        if fmt != "merged":
            raise UserError(f"--format {fmt!r} is unknown; use peft or merged")
        params = lora_lib.merge(variables["params"], variables.get("lora", {}))
        write_hf_folder(out_dir, to_hf_state_dict(params, self.model.config),
                        self.model.config.to_hf(), self.tokenizer)
        note = ""
        if variables.get("prompt"):  # a soft prompt is an input, not a weight: it stays apart
            export_t5_prompt(os.path.join(out_dir, "prompt"), variables["prompt"], base)
            note = (f"; the soft prompt as a PEFT PROMPT_TUNING adapter in "
                    f"{os.path.join(out_dir, 'prompt')} (PeftModel.from_pretrained(model, it))")
        return f"transformers T5 (LoRA merged) in {out_dir}{note}"


def t5_run(workdir: str, results: dict) -> T5Run:
    """The T5 hybrid run in `workdir` with its best adapters."""
    config = run_config(results)
    config.progress = False
    setup = prepare(config, with_data=False)
    prefix = setup.task.prefix if adapters.uses_prefix(config.variant) else ""
    return T5Run(setup.task, setup.model, best_variables(workdir, setup.trainable, setup.frozen),
                 setup.tokenizer, config, prefix, config.eval_batch_size)
