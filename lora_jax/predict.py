"""Apply a finished run, or a base model plus a PEFT adapter, to new text.

    python -m lora_jax.predict --workdir RUN --input rows.jsonl --output predictions.jsonl
    python -m lora_jax.predict --model BASE --adapter PEFT_DIR --input - --output out.jsonl
    python -m lora_jax.predict --workdir RUN --input validation.jsonl --output p.jsonl --evaluate
    python -m lora_jax.predict --model BASE --adapters sst2=RUN,cola=PEFT_DIR,MODULE_SET \
        --adapter-key adapter --input rows.jsonl --output out.jsonl

--input: .jsonl / .json / .csv / .tsv / .parquet rows with the task's text columns (a single
``text`` column serves one-text tasks), a .txt file (one text per line), or ``-`` for stdin.
--output: one JSON object per input row, in input order: for classifiers the ``label`` (its name
when known), ``label_id``, ``probabilities`` and raw ``logits`` (regression: ``value`` and
``logits``); for T5 runs the generated ``prediction``. With --evaluate the task's metrics of
rows that carry labels are printed (and written to --metrics when given).

--adapters routes every row through the adapter its --adapter-key column names, all rows in one
batched pass over the stacked adapters (`lora_jax.adapter_bank`): ``NAME=DIR`` entries (DIR a
finished FT_LoRA run, a PEFT SEQ_CLS adapter of --model, or an AttEns module set, whose modules
are named by task) or bare DIRs (named by folder). Each output row also carries its ``adapter``.
"""

from __future__ import annotations

import json
import logging
import os
import sys

from lora_jax.cli import ArgumentParser, run_main
from lora_jax.errors import UserError


def parse_args(argv):
    p = ArgumentParser(prog="python -m lora_jax.predict", description=__doc__.splitlines()[0])
    src = p.add_argument_group("what predicts (one of)")
    src.add_argument("--workdir", help="a finished run (FT_LoRA, FFN, zero-shot, full, AttEns, T5)")
    src.add_argument("--model", help="base model folder or hub id, with --adapter")
    src.add_argument("--adapter", help="PEFT SEQ_CLS adapter folder or hub id, with --model")
    src.add_argument("--adapters", help="with --model: NAME=DIR,... (runs, PEFT adapters, module "
                     "sets), each row scored by the one its --adapter-key column names")
    p.add_argument("--adapter-key", default="adapter", help="with --adapters: the column naming "
                   "each row's adapter")
    p.add_argument("--input", required=True, help="rows file, .txt, or - for stdin")
    p.add_argument("--output", required=True, help=".jsonl to write")
    p.add_argument("--evaluate", action="store_true", help="print the task metrics (rows need "
                   "labels)")
    p.add_argument("--metrics", default="", help="also write the metrics to this .json")
    p.add_argument("--task", default="", help="with --adapter: a registered task (its columns, "
                   "label names and metrics)")
    p.add_argument("--text-keys", default="text", help="with --adapter and no --task: the text "
                   "column(s), comma separated")
    p.add_argument("--labels", default="", help="with --adapter and no --task: class names, "
                   "comma separated")
    p.add_argument("--batch-size", type=int, default=None,
                   help="rows per batch (default: the run's eval_batch_size; 64 with --adapter)")
    p.add_argument("--max-length", type=int, default=512, help="with --adapter: tokens")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if bool(args.workdir) == bool(args.model or args.adapter or args.adapters):
        p.error("give --workdir RUN, or --model M with --adapter A or --adapters NAME=DIR,...")
    if args.adapter and args.adapters:
        p.error("give --adapter (one adapter) or --adapters (one per row), not both")
    if not args.workdir and not (args.model and (args.adapter or args.adapters)):
        p.error("--model goes with --adapter or --adapters")
    if args.adapters and args.evaluate:
        p.error("--evaluate scores one task; with --adapters each row has its own")
    if (args.batch_size is not None and args.batch_size < 1) or args.max_length < 2:
        p.error("--batch-size must be >= 1 and --max-length >= 2")
    if not args.output.endswith(".jsonl"):
        p.error(f"--output {args.output!r} must be a .jsonl file")
    return args


def load_predictor(args):
    from lora_jax import adapter_bank, inference, runs

    if args.adapters:
        adapters = adapter_bank.load_adapters(args.adapters, args.model)
        return adapter_bank.RoutedClassifier.build(args.model, adapters, args.batch_size or 64)
    if args.workdir:
        run = runs.load_run(args.workdir)
        if args.batch_size:
            run.batch_size = args.batch_size
        return run
    return inference.peft_classifier(
        args.model, args.adapter, task_name=args.task, max_length=args.max_length,
        text_keys=tuple(k for k in args.text_keys.split(",") if k),
        label_names=tuple(k for k in args.labels.split(",") if k), batch_size=args.batch_size or 64)


def write_jsonl(path: str, records: list[dict]) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def predict(args) -> int:
    from lora_jax.runs import read_input_rows

    rows = read_input_rows(args.input)
    where = "stdin" if args.input == "-" else args.input
    if not rows:
        raise UserError(f"{where} has no rows to predict on")
    run = load_predictor(args)
    kw = {"adapter_key": args.adapter_key} if args.adapters else {}
    outputs = run.predict(rows, where, progress=not args.no_progress, **kw)
    write_jsonl(args.output, outputs)
    print(f"{len(outputs)} predictions -> {args.output}")
    if args.evaluate:
        metrics = run.evaluate(rows, outputs, where)
        print(json.dumps({"task": run.task.name, "rows": len(rows), "metrics": metrics}))
        if args.metrics:
            with open(args.metrics, "w") as f:
                json.dump({"task": run.task.name, "rows": len(rows), "input": where,
                           "metrics": metrics}, f, indent=2)
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    return run_main(lambda: predict(args))


if __name__ == "__main__":
    sys.exit(main())
