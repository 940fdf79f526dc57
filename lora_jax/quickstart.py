"""Offline smoke run of the whole pipeline: ``python -m lora_jax.quickstart``.

Builds the quickstart assets (see `lora_jax.synthetic`), then trains and evaluates
`configs/quickstart.py` as FT_LoRA, FFN and zero-shot, and prints one results table. Run it from
the repository root (it reads configs/quickstart.py).
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys

from lora_jax.errors import UserError
from lora_jax.experiments import load_config


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/quickstart.py")
    parser.add_argument("--workdir", default="runs/quickstart")
    parser.add_argument("--no-progress", action="store_true", help="hide tqdm bars")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    logging.getLogger("absl").setLevel(logging.WARNING)

    from lora_jax.report import results_table
    from lora_jax.synthetic import make_quickstart_assets
    from lora_jax.trainer import train_and_evaluate

    if not os.path.isfile(args.config):
        print(f"error: {args.config} not found; run from the repository root", file=sys.stderr)
        return 2
    module, _ = load_config(args.config)
    make_quickstart_assets(module.ASSETS)
    results = []
    for experiment in ("zero_shot", "ffn", "ft_lora"):
        _, config = load_config(args.config)
        config.experiment = experiment
        config.progress = not args.no_progress
        if experiment == "zero_shot":
            config.num_epochs, config.selection_size = 0, 0
        elif experiment == "ffn":
            config.optimizer.learning_rate = 1e-2
        workdir = os.path.join(args.workdir, experiment)
        shutil.rmtree(workdir, ignore_errors=True)  # a smoke run always starts fresh
        try:
            results.append(train_and_evaluate(config, workdir))
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    print("\nQuickstart (smoke run: tiny random BERT, synthetic sentiment task, CPU)\n")
    print(results_table(results))
    print(f"\nWorkdirs with metrics.jsonl, TensorBoard events, checkpoints: {args.workdir}/*")
    return 0


if __name__ == "__main__":
    sys.exit(main())
