"""Train and evaluate one experiment.

    python train.py --config configs/ft_lora.py --workdir runs/x [--config.task=rte ...]

Writes <workdir>/metrics.jsonl, TensorBoard events, Orbax checkpoints and results.json. Several
processes: ``python -m lora_jax.launch --processes 2 -- train.py ...`` (lora_jax/distributed.py). Bad
input (a flag, a config key, a path, the data) ends with one line ``error: ...`` on stderr and
exit status 2, before anything is written.
"""

import logging
import re
import sys

from absl import app, flags
from ml_collections import config_flags

from lora_jax.cli import fail, run_main

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/*.py).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Folder for checkpoints, metrics and results.json.")
flags.DEFINE_string("coordinator_address", "", "Several processes: host:port of process 0 "
                    "(default: $LORA_JAX_COORDINATOR, set by python -m lora_jax.launch).")
flags.DEFINE_integer("num_processes", 0, "Several processes: how many (default: "
                     "$LORA_JAX_NUM_PROCESSES; 0 or 1: a single-process run).")
flags.DEFINE_integer("process_id", -1, "Several processes: this one's rank, 0..num_processes-1 "
                     "(default: $LORA_JAX_PROCESS_ID).")
flags.mark_flags_as_required(["config", "workdir"])


def flag_error_message(error: Exception) -> str:
    """One line for a flag-parsing failure (unknown config key, bad value, missing file)."""
    text = str(error).replace("\\n", "\n").replace("\\'", "'")
    key = re.search(r"'([^'\n]+)'", text)
    suggestion = re.search(r'Did you mean "([^"]+)"', text)
    if isinstance(error, (KeyError, AttributeError)) and key:
        hint = f"did you mean {suggestion.group(1)!r}? " if suggestion else ""
        return (f"unknown config key {key.group(1)!r}; {hint}see the config file for the "
                "valid keys")
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if "Attempted" in text or "No such file" in text:
        return (f"cannot load the config file ({lines[-1]}); pass an existing file such as "
                "--config configs/ft_lora.py")
    return " ".join(lines[:1] + lines[-1:]) if len(lines) > 1 else (lines or [repr(error)])[0]


def parse_flags(argv):
    try:
        argv = FLAGS(argv)
        FLAGS.config.keys()  # ml_collections loads the file lazily: fail here, not later
        return argv
    except (flags.Error, KeyError, AttributeError, TypeError, ValueError, OSError) as e:
        fail(flag_error_message(e))


def main(argv):
    if len(argv) > 1:
        fail(f"unexpected arguments: {' '.join(argv[1:])}; options look like --config.task=rte")
    logging.getLogger().setLevel(logging.WARNING)  # Orbax and JAX log every step at INFO
    from lora_jax.checkpoint import check_workdir
    from lora_jax.config_check import validate_config
    from lora_jax.distributed import initialize, is_main_process
    from lora_jax.experiments import log_packages_at_info, run
    from lora_jax.report import print_results

    log_packages_at_info()

    def body():
        # a no-op unless started by lora_jax.launch, on a cluster or with the flags above
        initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
        validate_config(FLAGS.config)  # the shared keys, before the experiment's heavy imports
        check_workdir(FLAGS.workdir, FLAGS.config.get("resume", False))  # before any data or weights load
        results = run(FLAGS.config, FLAGS.workdir)
        if not is_main_process():
            return
        if "stopped_at_step" in results:
            print(f"stopped at step {results['stopped_at_step']} of {results['total_steps']}; "
                  "continue with --config.resume=True")
        else:
            print_results([results])

    sys.exit(run_main(body))


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
