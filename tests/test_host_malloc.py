"""The malloc settings of lora_jax/host_malloc.py: applied on import on Linux/glibc, off with
LORA_JAX_MALLOC=0, and with them XLA:CPU's large per-call buffers stop page-faulting; inside
`large_blocks_mapped` they are mapped per call again."""

import json
import os
import statistics
import subprocess
import sys

import pytest

from lora_jax import host_malloc

needs_glibc = pytest.mark.skipif(host_malloc.glibc() is None,
                                 reason="mallopt settings apply to Linux with glibc only")

# A jitted call whose exp(x) is a 64 MiB temporary that XLA:CPU allocates and frees per call,
# and `faults(n)`: the minor page faults of each of n calls.
CALL = """
import json, resource
from lora_jax import host_malloc
import jax, jax.numpy as jnp
f = jax.jit(lambda x, w: jnp.exp(x) @ w)
x, w = jnp.ones((16384, 1024)), jnp.ones((1024, 8))
def faults(n):
    out = []
    for _ in range(n):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        f(x, w).block_until_ready()
        out.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    return out
"""
# 25 calls after a warm-up call
FAULTS_PER_CALL = CALL + """
f(x, w).block_until_ready()
print(json.dumps(faults(25)))
"""
# inside nested `large_blocks_mapped` blocks (the inner one closed before the calls), then
# after the outer block closes
FAULTS_BY_PHASE = CALL + """
phases = {}
with host_malloc.large_blocks_mapped():
    with host_malloc.large_blocks_mapped():
        pass
    phases["mapped"] = faults(12)
phases["kept"] = faults(25)
print(json.dumps(phases))
"""


def run_printing_json(script: str, malloc_switch: str = "1"):
    """The JSON that `script` prints last, run in a fresh interpreter."""
    environ = {**os.environ, "LORA_JAX_MALLOC": malloc_switch}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=120, env=environ)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_off_switch_changes_nothing():
    assert host_malloc.keep_heap_memory({"LORA_JAX_MALLOC": "0"}) is False


@needs_glibc
def test_glibc_accepts_every_setting():
    assert host_malloc.keep_heap_memory({}) is True


@needs_glibc
def test_large_xla_buffers_stop_page_faulting():
    # 64 MiB is 16,384 pages: glibc's default maps and unmaps the block at every call, so every
    # call faults on every page. With the settings the heap keeps freed blocks; it still grows
    # a few times while small allocations fragment it (each growth faults once), then the
    # calls reuse it: most calls fault on no page.
    default = run_printing_json(FAULTS_PER_CALL, "0")
    tuned = run_printing_json(FAULTS_PER_CALL, "1")
    assert min(default) > 16_000, default
    assert statistics.median(tuned) < 100, tuned


@needs_glibc
def test_large_blocks_are_mapped_inside_the_block_only():
    # inside (the inner block closed first and left the switch on): the 64 MiB block (16,384
    # pages) finds no room in the small heap, so it is mapped and unmapped at every call and
    # every call faults on all its pages, as with glibc's default; after the outer block the
    # heap takes it, grows a few times, then serves it without faults
    phases = run_printing_json(FAULTS_BY_PHASE)
    assert min(phases["mapped"]) > 16_000, phases
    assert statistics.median(phases["kept"]) < 100, phases


def test_large_blocks_mapped_does_nothing_without_the_settings(monkeypatch):
    calls = []
    monkeypatch.setattr(host_malloc, "_applied", False)
    monkeypatch.setattr(host_malloc, "glibc", lambda: calls.append("glibc"))
    with host_malloc.large_blocks_mapped():
        pass
    assert calls == []
