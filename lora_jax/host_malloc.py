"""glibc malloc settings the library applies on import, so XLA:CPU reuses its buffers.

XLA:CPU allocates each execution's temporary buffer (one block holding every intermediate of a
train step: 305 MB for the T5 benchmark step, more for the MiniLM step at length 128) with
malloc, and frees it when the step ends. glibc serves a block that large with a fresh ``mmap``
and returns it with ``munmap`` on free, so every step the kernel zero-fills each 4 KiB page on
first touch again. Measured on a 2-core machine (jaxlib 0.10.2, fp32, `benchmarks/`): 83,000
page faults and 140 ms of system time per 270 ms T5 step; 65,000 faults per MiniLM LoRA step at
length 64 (215 ms) and 151,000 at length 128 (570 ms). With the three settings below, after the
first steps there are no page faults at all: the T5 step ran in 212 ms, the MiniLM step in
164 ms (length 64) and 386 ms (length 128). PyTorch in the same process gains a little too.

  M_MMAP_MAX = 0         never mmap a block: large ones come from the heap and stay there;
  M_ARENA_MAX = 1        one heap for all threads (XLA's worker threads otherwise allocate in
                         per-thread arenas made of mmapped 64 MiB heaps, which are unmapped);
  M_TRIM_THRESHOLD = -1  never give the top of the heap back to the kernel (mallopt(3): -1
                         turns trimming off).

The costs:
- memory: freed blocks stay in the process and small allocations fragment the heap, so the
  resident size settles above its old peak (a 64 MiB temporary grew the heap by 4-6 blocks
  before the calls stopped faulting; about 1 GB more in the MiniLM length-128 benchmark);
- decoding: greedy and beam search, thousands of small ops per sequence, ran 8-10% slower in
  A/B runs of `benchmarks.t5_generate` (greedy 3.2x against 3.5x `generate`, beam 2.0x
  against 2.1x, medians of three runs each), most likely from one heap lock for all threads.
Training is the library's main work, so the settings are on by default.

One pass is the exception: the stacked feature pass of AttEns and its siblings
(`ensemble.features.compute_split_features`) runs k + 1 encoder passes per batch, and its
temporary is large (1,625 MiB for MiniLM-L6, k = 6, 64 rows x 128 tokens, from XLA's
`memory_analysis`). The fragmenting heap settled at about five of those, so that pass runs
inside `large_blocks_mapped`, which maps such blocks again. Measured on a 2-core AMD EPYC (an
AttEns IMDB cell of the MiniLM-L6 grid cut to 512 train rows, `/usr/bin/time` peak resident
size, two other jobs on the cores): 9.10 GB with the heap kept throughout, 2.64 GB with the
feature pass inside the block; its features took 239 s and 244 s. On short rows the faults
cost a little more: SST-2's 872 validation rows (MiniLM-L6, k = 6, batches of 64, a fresh
process per run, two runs each on idle cores) took 38.7-40.3 s per pass with the blocks mapped
(2.0 million faults a pass) against 36.9-38.7 s once the kept heap had grown (45.7 and 38.7 s
for the pass that grew it), peak 1.7 GB against 2.5-2.9 GB.

``LORA_JAX_MALLOC=0`` in the environment leaves malloc as it is. On anything but Linux with
glibc (macOS, musl) nothing is changed; GPU runs are unaffected apart from host memory.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import sys
import threading

M_TRIM_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -4, -8  # glibc's <malloc.h> parameter numbers
SETTINGS = ((M_MMAP_MAX, 0), (M_ARENA_MAX, 1), (M_TRIM_THRESHOLD, -1))
GLIBC_MMAP_MAX = 65536  # glibc's own M_MMAP_MAX (DEFAULT_MMAP_MAX in malloc.c)

_applied = False  # keep_heap_memory's settings are in force
_mapped_depth = 0  # open `large_blocks_mapped` blocks, all threads
_mapped_lock = threading.Lock()


def glibc() -> ctypes.CDLL | None:
    """The process's C library when it is glibc (it has `mallopt`), else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.gnu_get_libc_version  # glibc only  # noqa: B018
        return libc
    except (OSError, AttributeError):
        return None


def keep_heap_memory(environ=os.environ) -> bool:
    """Apply `SETTINGS` with glibc's mallopt unless ``LORA_JAX_MALLOC=0``; True when all were
    accepted. Safe to call more than once; affects allocations made after the call."""
    if environ.get("LORA_JAX_MALLOC", "1") == "0":
        return False
    global _applied
    libc = glibc()
    if libc is None:
        return False
    _applied = all([libc.mallopt(param, value) == 1 for param, value in SETTINGS])
    return _applied


@contextlib.contextmanager
def large_blocks_mapped():
    """Inside the block, a large block that finds no room in the heap is mapped (glibc's own
    ``M_MMAP_MAX``) and unmapped when freed, instead of growing the kept heap (see the module
    docstring); one that fits the heap's free space is still served from it, and blocks
    allocated before keep their kind. Nested and concurrent blocks share one switch, turned
    back at the last exit. Does nothing where `keep_heap_memory` changed nothing."""
    global _mapped_depth
    libc = glibc() if _applied else None
    if libc is None:
        yield
        return
    with _mapped_lock:
        _mapped_depth += 1
        if _mapped_depth == 1:
            libc.mallopt(M_MMAP_MAX, GLIBC_MMAP_MAX)
    try:
        yield
    finally:
        with _mapped_lock:
            _mapped_depth -= 1
            if _mapped_depth == 0:
                libc.mallopt(M_MMAP_MAX, 0)
