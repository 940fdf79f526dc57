"""Build a module set for AttEns: train the k LoRA modules here, or take PEFT adapters.

    python -m ensemble.train_modules --sweep configs/glue_cpu.py --workdir runs/glue_cpu \
        --tasks sst2,cola,mrpc,rte,stsb,wnli --out runs/modules/minilm_l3

Each task runs the sweep's FT_LoRA cell (`configs/ft_lora.py` + the sweep's overrides) in
<workdir>/ft_lora_<task>_s<seed> (``_<budget>_s<seed>``: the budget on all of train, in a sweep
with few-shot budgets); a run that already finished is reused, so the FT_LoRA baseline
runs of `lora_jax.sweep` double as the modules. The best checkpoint of each run (selected on its
held-out slice) becomes <out>/<task>/.

    python -m ensemble.train_modules --from-peft DIR_OR_HUB_ID,... --model BASE --out SET \
        [--tasks sst2,cola,...]

Modules trained anywhere: PEFT SEQ_CLS LoRA adapters of BASE (local folders or hub ids), each
with its transformers head. Task names come from --tasks (in adapter order) or from a
``lora_jax_module.json`` ({"task": "sst2"}) beside each adapter_config.json. Combine them with
``combiner.output="hidden"`` (the default).
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
from lora_jax.sweep import cell_config, cell_dir, full_budget
from lora_jax.tasks import resolve_task


def main(argv=None) -> int:
    p = ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sweep", help="sweep config with the FT_LoRA overrides")
    p.add_argument("--workdir", help="where the FT_LoRA runs live")
    p.add_argument("--tasks", default="", help="comma list, in module order")
    p.add_argument("--out", required=True, help="module set folder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--from-peft", default="", help="comma list of PEFT adapter folders or hub "
                   "ids (instead of --sweep/--workdir)")
    p.add_argument("--model", default="", help="with --from-peft: the base model of the adapters")
    p.add_argument("--max-length", type=int, default=128, help="with --from-peft: the tokens "
                   "the modules were trained on")
    args = p.parse_args(argv)
    if args.from_peft:
        if args.sweep or args.workdir:
            p.error("--from-peft replaces --sweep/--workdir; give one or the other")
        if not args.model:
            p.error("--from-peft needs --model, the base model the adapters were trained on")
    elif not (args.sweep and args.workdir and args.tasks):
        p.error("give --sweep, --workdir and --tasks (or --from-peft with --model)")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    log_packages_at_info()
    return run_main(lambda: (modules_from_peft if args.from_peft else train_modules)(args))


def _names(text: str, what: str) -> list[str]:
    names = [t for t in text.split(",") if t]
    if len(set(names)) != len(names):
        raise UserError(f"{what} {text} names one twice; one module per task")
    return names


def modules_from_peft(args) -> int:
    from ensemble.modules import module_from_peft

    adapters = _names(args.from_peft, "--from-peft")
    tasks = _names(args.tasks, "--tasks")
    if tasks and len(tasks) != len(adapters):
        raise UserError(f"--tasks names {len(tasks)} tasks for {len(adapters)} adapters; give "
                        "one per adapter, in the same order, or none (sidecar files)")
    metas = []
    for i, adapter in enumerate(adapters):
        task = tasks[i] if tasks else ""
        name = task or f"module_{i}"
        meta = module_from_peft(adapter, args.model, os.path.join(args.out, name), task,
                                args.max_length)
        if not task and meta["task"] != name:  # named by its sidecar: move to its task name
            os.replace(os.path.join(args.out, name), os.path.join(args.out, meta["task"]))
        metas.append(meta)
        print(f"module {meta['task']}: {meta['num_labels']} labels, r={meta['lora']['r']}, "
              f"alpha={meta['lora']['alpha']} from {adapter}")
    if len({m["task"] for m in metas}) != len(metas):
        raise UserError("two adapters have the same task name; name them with --tasks")
    write_moduleset_index(args.out, metas)
    print(f"module set with {len(metas)} modules in {args.out}")
    return 0


def train_modules(args) -> int:
    from lora_jax.classifier import train_and_evaluate

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _, sweep = load_config(args.sweep)
    tasks = _names(args.tasks, "--tasks")
    if not tasks:
        raise UserError("--tasks is empty; give a comma list such as sst2,cola,rte")
    budget = full_budget(sweep)  # a sweep with few-shot budgets: the modules see all of train
    configs = {task: cell_config(sweep, "ft_lora", task, args.seed, repo, budget)
               for task in tasks}
    for config in configs.values():  # every module's settings are checked before any trains
        validate_config(config)
        resolve_task(config)
    metas = []
    for task in tasks:
        run_dir = cell_dir(args.workdir, "ft_lora", task, args.seed, budget)
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
