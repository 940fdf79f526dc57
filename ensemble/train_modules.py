"""Train the k LoRA modules (one FT_LoRA run per task) and export them as a module set.

    python -m ensemble.train_modules --sweep configs/glue_cpu.py --workdir runs/glue_cpu \
        --tasks sst2,cola,mrpc,rte,stsb,wnli --out runs/modules/minilm_l3

Each task runs the sweep's FT_LoRA cell (`configs/ft_lora.py` + the sweep's overrides) in
<workdir>/ft_lora_<task>_s<seed>; a run that already finished is reused, so the FT_LoRA baseline
runs of `lora_jax.sweep` double as the modules. The best checkpoint of each run (selected on its
held-out slice) becomes <out>/<task>/.
"""

from __future__ import annotations

import logging
import os
import sys

from ensemble.modules import export_module, write_moduleset_index
from lora_jax.cli import ArgumentParser, run_main
from lora_jax.config_check import validate_config
from lora_jax.errors import UserError
from lora_jax.experiments import load_config, log_packages_at_info
from lora_jax.sweep import cell_config
from lora_jax.tasks import resolve_task


def main(argv=None) -> int:
    p = ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sweep", required=True, help="sweep config with the FT_LoRA overrides")
    p.add_argument("--workdir", required=True, help="where the FT_LoRA runs live")
    p.add_argument("--tasks", required=True, help="comma list, in module order")
    p.add_argument("--out", required=True, help="module set folder")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    log_packages_at_info()
    return run_main(lambda: train_modules(args))


def train_modules(args) -> int:
    from lora_jax.classifier import train_and_evaluate

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _, sweep = load_config(args.sweep)
    tasks = [t for t in args.tasks.split(",") if t]
    if not tasks:
        raise UserError("--tasks is empty; give a comma list such as sst2,cola,rte")
    if len(set(tasks)) != len(tasks):
        raise UserError(f"--tasks {args.tasks} names a task twice; one module per task")
    configs = {task: cell_config(sweep, "ft_lora", task, args.seed, repo) for task in tasks}
    for config in configs.values():  # every module's settings are checked before any trains
        validate_config(config)
        resolve_task(config)
    metas = []
    for task in tasks:
        run_dir = os.path.join(args.workdir, f"ft_lora_{task}_s{args.seed}")
        if not os.path.isfile(os.path.join(run_dir, "results.json")):
            logging.getLogger("lora_jax").info("training module %s in %s", task, run_dir)
            train_and_evaluate(configs[task], run_dir)
        metas.append(export_module(run_dir, os.path.join(args.out, task)))
        print(f"module {task}: {metas[-1]['main_metric']} "
              f"{next(iter(metas[-1]['metrics'].values()))[metas[-1]['main_metric']]:.4f}")
    write_moduleset_index(args.out, metas)
    print(f"module set with {len(metas)} modules in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
