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


def pytest_configure(config):
    """One persistent JAX compilation cache per test run, shared by the xdist workers and by
    every command a test starts in a subprocess (they inherit the environment).

    Many tests compile the same small programs (a kill -9 test runs the same training three
    times); compiling each once per run instead of once per process cuts the suite by minutes.
    The cache key covers the program, the flags and the jax version, so a hit is the same
    executable. The size cap turns on JAX's file lock, which keeps concurrent writers apart.
    Programs that compile in under half a second (eager ops, small helpers) are not cached:
    writing them costs more than compiling them again. The controller deletes the folder at the
    end of the run.
    """
    run_id = os.environ.get("PYTEST_XDIST_TESTRUNUID") or f"pid{os.getpid()}"
    os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                          os.path.join(tempfile.gettempdir(), f"lora_jax_tests_jit_{run_id}"))
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
    os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(4 << 30))


SLOW_TEST_SECONDS, TEST_SECONDS = 60, 3  # rough costs, for ordering the files only


def pytest_collection_modifyitems(config, items):
    """Longest files first: with ``--dist loadfile --no-loadscope-reorder`` the two workers
    take files in this order, so the few files with minute-long tests (marked ``slow``) start
    first and the many short ones fill the end, instead of a slow file starting last.

    A file's estimated cost: SLOW_TEST_SECONDS per slow test function (parametrized copies
    share fixtures, so they count once) plus TEST_SECONDS per other test. Within a file the
    order is unchanged.
    """
    cost: dict[str, float] = {}
    slow_seen: set[tuple[str, str]] = set()
    for item in items:
        path = item.nodeid.split("::")[0]
        key = (path, getattr(item, "originalname", item.name))
        slow = item.get_closest_marker("slow") is not None
        cost[path] = cost.get(path, 0.0) + (
            (SLOW_TEST_SECONDS if key not in slow_seen else 0.0) if slow else TEST_SECONDS)
        if slow:
            slow_seen.add(key)
    first = {path: i for i, path in enumerate(dict.fromkeys(i.nodeid.split("::")[0]
                                                            for i in items))}
    items.sort(key=lambda item: (-cost[item.nodeid.split("::")[0]],
                                 first[item.nodeid.split("::")[0]]))


def pytest_unconfigure(config):
    cache = os.environ.get("JAX_COMPILATION_CACHE_DIR", "")
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
