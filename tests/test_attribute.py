"""Integrated Gradients: equal to Captum's on the same weights in PyTorch, complete (the
attributions sum to F(x) - F(baseline)), and the attribute command on classifier runs."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lora_jax.attribute import completeness_gap, integrated_gradients, quadrature
from lora_jax.errors import UserError
from lora_jax.models import SequenceClassifier
from lora_jax.models.hf_import import load_pretrained
from tests.helpers import hf_inputs, torch_classifier

torch = pytest.importorskip("torch")


def _pair(kind, tmp_path):
    """A transformers classifier and ours on its weights (head included)."""
    hf = torch_classifier(kind).eval()
    hf.save_pretrained(tmp_path / kind)
    pre = load_pretrained(str(tmp_path / kind))
    model = SequenceClassifier(pre.config, 3, head="hf")
    variables = {"params": {"encoder": pre.encoder, "head": pre.head}}
    return hf, model, variables


@pytest.mark.parametrize("kind", ["bert", "electra_proj"])
def test_matches_captum_integrated_gradients_on_the_same_weights(kind, tmp_path):
    captum = pytest.importorskip("captum.attr")
    hf, model, variables = _pair(kind, tmp_path)
    ids, mask, types = (x[1:2] for x in hf_inputs())
    target = 2
    table = variables["params"]["encoder"]["embeddings"]["word_embeddings"]["embedding"]
    x = jnp.asarray(table)[ids]

    def f(embeds):
        return model.apply(variables, ids, mask, types, inputs_embeds=embeds)[0, target][None]

    ours = np.asarray(jax.jit(lambda x: integrated_gradients(f, x, jnp.zeros_like(x), 64))(x))[0]

    def forward(embeds, m, t):
        return hf(inputs_embeds=embeds, attention_mask=m, token_type_ids=t).logits[:, target]

    emb = torch.tensor(np.asarray(x))
    theirs = captum.IntegratedGradients(forward).attribute(
        emb, baselines=torch.zeros_like(emb), n_steps=64, method="gausslegendre",
        additional_forward_args=(torch.tensor(mask), torch.tensor(types))).detach().numpy()
    assert np.abs(theirs).max() > 1e-4
    np.testing.assert_allclose(ours, theirs, atol=2e-5, rtol=1e-3)


def test_completeness_within_one_percent_with_64_steps(tmp_path):
    _, model, variables = _pair("bert", tmp_path)
    ids, mask, types = (x[:1] for x in hf_inputs(seed=4))
    table = variables["params"]["encoder"]["embeddings"]["word_embeddings"]["embedding"]
    x = jnp.asarray(table)[ids]

    def f(embeds):  # all three logits at once: (3,)
        return model.apply(variables, ids, mask, types, inputs_embeds=embeds)[0]

    ig = np.asarray(integrated_gradients(f, x, jnp.zeros_like(x), 64))
    gaps = completeness_gap(ig, np.asarray(f(x)), np.asarray(f(jnp.zeros_like(x))))
    assert gaps.max() < 0.01, gaps
    coarse = np.asarray(integrated_gradients(f, x, jnp.zeros_like(x), 2))  # the check can fail
    assert completeness_gap(coarse, np.asarray(f(x)), np.asarray(f(jnp.zeros_like(x)))).max() > \
        gaps.max()


def test_quadrature_is_gauss_legendre_on_the_unit_interval():
    a, w = quadrature(64)
    assert a.min() > 0 and a.max() < 1 and abs(w.sum() - 1) < 1e-12
    assert abs((w * a ** 5).sum() - 1 / 6) < 1e-12  # exact for polynomials
    with pytest.raises(UserError, match="at least 2 points"):
        quadrature(1)
