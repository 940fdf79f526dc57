"""``combiner.method="fusion"``: AdapterFusion over the k frozen modules inside every adapted
layer (`lora_jax.fusion`), trained on the target task through the shared pipeline.

Where the other methods combine the modules' pooled outputs (cached once), fusion attends over
the modules' LoRA deltas in every adapted projection, so nothing can be cached: each step runs
the frozen base with the k modules stacked in one batched pass, and only the fusion kernels
(query, key, value per adapted projection) and the head train. The head is the one the other
methods share (`ensemble.combiner.MixCombiner` on one slot: LayerNorm, dropout, Linear) over
the Agg1 (``combiner.agg1``) of the last hidden states. The run is a classifier run with this
model (`lora_jax.classifier.Setup`/`experiment`): same step, loop, selection, checkpoints,
results record and predict path.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ensemble.combiner import MixCombiner
from ensemble.features import aggregate_tokens, build_feature_extractor, module_digests
from ensemble.modules import Module
from lora_jax import classifier, trainer
from lora_jax import data as data_lib
from lora_jax import lora as lora_lib
from lora_jax.config_check import validate_config
from lora_jax.distributed import BatchShare
from lora_jax.errors import UserError
from lora_jax.fusion import TRAINABLE_PATTERN, init_fusion
from lora_jax.inference import ClassifierRun
from lora_jax.models import EncoderConfig
from lora_jax.models.encoder import Encoder
from lora_jax.runs import best_variables
from lora_jax.sharding import mesh_of
from lora_jax.tasks import resolve_task

# what trains: the fusion kernels of every adapted layer and the head
TRAINABLE = (TRAINABLE_PATTERN, "^params/combiner/")


class FusedClassifier(nn.Module):
    """Encoder (with a fused "lora" tree) -> Agg1 over tokens -> LayerNorm, dropout, Linear.
    Called like `lora_jax.models.SequenceClassifier`; returns float32 logits (B, C)."""

    config: EncoderConfig
    num_classes: int
    agg1: str = "mean"
    lora_dropout: float = 0.0
    dropout: float = 0.1
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, input_ids, attention_mask, token_type_ids=None,
                 deterministic: bool = True):
        hidden, _ = Encoder(self.config, lora_dropout=self.lora_dropout, dtype=self.dtype,
                            name="encoder")(input_ids, attention_mask, token_type_ids,
                                            deterministic=deterministic)
        pooled = aggregate_tokens(hidden, attention_mask, self.agg1)  # (B, d)
        return MixCombiner(self.num_classes, dropout=self.dropout, name="combiner")(
            pooled[:, None], pooled, deterministic=deterministic)


def check_fusion_config(config) -> None:
    """The settings fusion cannot honour, each refused by name."""
    if config.combiner.output != "hidden":
        raise UserError("combiner.method='fusion' attends over the modules' deltas inside the "
                        "encoder and reads its last hidden states; use combiner.output='hidden'")
    on = [k for k in ("attend_across_batch", "shared_layernorm", "count_padding",
                      "encoder_dropout") if config.quirks[k]]
    if on:
        raise UserError(f"quirks.{on[0]} reproduces the authors' AttEns code; "
                        "combiner.method='fusion' has no such step, turn the quirk off")


def prepare(config, with_data: bool = True) -> tuple[classifier.Setup, list[Module]]:
    """(the classifier Setup of a fusion run, the modules it combines, in order). Validates and
    loads everything before anything is written; `with_data` False for prediction."""
    validate_config(config)
    check_fusion_config(config)
    if with_data and config.num_epochs < 1:
        raise UserError("combiner.method='fusion' trains the fusion: num_epochs must be at "
                        "least 1")
    share = BatchShare.of_this_process(mesh_of(config), batch_size=config.batch_size,
                                       eval_batch_size=config.eval_batch_size)
    task = resolve_task(config)
    examples, sources = {}, {}
    if with_data:
        examples, sources = data_lib.load_examples(
            data_lib.DataSource.of(config), task, data_lib.SplitSizes.of(config), config.seed)
    fx = build_feature_extractor(config)
    modules = fx.module_set.modules[: fx.k]
    key_fusion, key_head = jax.random.split(jax.random.PRNGKey(config.seed))
    fused = init_fusion([m.lora for m in modules], [m.task for m in modules], key_fusion)
    model = FusedClassifier(fx.encoder_config, task.num_labels, config.combiner.agg1,
                            fx.module_set.spec.dropout, config.combiner.dropout,
                            lora_lib.DTYPES[config.dtype])
    d = fx.hidden_size
    head = jax.jit(MixCombiner(task.num_labels, dropout=config.combiner.dropout).init)(
        key_head, jnp.zeros((1, 1, d)), jnp.zeros((1, d)))["params"]
    variables = {"params": {"encoder": fx.base_params, "combiner": head},
                 "lora": {"encoder": fused}}
    trainable, frozen = lora_lib.split(variables, lora_lib.trainable_mask(variables, TRAINABLE))
    splits = {name: data_lib.encode(ex, fx.tokenizer, fx.max_length)
              for name, ex in examples.items()}
    setup = classifier.Setup(config, task, fx.model, fx.encoder_config, model, frozen, trainable,
                             splits, fx.pad_id, fx.pad_to, sources, fx.tokenizer, fx.max_length,
                             share)
    return setup, modules


def experiment(setup: classifier.Setup, module_list: list[Module]) -> trainer.Experiment:
    """The fusion run as an `Experiment`: the classifier's, recorded as an AttEns-experiment
    run of method fusion (the report's row beside the paper's)."""
    cfg, task = setup.config, setup.task
    exp = classifier.experiment(setup)
    modules, digests = [m.task for m in module_list], module_digests(module_list)

    def extra(_best) -> dict:
        return {"k": len(modules), "modules": modules, "module_sha256": digests,
                "method": "fusion",
                "unseen": task.name not in modules, "attention": None, "module_weights": None,
                "merge_weights": None, "lorahub_search": None, "feature_seconds": {},
                "feature_cache_hits": {}, "quirks": cfg.quirks.to_dict(),
                "combiner": cfg.combiner.to_dict()}

    return dataclasses.replace(
        exp, name="attens", model=setup.model_dir,
        meta={"task": task.name, "experiment": "attens", "modules": modules,
              "config": cfg.to_dict()},
        desc=f"fusion {task.name} k={len(modules)}", extra=extra)


def train_fusion(config, workdir: str) -> dict[str, Any]:
    """Train the fusion kernels and the head; returns (and writes) the results record."""
    wall_start = time.perf_counter()
    setup, modules = prepare(config)
    return trainer.run_experiment(experiment(setup, modules), workdir, wall_start)


@dataclasses.dataclass
class FusionRun(ClassifierRun):
    """A finished fusion run: `predict` as any classifier run; no adapter to export."""

    def export(self, out_dir: str, fmt: str) -> str:
        raise UserError("a fusion run combines a module set inside the encoder, it is not one "
                        "adapter; export the modules' own FT_LoRA runs (python -m "
                        "lora_jax.export --workdir <module run>)")


def fusion_run(workdir: str, config) -> FusionRun:
    """The fusion run in `workdir` (its config already read) with its best kernels and head."""
    setup, _ = prepare(config, with_data=False)
    return FusionRun(setup.task, setup.model,
                     best_variables(workdir, setup.trainable, setup.frozen), setup.tokenizer,
                     setup.max_length, setup.buckets, setup.pad_id, config.eval_batch_size,
                     setup.model_dir, None, config.combiner.agg1, config)
