"""Integrated Gradients for the FLAN-T5 hybrid (paper 2, Figures 1-3): how much each encoder
input position - the soft prompt's tokens and the text's tokens - contributes to each generated
token. ``python -m t5_hybrid.attribute`` is `lora_jax.attribute` (one CLI for every run).

For a row, the run generates its output as predict does; then, teacher-forcing that output,
F_j = log p(generated token j | encoder input embeddings) for every generated position j, and
IG of every F_j w.r.t. the encoder's input embeddings (soft prompt + token embeddings; the
baseline puts the pad token's embedding at every position) gives a generated x (prompt +
source) matrix, summed over the embedding dimension.
"""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax.attribute import completeness_gap, integrated_gradients, pad_baseline
from lora_jax.attribute import main as _main
from t5_hybrid.model import shift_right


def t5_attributions(run, rows: list[dict], where: str, steps: int = 64) -> list[dict]:
    """Per row: source/generated tokens, the (generated x prompt) and (generated x source)
    score matrices, F(x), F(baseline) and the completeness gap of every generated token."""
    from t5_hybrid.data import _truncate

    model, variables, mcfg = run.model, run.variables, run.model.config
    sources = run.sources_of(rows, where)
    generated = run.generate(sources)
    prompt_len = 0 if "prompt" not in variables else int(variables["prompt"]["embedding"].shape[0])

    @jax.jit
    def attribute(ids, mask, targets):
        x, full_mask = model.apply(variables, ids, mask, method=model.encoder_inputs)
        x = x.astype(jnp.float32)
        decoder_inputs = shift_right(targets, mcfg.decoder_start_token_id, mcfg.pad_token_id)

        def f(embeds):  # (1, S, d) -> (J,) log-probabilities of the generated tokens
            states = model.apply(variables, embeds, full_mask, method=model.encode_embeds)
            logits = model.apply(variables, decoder_inputs, states, full_mask,
                                 method=model.decode)[0][0]
            logp = jax.nn.log_softmax(logits, axis=-1)
            return jnp.take_along_axis(logp, targets[0][:, None], axis=-1)[:, 0]

        base = pad_baseline(x, variables["params"]["shared"]["embedding"], mcfg.pad_token_id)
        ig = integrated_gradients(f, x, base, steps)[:, 0].sum(-1)  # (J, S)
        return ig, f(x), f(base)

    out = []
    for source, text in zip(sources, generated, strict=True):
        ids = _truncate(run.tokenizer(source)["input_ids"], run.max_source)[None]
        targets = _truncate(run.tokenizer(text)["input_ids"], run.max_target)[None]
        scores, f_x, f_base = (np.asarray(v) for v in attribute(ids, np.ones_like(ids), targets))
        gaps = completeness_gap(scores, f_x, f_base)
        out.append({"source": source, "generated": text,
                    "source_tokens": run.tokenizer.convert_ids_to_tokens(ids[0].tolist()),
                    "generated_tokens": run.tokenizer.convert_ids_to_tokens(targets[0].tolist()),
                    "output": "log-probability of each generated token (teacher forced)",
                    "prompt_scores": scores[:, :prompt_len].round(6).tolist(),
                    "source_scores": scores[:, prompt_len:].round(6).tolist(),
                    "f_input": f_x.round(6).tolist(), "f_baseline": f_base.round(6).tolist(),
                    "completeness_gaps": gaps.round(6).tolist(), "steps": steps})
    return out


def plot_matrix(record: dict, path: str) -> None:
    """Heatmap of generated tokens (rows) x input positions (columns): the soft prompt's
    positions in their own panel on the left, the text's tokens on the right."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    prompt = np.asarray(record["prompt_scores"])
    source = np.asarray(record["source_scores"])
    limit = max(np.abs(source).max(), np.abs(prompt).max() if prompt.size else 0, 1e-9)
    rows = record["generated_tokens"]
    panels = [(f"soft prompt ({prompt.shape[1]} tokens)", prompt,
               [str(i) for i in range(prompt.shape[1])])] if prompt.size else []
    panels.append(("source tokens", source, record["source_tokens"]))
    widths = [max(p[1].shape[1], 1) for p in panels]
    fig, axes = plt.subplots(1, len(panels), figsize=(max(5, 0.3 * sum(widths) + 2),
                                                     max(2.5, 0.3 * len(rows) + 1.5)),
                             gridspec_kw={"width_ratios": widths}, squeeze=False)
    for ax, (title, matrix, labels) in zip(axes[0], panels, strict=True):
        image = ax.imshow(matrix, cmap="coolwarm", vmin=-limit, vmax=limit, aspect="auto")
        ax.set_title(title, fontsize=9)
        ax.set_xticks(range(len(labels)), labels, rotation=90, fontsize=6)
        ax.set_yticks(range(len(rows)), rows, fontsize=6)
    fig.colorbar(image, ax=axes[0].tolist(), shrink=0.8)
    fig.suptitle("Integrated Gradients: generated token (rows) <- encoder input (columns)",
                 fontsize=9)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(_main())
