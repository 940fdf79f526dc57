"""Shared fixtures. Tests needing ../shared skip with a reason when it is absent."""

from __future__ import annotations

import os
import pathlib
import shutil
import tempfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED = pathlib.Path(os.environ.get("LORA_JAX_SHARED", ROOT.parent / "shared"))
MINILM_L3 = SHARED / "models" / "paraphrase-MiniLM-L3-v2"
DATA_DIR = SHARED / "data"
# lora_jax.compilation_cache.VARIABLE (not imported here: importing lora_jax sets up JAX)
CACHE_VARIABLE = "LORA_JAX_COMPILATION_CACHE"


def pytest_configure(config):
    """One persistent JAX compilation cache per test run, shared by the xdist workers and by
    every command a test starts in a subprocess (they inherit the environment).

    Many tests compile the same small programs (a kill -9 test runs the same training three
    times); compiling each once per run instead of once per process cuts the suite by minutes.
    The library's own cache (`lora_jax.compilation_cache`, on at ``import lora_jax``) is pointed
    at a folder of this run's, with the library's settings, and a cap of 4 GiB instead of 1 (a
    run writes more than any one user's job; the cap also turns on JAX's file lock, which keeps
    the concurrent writers apart). The controller deletes the folder at the end of the run.
    """
    run_id = os.environ.get("PYTEST_XDIST_TESTRUNUID") or f"pid{os.getpid()}"
    os.environ.setdefault(CACHE_VARIABLE,
                          os.path.join(tempfile.gettempdir(), f"lora_jax_tests_jit_{run_id}"))
    os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(4 << 30))
    # PyTorch (the reference side of the parity tests and the benchmark peers) runs one
    # intra-op thread: the suite runs one worker per core, and a pool of one thread per core
    # spins against the other worker (measured: the benchmark smoke run took 98 s, 50 s with
    # one thread, on 2 busy cores). Results do not depend on it; XLA's pool ignores it.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    # xdist hands out files with the most tests first unless told otherwise; the collection
    # order (`pytest_collection_modifyitems`: the longest files first) is the better one
    if hasattr(config.option, "loadscopereorder"):
        config.option.loadscopereorder = False


# The files that take longest, longest first (their tests' seconds in one 2-core run of the
# README command at 106ae09, summed per file from a junit XML: 313, 294, 237, 218, 196, 186,
# 79, 60; the suite's total was 2,060 worker-seconds in 1,048 s). `-n 2 --dist loadfile` hands
# out whole files in collection order (see `pytest_configure`), so starting the long ones first
# keeps both workers busy to the end (longest-first scheduling) instead of leaving one long
# file to run alone at the end. Re-measure when a file's tests change much.
LONGEST_FIRST = ("test_t5_train.py", "test_attens_train.py", "test_train.py",
                 "test_benchmarks.py", "test_sweep_and_quickstart.py", "test_multiprocess.py",
                 "test_routing.py", "test_bad_inputs.py")


def pytest_collection_modifyitems(session, config, items):
    """The long files first (`LONGEST_FIRST`), every other file after them in its usual order;
    the tests inside a file keep their order."""
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


def pytest_unconfigure(config):
    cache = os.environ.get(CACHE_VARIABLE, "")
    if (os.path.basename(cache).startswith("lora_jax_tests_jit_")
            and "PYTEST_XDIST_WORKER" not in os.environ):
        shutil.rmtree(cache, ignore_errors=True)


def require_shared(path: pathlib.Path) -> pathlib.Path:
    if not path.exists():
        pytest.skip(f"{path} is absent (the offline ../shared folder is not beside this clone)")
    return path


@pytest.fixture
def minilm_l3() -> pathlib.Path:
    return require_shared(MINILM_L3)


@pytest.fixture
def data_dir() -> pathlib.Path:
    return require_shared(DATA_DIR)
