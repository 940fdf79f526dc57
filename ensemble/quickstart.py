"""Offline smoke run of the whole first paper: ``python -m ensemble.quickstart``.

Builds the quickstart assets (a tiny random BERT and three synthetic tasks, see
`lora_jax.synthetic`), trains one FT_LoRA module per task and exports them as a module set
(`ensemble.train_modules`), then runs the paper's Table 2 rows on every task - Model (untrained
head), FFN (trained head), FT_LoRA (the modules themselves), AttEns (the attention combiner
over the k = 3 frozen modules), the simpler combiners Average and Scalar weights, the
weight-space merges (linear, TIES, DARE), LoraHub (where its extra is installed) and Fusion
(AdapterFusion over the modules' deltas inside every layer) - with `lora_jax.sweep`, and prints
the table. Run it from the
repository root (it reads configs/quickstart_sweep.py). A few minutes on 2 CPU cores.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import time

from lora_jax.cli import ArgumentParser, fail

WORKDIR = "runs/quickstart"  # configs/quickstart.py and attens_quickstart.py point here
SWEEP = "configs/quickstart_sweep.py"


def clear_runs(workdir: str, keep: str) -> None:
    """Delete everything under `workdir` (folders and files) except the path `keep`."""
    for name in os.listdir(workdir) if os.path.isdir(workdir) else ():
        path = os.path.join(workdir, name)
        if os.path.normpath(path) == os.path.normpath(keep):
            continue
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            os.remove(path)


def main(argv=None) -> int:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", action="store_true",
                        help="reuse finished runs under runs/quickstart instead of starting fresh")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    if not os.path.isfile(SWEEP):
        fail(f"{SWEEP} not found; run the quickstart from the repository root")
    from configs.quickstart import ASSETS
    from configs.quickstart_sweep import HAS_LORAHUB, TASKS
    from ensemble import train_modules
    from lora_jax import sweep
    from lora_jax.synthetic import make_quickstart_assets

    start = time.perf_counter()
    if not args.keep:  # a smoke run starts fresh, but keeps the (deterministic) assets
        clear_runs(WORKDIR, keep=ASSETS)
    make_quickstart_assets(ASSETS)
    print(f"1/2 training {len(TASKS)} FT_LoRA modules ({', '.join(TASKS)}) on a tiny random BERT")
    rc = train_modules.main(["--sweep", SWEEP, "--workdir", WORKDIR, "--tasks", ",".join(TASKS),
                             "--out", os.path.join(WORKDIR, "modules")])
    if rc:
        return rc
    print("2/2 Model, FFN, AttEns and the Average / Scalar-weights / merge / "
          f"{'LoraHub / ' if HAS_LORAHUB else ''}Fusion combiners (k=3 modules) on every task\n")
    rc = sweep.main(["--config", SWEEP, "--workdir", WORKDIR,
                     "--out", os.path.join(WORKDIR, "table")])
    if rc:
        return rc
    if not HAS_LORAHUB:
        print("\nThe LoraHub row is left out: its CMA-ES library is an optional extra "
              "(pip install -e '.[lorahub]').")
    print(f"\nThis was a SMOKE RUN ({time.perf_counter() - start:.0f} s): a random 2-layer BERT on "
          "synthetic tasks, so the numbers show that the pipeline works, not what AttEns is "
          "worth. The real commands (MiniLM on GLUE, the full AttEns reproduction, FLAN-T5) are "
          f"in README.md. Runs, checkpoints and TensorBoard events: {WORKDIR}/*")
    return 0


if __name__ == "__main__":
    sys.exit(main())
