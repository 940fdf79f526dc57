"""Integrated Gradients over the input embeddings of a finished run (paper 2, Figures 1-3).

    python -m lora_jax.attribute --workdir RUN --input rows.jsonl --out-dir DIR [--steps 128]

For a classifier (FT_LoRA, FFN, zero-shot, full): one score per input token towards the
predicted class (its logit). For a T5 hybrid run: a matrix of source tokens x generated tokens
(each generated token's log-probability under teacher forcing on the generated text), the
soft-prompt positions kept apart from the text's tokens. Writes ``attributions.json`` (tokens,
scores, the completeness check) and one heatmap per row (``row_<i>.png``).

Integrated Gradients (Sundararajan et al., 2017): for input embeddings x, a baseline x' and an
output F, ``IG_i = (x_i - x'_i) * integral_0^1 dF(x' + a (x - x')) / dx_i da``. The
baseline is the pad token's embedding at every position (`pad_baseline`). The integral is a
Gauss-Legendre quadrature of `steps` points (Captum's default), the gradients of all points
computed at once (`vmap`, in chunks) inside one jit-compiled function. Completeness: the
attributions of an output sum to F(x) - F(x'); each record states the relative gap.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax import data as data_lib
from lora_jax.cli import ArgumentParser, run_main
from lora_jax.errors import UserError
from lora_jax.results import add_allow_dirty, code_state, provenance
from lora_jax.runs import load_run, read_input_rows, texts_of

log = logging.getLogger(__name__)


def quadrature(steps: int) -> tuple[np.ndarray, np.ndarray]:
    """Gauss-Legendre points a in (0, 1) and weights (summing to 1) for `steps` points."""
    if steps < 2:
        raise UserError(f"--steps {steps}: Integrated Gradients needs at least 2 points")
    x, w = np.polynomial.legendre.leggauss(steps)
    return 0.5 * (x + 1.0), 0.5 * w


def integrated_gradients(f: Callable[[jax.Array], jax.Array], x: jax.Array, baseline: jax.Array,
                         steps: int = 64, chunk: int = 16) -> jax.Array:
    """IG of every output of ``f`` (x -> (J,) outputs) w.r.t. x, shape (J, *x.shape).

    The gradients at the `steps` interpolation points are computed `chunk` points at a time
    (vmap within a chunk, `lax.map` over chunks) to bound memory. Call it inside `jax.jit`.
    """
    alphas, weights = (jnp.asarray(v, jnp.float32) for v in quadrature(steps))
    delta = x - baseline
    jac = jax.jacrev(lambda z: f(z))

    def at(alpha):
        return jac(baseline + alpha * delta)  # (J, *x.shape)

    grads = jax.lax.map(at, alphas, batch_size=min(chunk, steps))  # (steps, J, *x.shape)
    return jnp.einsum("s,sj...->j...", weights, grads) * delta[None]


def pad_baseline(x: jax.Array, table: jax.Array, pad_id: int) -> jax.Array:
    """The baseline input: the pad token's embedding at every position of x (B, S, d).

    Not zeros: a model that normalises its input embeddings without a bias (T5's RMSNorm) is
    nearly a step function of a along the path from 0, which no quadrature of a few dozen
    points integrates; from the pad embedding the path stays smooth."""
    return jnp.broadcast_to(jnp.asarray(table)[pad_id].astype(x.dtype), x.shape)


def completeness_gap(attributions: np.ndarray, f_x: np.ndarray, f_base: np.ndarray) -> np.ndarray:
    """|sum(attributions) - (F(x) - F(x'))| / |F(x) - F(x')| per output (J,)."""
    total = attributions.reshape(attributions.shape[0], -1).sum(-1)
    diff = f_x - f_base
    return np.abs(total - diff) / np.maximum(np.abs(diff), 1e-8)


# ----------------------------------------------------------------------------- classifier


def classifier_attributions(run, rows: list[dict], where: str, steps: int = 64) -> list[dict]:
    """Per row: tokens, the predicted class, one score per token (IG summed over the embedding
    dimension) towards that class's logit, F(x), F(baseline) and the completeness gap."""
    texts = texts_of(rows, run.task, where)
    enc = data_lib.encode(data_lib.Examples(texts, np.zeros(len(texts), np.int32)),
                          run.tokenizer, run.max_length)
    table = run.variables["params"]["encoder"]["embeddings"]["word_embeddings"]["embedding"]
    model, variables = run.model, run.variables

    @jax.jit
    def attribute(ids, mask, types, target):
        def f(embeds):  # (1, T, E) -> (1,) the target's logit
            logits = model.apply(variables, ids, mask, types, inputs_embeds=embeds)
            return logits[0, target][None]

        x = jnp.asarray(table)[ids].astype(jnp.float32)
        base = pad_baseline(x, table, run.pad_id)
        ig = integrated_gradients(f, x, base, steps)[0, 0]  # (T, E)
        return ig.sum(-1), f(x)[0], f(base)[0]

    out = []
    for i in range(len(enc)):
        ids = enc.input_ids[i][None]
        types = enc.token_type_ids[i][None]
        mask = np.ones_like(ids)
        logits = np.asarray(model.apply(variables, ids, mask, types))[0]
        target = 0 if run.task.is_regression else int(np.argmax(logits))
        scores, f_x, f_base = (np.asarray(v) for v in attribute(ids, mask, types, target))
        gap = completeness_gap(scores[None], np.asarray([f_x]), np.asarray([f_base]))[0]
        label = (run.task.label_names[target] if run.task.label_names and
                 not run.task.is_regression else target)
        out.append({"text": list(texts[i]), "tokens": run.tokenizer.convert_ids_to_tokens(
                        enc.input_ids[i].tolist()),
                    "target": label, "output": "regression value" if run.task.is_regression
                    else "logit of the predicted class", "scores": scores.round(6).tolist(),
                    "f_input": float(f_x), "f_baseline": float(f_base),
                    "completeness_gap": float(gap), "steps": steps})
    return out


def plot_tokens(record: dict, path: str) -> None:
    """One row of tokens coloured by their score (red towards, blue against the class)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scores = np.asarray(record["scores"])
    limit = max(np.abs(scores).max(), 1e-9)
    fig, ax = plt.subplots(figsize=(max(4, 0.55 * len(scores)), 1.8))
    ax.imshow(scores[None], cmap="coolwarm", vmin=-limit, vmax=limit, aspect="auto")
    ax.set_xticks(range(len(scores)), record["tokens"], rotation=60, ha="right", fontsize=8)
    ax.set_yticks([])
    ax.set_title(f"Integrated Gradients towards {record['target']!r} "
                 f"(completeness gap {100 * record['completeness_gap']:.2f}%)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------- CLI


def attribute(args) -> int:
    rows = read_input_rows(args.input)[: args.max_rows]
    where = "stdin" if args.input == "-" else args.input
    if not rows:
        raise UserError(f"{where} has no rows to attribute")
    quadrature(args.steps)  # a bad --steps fails before the model loads
    out = os.path.join(args.out_dir, "attributions.json")
    code = code_state(out, args.allow_dirty)
    run = load_run(args.workdir)
    if not hasattr(run, "attributions"):
        raise UserError(f"{args.workdir} is a run whose inputs cannot be attributed here (an "
                        "AttEns combiner); attribute its modules' runs")
    records = run.attributions(rows, where, args.steps)
    os.makedirs(args.out_dir, exist_ok=True)
    for i, record in enumerate(records):
        record["heatmap"] = f"row_{i}.png"
        run.plot_attributions(record, os.path.join(args.out_dir, record["heatmap"]))
    with open(out, "w") as f:
        json.dump({"workdir": args.workdir, "input": where, "method": "integrated gradients, "
                   f"Gauss-Legendre {args.steps} points, pad-token baseline, input embeddings",
                   **provenance(), **code, "rows": records}, f, indent=1)
    worst = max(r["completeness_gap"] if "completeness_gap" in r else max(r["completeness_gaps"])
                for r in records)
    print(f"{len(records)} rows -> {args.out_dir}/attributions.json and row_*.png "
          f"(largest completeness gap {100 * worst:.3f}%)")
    return 0


def main(argv=None) -> int:
    p = ArgumentParser(prog="python -m lora_jax.attribute", description=__doc__.splitlines()[0])
    p.add_argument("--workdir", required=True, help="a finished classifier or T5 hybrid run")
    p.add_argument("--input", required=True, help="rows file (.jsonl/.csv/.txt) or - for stdin")
    p.add_argument("--out-dir", required=True, help="folder for attributions.json and heatmaps")
    p.add_argument("--steps", type=int, default=128, help="interpolation points (>= 2); each "
                   "record reports its completeness gap, raise this if it is large")
    p.add_argument("--max-rows", type=int, default=16, help="attribute the first N rows")
    add_allow_dirty(p)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    return run_main(lambda: attribute(args))


if __name__ == "__main__":
    sys.exit(main())
