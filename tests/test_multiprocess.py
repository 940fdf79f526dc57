"""Several processes, one run: the data-shard plan, the launcher, process-0-only writers, and
real runs in two processes (``python -m lora_jax.launch``, CPU collectives) against one.

The T5 and AttEns two-process runs live beside their other end-to-end tests
(tests/test_t5_train.py, tests/test_attens_train.py)."""

from __future__ import annotations

import json
import os
import pathlib
import signal
import sys
import time

import numpy as np
import pytest

from lora_jax import data as data_lib
from lora_jax import distributed, launch
from lora_jax.errors import UserError
from tests.helpers import assert_same_run, assert_two_processes_equal_one, train_py

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


def test_one_shard_is_the_single_process_order():
    lengths = np.random.default_rng(0).integers(3, 60, 203)
    shards = distributed.DataShards()
    for epoch in (0, 1):
        plan = shards.train_batches(lengths, 16, 7, epoch, True)
        order = data_lib.train_order(lengths, 16, 7, epoch, True)
        assert len(plan) == len(order) == distributed.steps_per_epoch(203, 16)
        for parts, idx in zip(plan, order, strict=True):
            np.testing.assert_array_equal(parts[0], idx)
    for parts, idx in zip(shards.eval_batches(lengths, 32), data_lib.eval_order(lengths, 32),
                          strict=True):
        np.testing.assert_array_equal(parts[0], idx)


@pytest.mark.parametrize("count", [2, 4])
def test_shards_deal_every_row_once_per_epoch(count):
    n, batch = 203, 16
    lengths = np.random.default_rng(1).integers(3, 60, n)
    shards = distributed.DataShards(count, tuple(range(count)))
    plan = shards.train_batches(lengths, batch, 0, 0, True)
    assert len(plan) == distributed.steps_per_epoch(n, batch, count)
    seen = np.concatenate([np.concatenate(parts) for parts in plan])
    np.testing.assert_array_equal(np.sort(seen), np.arange(n))  # each row exactly once
    for parts in plan:
        assert len(parts) == count
        for s, part in enumerate(parts):
            assert len(part) <= batch // count and np.all(part % count == s)
    assert not np.array_equal(np.concatenate(plan[0]),
                              np.concatenate(shards.train_batches(lengths, batch, 0, 1, True)[0]))
    # process 1 of 2 owns the upper half of the shards and reads only their rows
    half = distributed.DataShards.for_process(count, 1, 2)
    assert half.owned == tuple(range(count // 2, count))
    np.testing.assert_array_equal(half.rows(n), np.flatnonzero(np.arange(n) % count >= count // 2))
    assert [p.tolist() for p in half.local_parts(plan[0])] == [p.tolist() for p in
                                                                plan[0][count // 2:]]


def test_shard_counts_that_do_not_fit_are_one_line_errors():
    from lora_jax.experiments import load_config

    _, c = load_config(str(ROOT / "configs" / "ft_lora.py"))
    c.data_shards, c.batch_size, c.eval_batch_size = 3, 16, 32
    with pytest.raises(UserError, match="batch_size 16 is not divisible by data_shards=3"):
        distributed.DataShards.from_config(c)
    c.data_shards = 0  # one per process
    assert distributed.DataShards.from_config(c) == distributed.DataShards(1, (0,))


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
    assert code == 3 and time.monotonic() - t0 < launch.GRACE_SECONDS + 20
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


def _children(pid: int) -> dict[int, int]:
    """{process id (LORA_JAX_PROCESS_ID): pid} of the launcher's children."""
    out = {}
    for child in (pathlib.Path(f"/proc/{pid}/task/{pid}/children").read_text().split()):
        environ = pathlib.Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
        ids = [e.split(b"=", 1)[1] for e in environ if e.startswith(b"LORA_JAX_PROCESS_ID=")]
        if ids:
            out[int(ids[0])] = int(child)
    return out


@needs_shared
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_kill_9_of_one_process_stops_the_run_and_resume_equals_uninterrupted(classifier_runs,
                                                                             tmp_path):
    _, two = classifier_runs
    killed = tmp_path / "killed"
    at = int(np.random.default_rng(int(time.time())).integers(2, 7))  # a checkpoint of 2..6 (of 10 steps)
    print(f"killing process 1 once the checkpoint of step {at} or later exists")
    launcher = train_py(CLASSIFIER_ARGS, killed, processes=2, wait=False)
    ckpts, deadline, victim = killed / "checkpoints", time.time() + 600, None
    while time.time() < deadline and launcher.poll() is None:
        steps = [int(p.name) for p in ckpts.iterdir() if p.name.isdigit()] if (
            ckpts.is_dir()) else []
        if steps and max(steps) >= at:
            children = _children(launcher.pid)
            victim, survivor = children[1], children[0]
            os.kill(victim, signal.SIGKILL)
            break
        time.sleep(0.05)
    assert victim is not None, "the run ended before it could be killed"
    t0 = time.monotonic()
    output, _ = launcher.communicate(timeout=120)
    assert time.monotonic() - t0 < launch.GRACE_SECONDS + 30  # no hang
    assert launcher.returncode != 0
    assert "error: process 1 of 2 was killed by SIGKILL; stopping the other 1" in output
    assert not pathlib.Path(f"/proc/{survivor}").exists()  # the peer was stopped and reaped
    assert not (killed / "results.json").exists()
    resumed = train_py([*CLASSIFIER_ARGS, "--config.resume=True"], killed, processes=2)
    assert resumed.returncode == 0, (resumed.stdout + resumed.stderr)[-3000:]
    assert_same_run(two, killed)
