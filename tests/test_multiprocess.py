"""Several processes, one run: each process's slice of the batches, the launcher, process-0-only writers, and
real runs in two processes (``python -m lora_jax.launch``, CPU collectives) against one.

The T5 and AttEns two-process runs live beside their other end-to-end tests
(tests/test_t5_train.py, tests/test_attens_train.py)."""

from __future__ import annotations

import json
import pathlib
import signal
import sys
import time

import numpy as np
import pytest

from lora_jax import data as data_lib
from lora_jax import distributed, launch
from lora_jax.errors import UserError
from tests.helpers import (
    assert_same_run,
    assert_two_processes_equal_one,
    failure_excerpt,
    run_until_killed,
    train_py,
)

ROOT = pathlib.Path(__file__).resolve().parents[1]
MINILM = ROOT.parent / "shared" / "models" / "paraphrase-MiniLM-L3-v2"
needs_shared = pytest.mark.skipif(
    not MINILM.is_dir(), reason=f"{MINILM} not found: the real-model multi-process runs need "
    "../shared beside the repository")

# SST-2 on the real MiniLM-L3: 10 steps of 16 rows, selection every 4 steps, checkpoints every 2
CLASSIFIER_ARGS = [
    "--config", str(ROOT / "configs" / "ft_lora.py"), f"--config.model={MINILM}",
    f"--config.data_dir={ROOT.parent / 'shared' / 'data'}", "--config.task=sst2",
    "--config.max_train_examples=160", "--config.max_eval_examples=96",
    "--config.selection_size=64", "--config.batch_size=16", "--config.eval_batch_size=32",
    "--config.num_epochs=1", "--config.max_length=32", "--config.progress=False",
    "--config.eval_every_steps=4", "--config.checkpoint_every_steps=2",
    "--config.optimizer.learning_rate=3e-3"]


# ----------------------------------------------------------------------------- the plan


def _global_batch(enc, step_rows, batch, processes, buckets=(8, 16, 32, 64)):
    """The host rows of one global batch as `processes` processes feed them, put together in
    process order (what `jax.make_array_from_process_local_data` assembles)."""
    parts = []
    for p in range(processes):
        share = distributed.BatchShare(p, processes)
        parts.append(data_lib.make_batch(enc, share.part(step_rows, batch),
                                         share.part_size(batch), buckets, 0, step_rows))
    return {k: np.concatenate([part[k] for part in parts]) for k in parts[0]}


