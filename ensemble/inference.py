"""A finished AttEns run applied to new text (`lora_jax.predict --workdir RUN`): the base
encoder with the k frozen modules makes each row's features, the run's best combiner
classifies them, in the batches its evaluation used."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np

from ensemble.combiner import build_combiner, combiner_method
from ensemble.features import FeatureExtractor, FeatureSplit, build_feature_extractor, map_combiner
from lora_jax import data as data_lib
from lora_jax.checkpoint import restore_trainable
from lora_jax.errors import UserError
from lora_jax.inference import ClassificationRun
from lora_jax.runs import run_config
from lora_jax.tasks import Task, resolve_task


@dataclasses.dataclass
class AttensRun(ClassificationRun):
    task: Task
    extractor: FeatureExtractor
    combiner: Any  # a combiner of ensemble.combiner (build_combiner)
    params: dict  # the combiner's best parameters
    batch_size: int  # the run's eval_batch_size (the batch-axis quirk depends on it)
    feature_batch_size: int

    def logits(self, texts: list[tuple[str, ...]], progress: bool = False) -> np.ndarray:
        """(N, num_labels) float32 combiner logits."""
        fx = self.extractor
        enc = data_lib.encode(data_lib.Examples(texts, np.zeros(len(texts), np.int32)),
                              fx.tokenizer, fx.max_length)
        modules, base = fx.features(enc, self.feature_batch_size, progress=progress)
        split = FeatureSplit(modules[:, : fx.slots], base, enc.labels, 0.0, False)
        apply = jax.jit(lambda p, b: self.combiner.apply(p, b["modules"], b["base"],
                                                         row_mask=b["weights"] > 0))
        return map_combiner(lambda b: apply(self.params, b), split, self.batch_size)

    def export(self, out_dir: str, fmt: str) -> str:
        raise UserError("an AttEns run is a combiner over a module set, not an adapter; export "
                        "the modules' own FT_LoRA runs (python -m lora_jax.export --workdir "
                        "<module run>)")


def attens_run(workdir: str, results: dict) -> ClassificationRun:
    """The AttEns run in `workdir` with its best combiner (a fusion run: `FusionRun`)."""
    config = run_config(results)
    config.progress = False
    if combiner_method(config) == "fusion":
        from ensemble.fusion import fusion_run

        return fusion_run(workdir, config)
    task = resolve_task(config)
    fx = build_feature_extractor(config)
    combiner = build_combiner(config, task.num_labels, fx.hidden_size)
    params, _ = restore_trainable(workdir, "best_trainable")
    return AttensRun(task, fx, combiner, jax.device_get(params), config.eval_batch_size,
                     config.feature_batch_size)
