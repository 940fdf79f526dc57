"""Run a grid of experiments x tasks x seeds and write one results table.

    python -m lora_jax.sweep --config configs/glue_cpu.py --workdir runs/glue_cpu \
        --out results/glue_minilm_l3

Each cell runs `configs/<experiment>.py` with the sweep's overrides in
<workdir>/<experiment>_<task>_s<seed>; a cell whose results.json exists is reused and one
with checkpoints but no results resumes, so an interrupted sweep continues where it stopped.
``--reuse FILE`` carries finished cells across machines: a cell missing from the workdir whose
result FILE (an earlier ``<out>.json`` of this sweep, committed by a session that ran out of
time) records, with the same config where both have a key, counts as finished and its
results.json (with its own commit and command) is restored from FILE.
A sweep with ``budgets`` (name -> overrides, e.g. ``{"n16": {"train_budget": 16}}``: the
few-shot axis) runs every cell once per budget, in <workdir>/<experiment>_<task>_<budget>_s<seed>,
and tables each budget apart. ``row_seeds`` / ``row_budgets`` (row -> names) run a row at only
those seeds / budgets (a row that does not train needs one seed and one budget).
Writes <out>.json (the sweep's provenance and the list of its cells), <out>/<cell>.json (each
cell's results.json; lora_jax.sweep_record) and
<out>.md (rows = experiments, columns = tasks + average, mean ± sample std over seeds; a sweep config
can name its own table writer as ``table = "module:function"``).
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import sys

import ml_collections

from lora_jax.cli import ArgumentParser, run_main
from lora_jax.config_check import validate_config
from lora_jax.errors import UserError
from lora_jax.experiments import load_config, log_packages_at_info, run, runner
from lora_jax.report import STD_LABEL, score_table
from lora_jax.results import ROOT, add_allow_dirty, code_state, module_command, provenance
from lora_jax.sweep_record import cell_key, cell_name, read_record, write_record
from lora_jax.writers import write_json_atomic, write_table


def apply_overrides(config, overrides) -> None:
    """Merge nested overrides ({"optimizer": {"learning_rate": 5e-4}}) into a locked ConfigDict."""
    for key, value in dict(overrides).items():
        if key not in config:
            raise UserError(f"sweep override {key!r} is not a config key")
        if isinstance(value, (dict, ml_collections.ConfigDict)):
            apply_overrides(config[key], value)
        else:
            config[key] = value


def cell_config(sweep, experiment: str, task: str, seed: int, repo: str, budget: str = ""):
    """The config of one cell: its row's config file + common, then task, then row overrides,
    then the budget's (``sweep.budgets[budget]``; "" for none).

    A row's config file is ``sweep.experiment_configs[row]`` when given (relative to the repo),
    else ``configs/<row>.py``; so rows such as ``attens_k3`` can share configs/attens_*.py.
    """
    files = dict(sweep.get("experiment_configs", {}))
    _, config = load_config(os.path.join(repo, files.get(experiment, f"configs/{experiment}.py")))
    apply_overrides(config, sweep.common)
    apply_overrides(config, sweep.task_overrides.get(task, {}))
    apply_overrides(config, sweep.experiment_overrides.get(experiment, {}))
    if budget:
        apply_overrides(config, sweep.budgets[budget])
    config.task, config.seed = task, seed
    if config.experiment == "zero_shot":
        config.num_epochs, config.selection_size = 0, 0
    return config


def markdown_table(sweep, results: list[dict], command: str, note: str = "") -> str:
    from lora_jax.classifier import pooling_of

    first = results[0]
    main_seed = sweep.seeds[0]
    ft = [r for r in results if r["experiment"] == "ft_lora" and r["seed"] == main_seed]
    sizes = "; ".join(f"{r['task']}: " + ", ".join(f"{k} {v}" for k, v in r["sizes"].items())
                      for r in ft)
    timing = "; ".join(f"{r['task']} {r['train_seconds']:.0f} s ({r['train_examples_per_s']} ex/s)"
                       for r in ft)
    return "\n".join([
        f"# {sweep.name}", "", *budget_tables(sweep, results),
        f"Scores x100 on validation: accuracy, except CoLA (Matthews) and STS-B (Pearson); "
        f"seeds {list(sweep.seeds)}" + (f" ({STD_LABEL})" if len(sweep.seeds) > 1 else "") + ".",
        f"- Model: `{first['model']}`; pooling `{pooling_of(first['config'])}`; dtype "
        f"`{first['config']['dtype']}`.",
        "- Protocol: model selection on a held-out slice of train (the `selection` rows below, "
        "never trained on); metrics reported on validation; Model row = untrained head, no "
        "training.",
        f"- Rows per split (FT_LoRA): {sizes}.",
        f"- FT_LoRA training time: {timing}.",
        f"- Machine: {first['machine']}.",
        *([f"- Note: {note}"] if note else []),
        f"- Command: `{command}`",
    ]) + "\n"


def budget_of(result: dict) -> str:
    """The sweep budget a result ran at ("" in a sweep without budgets)."""
    return result.get("sweep_budget", "")


def budget_names(sweep) -> list[str]:
    """The sweep's budgets, smallest ``train_budget`` first, those without one (all of train)
    last; [] for a sweep without budgets."""
    budgets = dict(sweep.get("budgets", {}))
    size = lambda name: budgets[name].get("train_budget", 0) or float("inf")
    return sorted(budgets, key=lambda name: (size(name), name))


def full_budget(sweep) -> str:
    """The name of the sweep's budget that trains on all of train ("" in a sweep without
    budgets): the cells whose runs are the module set's."""
    budgets = dict(sweep.get("budgets", {}))
    full = [name for name, o in budgets.items() if not o.get("train_budget", 0)]
    if budgets and not full:
        raise UserError(f"the sweep's budgets {sorted(budgets)} all cap train_budget; add one "
                        "without it (all of train), e.g. budgets.all = {}")
    return full[0] if full else ""


