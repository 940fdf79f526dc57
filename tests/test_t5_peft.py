"""The T5 hybrid's adapters in and out of PEFT: LoRA as LORA, the soft prompt as PROMPT_TUNING,
loaded into one PyTorch model as `t5_hybrid.peft_io` documents; teacher-forced logits (1e-4)."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lora_jax import lora
from lora_jax.errors import UserError
from t5_hybrid.peft_io import export_hybrid, import_t5_lora, import_t5_prompt
from tests.test_t5_model import _flax, _inputs, _torch_t5

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

PROMPT = 5


def _randomise(model, pattern: str, scale: float, seed: int):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if pattern in name:
                p.copy_(torch.randn(p.shape, generator=gen) * scale)


def _documented_hybrid(base, lora_dir, prompt_dir):
    """The recipe of the t5_hybrid.peft_io docstring: merge the LoRA, then wrap with the prompt."""
    merged = peft.PeftModel.from_pretrained(base, str(lora_dir)).merge_and_unload()
    return peft.PeftModel.from_pretrained(merged, str(prompt_dir)).eval()


def _torch_logits(model, ids, mask, dec):
    with torch.no_grad():
        return model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                     decoder_input_ids=torch.tensor(dec)).logits.numpy()


def _decoder_inputs():
    dec = np.random.default_rng(1).integers(2, 97, (3, 7))
    dec[:, 0] = 0
    return dec


def test_pytorch_made_lora_and_prompt_import_with_pefts_logits(tmp_path):
    base = _torch_t5("v1.1")
    model, variables = _flax(base)  # the frozen weights, before PEFT touches the module
    pl = peft.get_peft_model(base, peft.LoraConfig(task_type="SEQ_2_SEQ_LM", r=4, lora_alpha=8,
                                                   target_modules=["q", "v", "wo"]))
    _randomise(pl, "lora_B", 0.3, seed=1)
    pl.save_pretrained(tmp_path / "lora")
    merged = pl.merge_and_unload()
    pp = peft.get_peft_model(merged, peft.PromptTuningConfig(task_type="SEQ_2_SEQ_LM",
                                                             num_virtual_tokens=PROMPT))
    _randomise(pp, "prompt_encoder", 1.0, seed=2)
    pp.save_pretrained(tmp_path / "prompt")
    # PEFT keeps 2 x P rows for seq2seq and feeds the first P to the encoder.
    assert json.loads((tmp_path / "prompt" / "adapter_config.json").read_text())[
        "num_transformer_submodules"] == 2
    ids, mask = _inputs()
    dec = _decoder_inputs()
    theirs = _torch_logits(pp.eval(), ids, mask, dec)
    cfg = model.config
    adapter = import_t5_lora(str(tmp_path / "lora"), cfg)
    prompt = import_t5_prompt(str(tmp_path / "prompt"), cfg)
    assert prompt["embedding"].shape == (PROMPT, cfg.d_model)
    ours = model.apply({**variables, "lora": adapter.lora, "prompt": prompt},
                       jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(dec))
    without_prompt = model.apply({**variables, "lora": adapter.lora}, jnp.asarray(ids),
                                 jnp.asarray(mask), jnp.asarray(dec))
    assert np.abs(np.asarray(without_prompt) - theirs).max() > 1e-2  # the prompt matters
    np.testing.assert_allclose(np.asarray(ours), theirs, atol=1e-4, rtol=1e-4)


def test_our_lora_and_prompt_load_in_pytorch_with_our_logits(tmp_path):
    base = _torch_t5("v1.1", seed=5)
    model, variables = _flax(base)
    spec = lora.LoRASpec(r=2, alpha=6.0, targets=("q", "k", "v", "o", "wi_0", "wo"))
    adapters = lora.init_lora(jax.random.PRNGKey(0), variables["params"], spec)
    adapters = jax.tree_util.tree_map_with_path(
        lambda p, x: x if p[-1].key == "alpha" else x + 0.2, adapters)
    prompt = {"embedding": jax.random.normal(jax.random.PRNGKey(1), (PROMPT, 32))}
    written = export_hybrid(str(tmp_path / "out"), {"lora": adapters, "prompt": prompt}, spec,
                            model.config)
    assert written == ["lora", "prompt"]
    hybrid = _documented_hybrid(base, tmp_path / "out" / "lora", tmp_path / "out" / "prompt")
    ids, mask = _inputs(seed=3)
    dec = _decoder_inputs()
    ours = model.apply({**variables, "lora": adapters, "prompt": prompt}, jnp.asarray(ids),
                       jnp.asarray(mask), jnp.asarray(dec))
    np.testing.assert_allclose(np.asarray(ours), _torch_logits(hybrid, ids, mask, dec),
                               atol=1e-4, rtol=1e-4)


def test_a_prompt_adapter_with_a_foreign_tensor_or_width_is_refused(tmp_path):
    from safetensors.numpy import save_file

    model, _ = _flax(_torch_t5("v1.1"))
    folder = tmp_path / "prompt"
    folder.mkdir()
    cfg = {"peft_type": "PROMPT_TUNING", "task_type": "SEQ_2_SEQ_LM", "num_virtual_tokens": 4,
           "token_dim": 32}
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    save_file({"prompt_embeddings": np.zeros((4, 32), np.float32),
               "prompt_encoder.mlp.weight": np.zeros((2, 2), np.float32)},
              folder / "adapter_model.safetensors")
    with pytest.raises(UserError, match="holds prompt_encoder.mlp.weight"):
        import_t5_prompt(str(folder), model.config)
    save_file({"prompt_embeddings": np.zeros((4, 16), np.float32)},
              folder / "adapter_model.safetensors")
    with pytest.raises(UserError, match="does not fit a T5 with d_model 32"):
        import_t5_prompt(str(folder), model.config)


def test_a_sharded_t5_checkpoint_loads_like_one_file(tmp_path):
    """transformers' own sharded save (model.safetensors.index.json + shards)."""
    from t5_hybrid.hf_import import load_pretrained

    tm = _torch_t5("v1.1")
    tm.save_pretrained(tmp_path / "one")
    tm.save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    _, _, one = load_pretrained(str(tmp_path / "one"))
    _, _, sharded = load_pretrained(str(tmp_path / "sharded"))
    for a, b in zip(jax.tree_util.tree_leaves(one), jax.tree_util.tree_leaves(sharded),
                    strict=True):
        np.testing.assert_array_equal(a, b)


def test_an_unreachable_hub_adapter_is_one_clear_error(monkeypatch):
    from lora_jax.peft_io import resolve_adapter_dir

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match="could not get adapter 'someone/no-such-adapter' from the "
                                        "Hugging Face Hub"):
        resolve_adapter_dir("someone/no-such-adapter")
