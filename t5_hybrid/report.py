"""Tables in the shape of the FLAN-T5 hybrid paper's Table 1 (hybrid vs full fine-tuning, with
trainable-parameter counts) and Table 2 (ablation: base / prompt only / LoRA only / both).

Used as the table writer of a `lora_jax.sweep` config (``table = "t5_hybrid.report:markdown_table"``)
or on finished runs:

    python -m t5_hybrid.report --runs runs/t5_cpu --out results/t5_hybrid_cpu
"""

from __future__ import annotations

import glob
import json
import os
import sys
from collections.abc import Sequence

from lora_jax.cli import ArgumentParser, fail
from lora_jax.errors import UserError
from lora_jax.report import mean_std
from lora_jax.results import add_allow_dirty, code_state, module_command, provenance
from lora_jax.writers import write_table

ROW_NAMES = {"base": "Base Model", "prompt_only": "Prompt Tuning Only",
             "lora_only": "LoRA Only", "prompt_lora": "Prompt Tuning + LoRA",
             "full_finetune": "Fully Fine-Tuned Model"}
TABLE1 = ("prompt_lora", "full_finetune")
TABLE2 = ("base", "prompt_only", "lora_only", "prompt_lora")
COLUMNS = (("samsum", ("rouge1", "rouge2", "rougeL"), "SAMSum Rouge-1/2/L"),
           ("wikisql", ("logical_form_accuracy",), "WikiSQL Logical Form Acc. (%)"),
           ("sst2", ("accuracy",), "SST-2 Accuracy (%)"))
# The paper's figures (FLAN-T5-base), for comparison.
PAPER = {"prompt_lora": ("50.4 / 25.4 / 41.8", "44.4", "95.0"),
         "full_finetune": ("48.7 / 24.1 / 40.7", "49.3", "90.5"),
         "base": ("48.5 / 23.6 / 40.3", "0.0", "90.8"),
         "prompt_only": ("48.5 / 23.8 / 40.2", "3.6", "92.3"),
         "lora_only": ("50.2 / 25.1 / 41.5", "43.7", "94.2")}
PAPER_PARAMS = {"prompt_lora": 465_408, "full_finetune": 247_577_856}


def _variant(result: dict) -> str:
    return result.get("variant", result.get("sweep_row", ""))


def _cell(results: list[dict], task: str, keys: Sequence[str]) -> str:
    runs = [r for r in results if r["task"] == task]
    if not runs:
        return "–"
    parts = []
    for key in keys:
        parts.append(mean_std([100 * next(iter(r["metrics"].values()))[key] for r in runs]))
    return " / ".join(parts)


def _params(results: list[dict]) -> str:
    counts = sorted({r["trainable_params"] for r in results})
    return ", ".join(f"{c:,}" for c in counts) or "–"


def tables(results: list[dict]) -> str:
    by_variant: dict[str, list[dict]] = {}
    for r in results:
        by_variant.setdefault(_variant(r), []).append(r)
    head = " | ".join(c[2] for c in COLUMNS)
    t1 = [f"| Model Configuration | # Trainable Parameters | {head} |", "|---" * 5 + "|"]
    for v in TABLE1:
        cells = " | ".join(_cell(by_variant.get(v, []), task, keys) for task, keys, _ in COLUMNS)
        t1.append(f"| {ROW_NAMES[v]} | {_params(by_variant.get(v, []))} | {cells} |")
    t1 += ["", "Paper (FLAN-T5-base): " + "; ".join(
        f"{ROW_NAMES[v]}: {PAPER_PARAMS[v]:,} params, " + ", ".join(PAPER[v]) for v in TABLE1)]
    t2 = [f"| Model Configuration | {head} |", "|---" * 4 + "|"]
    for v in TABLE2:
        cells = " | ".join(_cell(by_variant.get(v, []), task, keys) for task, keys, _ in COLUMNS)
        t2.append(f"| {ROW_NAMES[v]} | {cells} |")
    t2 += ["", "Paper (FLAN-T5-base): " + "; ".join(f"{ROW_NAMES[v]}: " + ", ".join(PAPER[v])
                                                    for v in TABLE2)]
    return "\n".join(["## Table 1: hybrid vs full fine-tuning", "", *t1, "",
                      "## Table 2: ablation", "", *t2])


def _representative(results: list[dict]) -> dict:
    """The paper's method if present (a trained row states the training protocol)."""
    return next((r for r in results if _variant(r) == "prompt_lora"),
                next((r for r in results if r.get("total_steps")), results[0]))


def protocol_lines(results: list[dict]) -> list[str]:
    first = _representative(results)
    cfg = first["config"]
    lines = [f"- Model: `{first['model']}`; compute dtype `{cfg['dtype']}`; decoding "
             f"{'greedy' if cfg['num_beams'] == 1 else 'beam ' + str(cfg['num_beams'])}.",
             f"- Epochs (max): {cfg['num_epochs']}, early stopping patience "
             f"{cfg['early_stopping_patience']}; batch {cfg['batch_size']}; lr "
             f"{cfg['optimizer']['learning_rate']} (full fine-tuning: its config's), cosine, "
             f"{cfg['optimizer']['warmup_steps']} warmup steps; seeds "
             f"{sorted({r['seed'] for r in results})}."]
    for task in sorted({r["task"] for r in results}):
        r = _representative([x for x in results if x["task"] == task])
        sizes = ", ".join(f"{k} {v}" for k, v in r["sizes"].items())
        lines.append(f"- {task}: {r['protocol']}; rows: {sizes}; data: "
                     f"{', '.join(sorted(set(r['data_sources'].values())))}.")
    lines.append(f"- Machine: {first['machine']}.")
    return lines


def markdown_table(sweep, results: list[dict], command: str, note: str = "") -> str:
    """The `lora_jax.sweep` table hook: both tables, the protocol, the machine, the command."""
    name = getattr(sweep, "name", "FLAN-T5 hybrid")
    return "\n".join([f"# {name}", "", "Scores x100.", "", tables(results), "", "## Protocol",
                      "", *protocol_lines(results), *([f"- Note: {note}"] if note else []),
                      f"- Command: `{command}`"]) + "\n"


def main(argv=None) -> int:
    parser = ArgumentParser(description="FLAN-T5 hybrid tables from results.json files")
    parser.add_argument("--runs", required=True, help="folder searched for */results.json")
    parser.add_argument("--out", required=True, help="path stem for .md and .json")
    parser.add_argument("--note", default="")
    add_allow_dirty(parser)
    args = parser.parse_args(argv)
    paths = sorted(glob.glob(os.path.join(args.runs, "**", "results.json"), recursive=True))
    results = [json.load(open(p)) for p in paths]  # noqa: SIM115
    results = [r for r in results if r.get("experiment") == "t5_hybrid"]
    if not results:
        fail(f"no t5_hybrid results.json under {args.runs}")
    command = module_command("t5_hybrid.report", argv if argv is not None else sys.argv[1:])
    try:
        code = code_state(args.out + ".json", args.allow_dirty)
    except UserError as e:
        fail(str(e))
    text = markdown_table(None, results, command, args.note)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)) or ".", exist_ok=True)
    with open(args.out + ".json", "w") as f:
        json.dump({**provenance(command), **code, "results": results}, f, indent=1)
    write_table(args.out + ".md", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