@pytest.mark.parametrize("processes", [2, 4])
def test_processes_assemble_exactly_the_single_process_batches(processes):
    """Every train and eval batch, padding rows and padded length included, is the same array
    whether one process builds it or `processes` processes build its slices."""
    n, batch = 203, 16  # 203 = 12 full batches and one of 11 rows: the short batch is covered
    rng = np.random.default_rng(1)
    lengths = rng.integers(3, 60, n)
    enc = data_lib.Encoded([rng.integers(1, 999, m).astype(np.int32) for m in lengths],
                           [np.zeros(m, np.int32) for m in lengths], rng.integers(0, 4, n))
    plans = [*(data_lib.train_order(enc.lengths, batch, 7, e, True) for e in (0, 1)),
             data_lib.eval_order(enc.lengths, batch)]
    for plan in plans:
        assert len(plan) == data_lib.steps_per_epoch(n, batch) == 13
        for step_rows in plan:
            one = _global_batch(enc, step_rows, batch, 1)
            many = _global_batch(enc, step_rows, batch, processes)
            assert one.keys() == many.keys()
            for key in one:
                np.testing.assert_array_equal(many[key], one[key], err_msg=key)
    # each process's slice is contiguous, and all slices together are the batch's rows
    short = plans[0][int(np.argmin([len(x) for x in plans[0]]))]
    assert len(short) == 11
    slices = [distributed.BatchShare(p, processes).part(short, batch) for p in range(processes)]
    np.testing.assert_array_equal(np.concatenate(slices), short)
    assert all(len(s) <= batch // processes for s in slices)


def test_batch_sizes_that_do_not_split_over_the_processes_are_one_line_errors(monkeypatch):
    import jax

    monkeypatch.setattr(jax, "process_count", lambda: 3)
    monkeypatch.setattr(jax, "process_index", lambda: 1)
    with pytest.raises(UserError, match="eval_batch_size 32 cannot be split evenly over 3 "
                                        "processes; use a multiple of 3"):
        distributed.BatchShare.of_this_process(batch_size=48, eval_batch_size=32)
    assert distributed.BatchShare.of_this_process(batch_size=48) == distributed.BatchShare(1, 3)


def test_a_global_batch_pads_every_part_to_the_longest_row_of_all_parts():
    enc = data_lib.Encoded([np.arange(1, n + 1, dtype=np.int32) for n in (3, 20, 5, 4)],
                           [np.zeros(n, np.int32) for n in (3, 20, 5, 4)], np.arange(4))
    alone = data_lib.make_batch(enc, np.array([0, 2]), 2, (8, 16, 32), 0)
    together = data_lib.make_batch(enc, np.array([0, 2]), 2, (8, 16, 32), 0,
                                   pad_for=np.array([0, 2, 1, 3]))
    assert alone["input_ids"].shape == (2, 8) and together["input_ids"].shape == (2, 32)
    np.testing.assert_array_equal(together["input_ids"][:, :8], alone["input_ids"])


# ----------------------------------------------------------------------------- the launcher


def test_the_launcher_stops_the_others_when_one_process_fails(capsys):
    script = ("import os, sys, time\n"
              "if os.environ['LORA_JAX_PROCESS_ID'] == '1': sys.exit(3)\n"
              "time.sleep(120)\n")
    t0 = time.monotonic()
    code = launch.launch(["-c", script], processes=2)
    # stopped, not waited for: well before the survivor's 120 s sleep would have ended
    assert code == 3 and time.monotonic() - t0 < 100
    assert "error: process 1 of 2 exited with status 3; stopping the other 1" in (
        capsys.readouterr().err)


def test_the_launcher_names_the_killed_process_not_the_peer_that_failed_after_it():
    """Process 1 was killed and process 0 has already failed in a collective when the launcher
    looks: the killed one is reported."""
    assert launch.first_failure([1, -signal.SIGKILL]) == (1, -signal.SIGKILL)
    assert launch.first_failure([None, 3, 2]) == (1, 3)
    assert launch.first_failure([0, None]) is None


def test_a_lost_peer_is_one_line_and_exit_1_other_runtime_errors_raise(monkeypatch, capsys):
    """What XLA's gloo collective raises in process 0 when process 1 is killed (copied from a
    real run) ends as one error line; the same error in a one-process run, or another runtime
    error, keeps its traceback."""
    import jax

    from lora_jax.cli import run_main

    gone = jax.errors.JaxRuntimeError(
        "UNKNOWN: Gloo AllGather failed: [external/gloo/gloo/transport/tcp/pair.cc:538] Read "
        "error [127.0.0.1]:54501: Connection reset by peer")

    def body(error):
        def run():
            raise error
        return run

    with pytest.raises(jax.errors.JaxRuntimeError):
        run_main(body(gone))  # one process: not a lost peer
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    assert run_main(body(gone)) == 1
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("error: process 0 of 2: another process of the run is gone (")
    assert "Connection reset by peer" in line and "--config.resume=True" in line
    with pytest.raises(jax.errors.JaxRuntimeError):
        run_main(body(jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: out of memory")))


def test_the_launcher_gives_each_process_its_coordinates():
    env = launch.process_env({"XLA_FLAGS": "--xla_force_host_platform_device_count=8 --x=1"},
                             1, 4, 1234, "cpu", 2)
    assert (env["LORA_JAX_COORDINATOR"], env["LORA_JAX_NUM_PROCESSES"],
            env["LORA_JAX_PROCESS_ID"], env["JAX_PLATFORMS"]) == ("127.0.0.1:1234", "4", "1",
                                                                   "cpu")
    assert env["XLA_FLAGS"] == "--x=1 --xla_force_host_platform_device_count=2"


def test_launcher_usage_errors(capsys):
    assert launch.main(["--processes", "2", "train.py"]) == 2
    assert "put the command after --" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        launch.main(["--processes", "0", "--", "train.py"])


def test_initialize_refuses_a_half_described_run(monkeypatch):
    monkeypatch.setenv(distributed.ENV_NUM_PROCESSES, "2")
    monkeypatch.delenv(distributed.ENV_COORDINATOR, raising=False)
    with pytest.raises(UserError, match="needs a coordinator address"):
        distributed.initialize()


def test_train_py_with_half_the_process_flags_is_a_one_line_error(tmp_path):
    import subprocess

    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), "--config",
                           str(ROOT / "configs" / "quickstart.py"), f"--workdir={tmp_path / 'w'}",
                           "--num_processes=2", "--process_id=0"],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith(
        "error: a 2-process run needs a coordinator address")
    assert not (tmp_path / "w").exists()


# ----------------------------------------------------------------------------- writers


def test_only_process_0_writes_results_metrics_and_events(tmp_path, monkeypatch):
    """A process other than the first trains and checkpoints (collectively) but writes no
    results.json, metrics.jsonl or TensorBoard events."""
    from lora_jax import trainer
    from lora_jax.classifier import train_and_evaluate
    from lora_jax.experiments import load_config
    from lora_jax.synthetic import make_quickstart_assets

    model, data = make_quickstart_assets(str(tmp_path / "assets"))
    _, c = load_config(str(ROOT / "configs" / "quickstart.py"))
    c.model, c.data_dir, c.progress, c.max_steps = model, data, False, 4
    monkeypatch.setattr(trainer, "is_main_process", lambda: False)
    train_and_evaluate(c, str(tmp_path / "run"))
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["checkpoints"]
    monkeypatch.undo()
    train_and_evaluate(c, str(tmp_path / "run0"))
    assert {"results.json", "metrics.jsonl", "tensorboard"} <= {
        p.name for p in (tmp_path / "run0").iterdir()}


# ----------------------------------------------------------------------------- real runs


@pytest.fixture(scope="module")
def classifier_runs(tmp_path_factory):
    return assert_two_processes_equal_one(CLASSIFIER_ARGS, tmp_path_factory.mktemp("classifier"))


@needs_shared
def test_classifier_in_two_processes_equals_one(classifier_runs):
    one, two = classifier_runs  # compared in the fixture: selection, metrics, lines, trees
    results = json.loads((two / "results.json").read_text())
    assert results["last_step"] == 10 and "2 processes" in results["machine"]
    assert results["sizes"] == {"train": 160, "selection": 64, "validation": 96}


@needs_shared
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_kill_9_of_one_process_stops_the_run_and_a_resume_on_any_process_count_is_exact(
        classifier_runs, tmp_path):
    """Process 1 of 2 killed after the checkpoint of step 4: the launcher names it and stops
    its peer. The run then resumes in two processes up to step 7 and finishes in one process
    (two devices): the batches do not depend on the process count, so it ends as the
    uninterrupted two-process run did."""
    _, two = classifier_runs
    killed = tmp_path / "killed"
    code, output, survivors = run_until_killed(CLASSIFIER_ARGS, killed, at=4, processes=2)
    assert code != 0
    assert "error: process 1 of 2 was killed by SIGKILL; stopping the other 1" in output
    assert survivors and not any(pathlib.Path(f"/proc/{pid}").exists() for pid in survivors)
    on_two = train_py([*CLASSIFIER_ARGS, "--config.resume=True", "--config.stop_after_steps=7"],
                      killed, processes=2)
    assert on_two.returncode == 0, failure_excerpt(on_two.stdout + on_two.stderr)
    assert not (killed / "results.json").exists()
    on_one = train_py([*CLASSIFIER_ARGS, "--config.resume=True"], killed, processes=1)
    assert on_one.returncode == 0, failure_excerpt(on_one.stdout + on_one.stderr)
    assert json.loads((killed / "results.json").read_text())["processes"] == 1
    assert_same_run(two, killed)
