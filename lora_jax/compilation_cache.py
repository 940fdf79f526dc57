"""JAX's persistent compilation cache, on by default: a program compiled once on this machine
is loaded from disk by every later run instead of being compiled again.

Every run of the library builds its jitted functions afresh (a sweep cell, a k-sweep point, a
seed), so without the cache each one compiles the same programs again. Measured on a 2-core
Intel Xeon (jaxlib 0.10.2, fp32, quiet): the AttEns run of `benchmarks.attens` (MiniLM-L3,
k = 6, 512 train rows, 20 epochs; `ensemble.train.train_attens`), two runs in one process,
each with its own feature cache: 22.2 s and 19.5 s without the compilation cache; with it,
starting empty, 20.2 s and 13.7 s; with the entries of that earlier process, 17.4 s and 12.2 s.
Same accuracy in all six: a cache hit is the executable that compiling would give (JAX keys
an entry by the program, the compile options, the XLA flags and the jax version).

The folder: ``$LORA_JAX_COMPILATION_CACHE`` when set (``0`` turns the cache off), else
``~/.cache/lora_jax/jit/<jaxlib version>-<cpu>``, where ``<cpu>`` hashes /proc/cpuinfo's model
name and flags: XLA:CPU compiles for the host's vector extensions, which JAX's key does not
record, so a home folder shared by different machines must not share entries. Entries of
programs that compile in under half a second are not written (writing costs about as much),
and the folder is capped at 1 GiB, least recently used entries evicted first (the cap also
turns on JAX's file lock, which keeps concurrent writers apart). A user's own
``JAX_COMPILATION_CACHE_DIR`` (or a cache set with ``jax.config`` before lora_jax is imported)
is left as it is, and so is each of these settings the user gives as JAX's environment variable
(``JAX_COMPILATION_CACHE_MAX_SIZE``, ...), whether jax or lora_jax is imported first.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import sys
from contextlib import contextmanager

from lora_jax.xla_flags import cpuinfo_field

VARIABLE = "LORA_JAX_COMPILATION_CACHE"
MIN_COMPILE_SECONDS = 0.5
MAX_BYTES = 1 << 30
# JAX's settings of the cache (its config names), as applied when none of them was set
SETTINGS = {"jax_persistent_cache_min_compile_time_secs": MIN_COMPILE_SECONDS,
            "jax_persistent_cache_min_entry_size_bytes": 0,
            "jax_compilation_cache_max_size": MAX_BYTES}


def machine_tag() -> str:
    """``<jaxlib version>-<8 hex digits of the CPU's model name and flags>``."""
    try:
        jaxlib = importlib.metadata.version("jaxlib")
    except importlib.metadata.PackageNotFoundError:
        jaxlib = "unknown"
    cpu = f"{cpuinfo_field('model name')}|{cpuinfo_field('flags')}"
    return f"{jaxlib}-{hashlib.sha256(cpu.encode()).hexdigest()[:8]}"


def default_dir(environ=os.environ) -> str:
    """The cache folder the library uses ("" for none; see the module docstring)."""
    chosen = environ.get(VARIABLE, "")
    if chosen == "0":
        return ""
    if chosen:
        return os.path.expanduser(chosen)
    home = environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(home, "lora_jax", "jit", machine_tag())


def enable_default_cache(environ=os.environ) -> str:
    """Turn the cache on at `default_dir` unless the user set one or turned it off; returns the
    folder ("" when this call set nothing). Before JAX is imported, through its environment
    variables (JAX reads them on import); after, through ``jax.config``."""
    folder = default_dir(environ)
    if not folder or environ.get("JAX_COMPILATION_CACHE_DIR"):
        return ""
    jax = sys.modules.get("jax")
    if jax is None:
        environ["JAX_COMPILATION_CACHE_DIR"] = folder
        for name, value in SETTINGS.items():
            environ.setdefault(name.upper(), str(value))
        return folder
    if jax.config.jax_compilation_cache_dir is not None:
        return ""
    _configure(jax, folder, environ)
    return folder


def _configure(jax, folder: str, environ=os.environ) -> None:
    """Point ``jax.config`` at `folder` with the library's `SETTINGS`, except those the
    environment sets (JAX read them on import: the user's, as on the path before import)."""
    jax.config.update("jax_compilation_cache_dir", folder)
    for name, value in SETTINGS.items():
        if name.upper() not in environ:
            jax.config.update(name, value)


@contextmanager
def cache_at(folder: str):
    """Compile and load programs with the cache at `folder` inside the block (the benchmarks:
    a cold cache of their own), then the cache as it was."""
    import jax
    from jax.experimental.compilation_cache import compilation_cache

    before = {name: getattr(jax.config, name) for name in ("jax_compilation_cache_dir",
                                                           *SETTINGS)}
    _configure(jax, folder)
    compilation_cache.reset_cache()
    try:
        yield folder
    finally:
        for name, value in before.items():
            jax.config.update(name, value)
        compilation_cache.reset_cache()