def budget_tables(sweep, results: list[dict]) -> list[str]:
    """Markdown lines: the score table, or one per budget under its own heading."""
    budgets = budget_names(sweep) or [""]
    lines = []
    for budget in budgets:
        if budget:
            lines += [f"## Budget {budget}", ""]
        lines += [score_table([r for r in results if budget_of(r) == budget], sweep.experiments,
                              sweep.tasks), ""]
    return lines


def table_function(sweep):
    """The sweep's table writer: ``sweep.table = "module:function"``, default `markdown_table`."""
    target = sweep.get("table", "")
    if not target:
        return markdown_table
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


def selected(names: str, available, what: str) -> list:
    """The comma list `names` (empty: all of `available`), each checked to exist."""
    wanted = [x for x in names.split(",") if x]
    unknown = [x for x in wanted if x not in map(str, available)]
    if unknown:
        raise UserError(f"{what} {', '.join(unknown)} not in this sweep (it has "
                        f"{', '.join(map(str, available))})")
    return [x for x in available if not wanted or str(x) in wanted]


def main(argv=None) -> int:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--out", required=True, help="path stem for .json and .md")
    parser.add_argument("--only", default="", help="comma list of tasks to run (default all)")
    parser.add_argument("--rows", default="", help="comma list of experiments/rows (default all)")
    parser.add_argument("--seeds", default="", help="comma list of seeds to run (default all)")
    parser.add_argument("--budgets", default="",
                        help="comma list of the sweep's budgets to run (default all)")
    parser.add_argument("--note", default="", help="a remark printed under the table")
    parser.add_argument("--collect", action="store_true",
                        help="only gather finished cells (results.json); run nothing")
    parser.add_argument("--reuse", default="", metavar="FILE",
                        help="an earlier --out .json of this sweep: its cells count as finished "
                             "where the workdir has none and their config agrees")
    add_allow_dirty(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    log_packages_at_info()
    command = module_command("lora_jax.sweep", argv if argv is not None else sys.argv[1:])
    return run_main(lambda: run_sweep(args, command))


def cell_command(args, experiment: str, task: str, seed: int, budget: str = "") -> str:
    """The command that runs (or collects) exactly one cell of the sweep, as typed from the
    project root."""
    return module_command("lora_jax.sweep", [
        "--config", args.config, "--workdir", args.workdir, "--out", args.out, "--only", task,
        "--rows", experiment, "--seeds", str(seed), *(["--budgets", budget] if budget else []),
        *(["--allow-dirty"] if args.allow_dirty else [])])


def cell_dir(workdir: str, experiment: str, task: str, seed: int, budget: str = "") -> str:
    return os.path.join(workdir, cell_name(experiment, task, seed, budget))


def flat_config(config: dict) -> dict:
    """{dotted key: JSON value} of a config dict (tuples as lists), without ``resume`` (set by
    the sweep for a cell that was interrupted)."""
    flat, stack = {}, [("", json.loads(json.dumps(config)))]
    while stack:
        prefix, node = stack.pop()
        for key, value in node.items():
            if isinstance(value, dict):
                stack.append((f"{prefix}{key}.", value))
            elif f"{prefix}{key}" != "resume":
                flat[f"{prefix}{key}"] = value
    return flat


def reusable_cells(path: str) -> dict[tuple, dict]:
    """{(row, task, seed, budget): result} of an earlier sweep file."""
    if not os.path.isfile(path):
        raise UserError(f"--reuse {path} does not exist; give an earlier --out .json of this "
                        "sweep")
    return {cell_key(r): r for r in read_record(path)["results"]}


def restore_cell(done: str, recorded: dict, config) -> bool:
    """Write `recorded` (an earlier result of this cell) as the cell's results.json when its
    config agrees with the cell's on every key both have (a key the cell leaves empty, such as
    lorahub's ``merge_weights``, is the run's to fill in); False (the cell runs) otherwise."""
    ours, theirs = flat_config(config.to_dict()), flat_config(recorded.get("config", {}))
    differ = sorted(k for k in ours.keys() & theirs.keys()
                    if ours[k] != theirs[k] and ours[k] not in ([], ""))
    if differ or not theirs:
        logging.getLogger("lora_jax").warning(
            "sweep: not reusing the recorded %s %s seed %d: its config differs in %s",
            recorded["sweep_row"], recorded["task"], recorded["seed"],
            ", ".join(differ[:5]) or "everything")
        return False
    os.makedirs(os.path.dirname(done), exist_ok=True)
    write_json_atomic(done, {k: v for k, v in recorded.items()
                             if k not in ("sweep_row", "sweep_budget")})
    return True


def sweep_cells(sweep, tasks=None, rows=None, seeds=None, budgets=None
                ) -> list[tuple[int, str, str, str]]:
    """(seed, task, row, budget) of every cell, in the order the sweep runs them: of the given
    tasks / rows / seeds / budgets (default all of the sweep's), a row at only its
    ``row_seeds`` / ``row_budgets`` when it has them; budget "" in a sweep without budgets."""
    tasks = sweep.tasks if tasks is None else tasks
    rows = sweep.experiments if rows is None else rows
    seeds = sweep.seeds if seeds is None else seeds
    budgets = (budget_names(sweep) or [""]) if budgets is None else budgets
    row_seeds = dict(sweep.get("row_seeds", {}))
    row_budgets = dict(sweep.get("row_budgets", {}))
    return [(seed, task, row, budget) for seed in seeds for budget in budgets for task in tasks
            for row in rows if seed in row_seeds.get(row, sweep.seeds)
            and (not budget or budget in row_budgets.get(row, budgets))]


def run_sweep(args, command: str) -> int:
    code = code_state(args.out + ".json", args.allow_dirty)  # before hours of cells
    _, sweep = load_config(args.config)
    tasks = selected(args.only, sweep.tasks, "task(s)")
    rows = selected(args.rows, sweep.experiments, "row(s)")
    seeds = selected(args.seeds, sweep.seeds, "seed(s)")
    budgets = selected(args.budgets, budget_names(sweep), "budget(s)") or [""]
    cells = sweep_cells(sweep, tasks, rows, seeds, budgets)
    if not args.collect:  # every cell's config is checked before the first one runs
        for seed, task, exp, budget in cells:
            config = cell_config(sweep, exp, task, seed, ROOT, budget)
            runner(config.experiment)  # imports it, so its own config rules are registered
            validate_config(config)
    reuse = reusable_cells(args.reuse) if args.reuse else {}
    results = []
    for seed, task, exp, budget in cells:
        workdir = cell_dir(args.workdir, exp, task, seed, budget)
        done = os.path.join(workdir, "results.json")
        tags = {"sweep_row": exp, **({"sweep_budget": budget} if budget else {})}
        recorded = reuse.get((exp, task, seed, budget))
        if recorded is not None and not os.path.isfile(done):
            restore_cell(done, recorded, cell_config(sweep, exp, task, seed, ROOT, budget))
        if os.path.isfile(done):
            with open(done) as f:
                results.append({**json.load(f), **tags})
            continue
        if args.collect:
            continue
        logging.getLogger("lora_jax").info("sweep: %s %s%s seed %d", exp, task,
                                           f" budget {budget}" if budget else "", seed)
        config = cell_config(sweep, exp, task, seed, ROOT, budget)
        ckpts = os.path.join(workdir, "checkpoints")
        config.resume = os.path.isdir(ckpts) and bool(os.listdir(ckpts))
        result = run(config, workdir)
        result.update(code, command=cell_command(args, exp, task, seed, budget), **tags)
        write_json_atomic(done, result)
        results.append(result)
    if not results:
        raise UserError(f"no finished cell under {args.workdir}; run without --collect first")
    write_record(args.out, {"name": sweep.name, "note": args.note, **provenance(command),
                            **code}, results)
    shown = sweep.copy_and_resolve_references()  # the table covers what was asked for
    shown.tasks, shown.experiments, shown.seeds = tuple(tasks), tuple(rows), tuple(seeds)
    if "budgets" in shown:
        shown.budgets = ml_collections.ConfigDict({b: shown.budgets[b] for b in budgets})
    table = table_function(shown)(shown, results, command, args.note)
    write_table(args.out + ".md", table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
