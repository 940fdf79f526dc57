"""The sharding plan of lora_jax.sharding: mesh shapes, which dimension each weight splits on,
LoRA factors following their kernel, and a flan-t5-xl-sized plan made from abstract shapes.
(Training on a real 8-device (data 2, fsdp 4) mesh: tests/test_train.py.)"""

from __future__ import annotations

import jax
import numpy as np
import pytest
from jax.sharding import AbstractMesh
from jax.sharding import PartitionSpec as P

from lora_jax import lora
from lora_jax.errors import UserError
from lora_jax.sharding import Placement, mesh_shape, planned_bytes


def abstract(data: int, fsdp: int) -> Placement:
    return Placement(AbstractMesh((data, fsdp), ("data", "fsdp")))


def spec(sharding) -> P:
    return sharding.spec


def test_mesh_shape_takes_the_rest_and_refuses_what_does_not_fit():
    assert mesh_shape((-1, 1), 8) == (8, 1)
    assert mesh_shape((2, -1), 8) == (2, 4)
    assert mesh_shape((2, 4), 8) == (2, 4)
    for bad in ((3, -1), (2, 2), (0, 8), (-1, 3), (2,), "2,4", (2.0, 4)):
        with pytest.raises(UserError, match="mesh.shape"):
            mesh_shape(bad, 8)


def test_weights_split_on_their_largest_divisible_dimension_and_lora_follows():
    f32 = lambda *s: jax.ShapeDtypeStruct(s, np.float32)
    tree = {"params": {"wide": f32(64, 256), "tall": f32(256, 64), "odd": f32(6, 10),
                       "bias": f32(256)},
            "lora": {"wide": {"A": f32(64, 4), "B": f32(4, 256), "alpha": f32()},
                     "tall": {"A": f32(256, 4), "B": f32(4, 64), "alpha": f32()}},
            "prompt": {"embedding": f32(8, 64)}}
    plan = abstract(2, 4).shardings(tree)
    assert spec(plan["params"]["wide"]) == P(None, "fsdp")
    assert spec(plan["params"]["tall"]) == P("fsdp", None)
    assert spec(plan["params"]["odd"]) == P()  # nothing divides by 4
    assert spec(plan["params"]["bias"]) == P("fsdp")
    # the factor on the kernel's split side is split the same way, the other replicated
    assert spec(plan["lora"]["wide"]["B"]) == P(None, "fsdp")
    assert spec(plan["lora"]["wide"]["A"]) == P()
    assert spec(plan["lora"]["tall"]["A"]) == P("fsdp", None)
    assert spec(plan["lora"]["tall"]["B"]) == P()
    assert spec(plan["lora"]["wide"]["alpha"]) == P() and spec(plan["prompt"]["embedding"]) == P()
    # fsdp = 1: the same code, nothing split
    assert all(spec(s) == P() for s in jax.tree_util.tree_leaves(abstract(8, 1).shardings(tree)))


def test_flan_t5_xl_plan_from_abstract_shapes_holds_a_quarter_per_device():
    """flan-t5-xl's shapes (d_model 2048, 24 + 24 layers, 32128 vocabulary), never allocated:
    `jax.eval_shape` of init, then the (data 2, fsdp 4) plan of its frozen base."""
    from t5_hybrid import adapters
    from t5_hybrid.config import T5Config
    from t5_hybrid.model import T5ForConditionalGeneration

    cfg = T5Config(vocab_size=32128, d_model=2048, d_kv=64, d_ff=5120, num_layers=24,
                   num_decoder_layers=24, num_heads=32, feed_forward_proj="gated-gelu",
                   tie_word_embeddings=False)
    model = T5ForConditionalGeneration(cfg)
    ids = jax.numpy.zeros((1, 4), jax.numpy.int32)
    spec_ = lora.LoRASpec(r=4, alpha=4.0, targets=("q", "v"))
    variables = jax.eval_shape(lambda key: adapters.init_variables(
        key, model.init(key, ids, ids, ids)["params"], "prompt_lora", spec_, 30),
        jax.random.PRNGKey(0))
    trainable, frozen = lora.split(variables, lora.trainable_mask(
        variables, adapters.trainable_patterns("prompt_lora")))
    place = abstract(2, 4)
    whole, per_device = planned_bytes(frozen, place.shardings(frozen))
    print(f"flan-t5-xl frozen base: {whole / 2**30:.2f} GiB replicated, "
          f"{per_device / 2**30:.2f} GiB per device on (data 2, fsdp 4)")
    assert 10.5 < whole / 2**30 < 11.5  # ~2.85B parameters in fp32
    assert per_device * 4 == whole  # every T5 weight has a dimension 4 divides
    t_whole, t_per_device = planned_bytes(trainable, place.shardings(trainable))
    assert t_per_device < t_whole  # each LoRA pair's factor on the split side is split too
