"""The persistent compilation cache the library turns on: where it goes, what the user's own
settings keep, and that a second process loads what the first compiled."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from lora_jax import compilation_cache as cc


def test_the_default_folder_names_jaxlib_and_the_cpu_and_the_user_can_move_or_stop_it(tmp_path):
    tag = cc.machine_tag()
    jaxlib, _, cpu = tag.rpartition("-")
    assert jaxlib and len(cpu) == 8 and int(cpu, 16) >= 0
    assert cc.default_dir({"XDG_CACHE_HOME": str(tmp_path)}) == str(
        tmp_path / "lora_jax" / "jit" / tag)
    assert cc.default_dir({cc.VARIABLE: "~/elsewhere"}) == os.path.expanduser("~/elsewhere")
    assert cc.default_dir({cc.VARIABLE: "0"}) == ""


def test_enabling_sets_jax_variables_and_keeps_the_users_own(monkeypatch):
    monkeypatch.delitem(sys.modules, "jax", raising=False)  # as on `import lora_jax` first
    env = {cc.VARIABLE: "/c", "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "3"}
    assert cc.enable_default_cache(env) == "/c"
    assert env == {cc.VARIABLE: "/c", "JAX_COMPILATION_CACHE_DIR": "/c",
                   "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "3",  # the user's
                   "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
                   "JAX_COMPILATION_CACHE_MAX_SIZE": str(1 << 30)}
    users = {cc.VARIABLE: "/c", "JAX_COMPILATION_CACHE_DIR": "/mine"}
    assert cc.enable_default_cache(users) == "" and users["JAX_COMPILATION_CACHE_DIR"] == "/mine"
    off = {cc.VARIABLE: "0"}
    assert cc.enable_default_cache(off) == "" and off == {cc.VARIABLE: "0"}


CHILD = """
import json, sys
{imports}
import jax.numpy as jnp
hits = []
jax.monitoring.register_event_listener(
    lambda name, **kw: hits.append(name) if name.endswith("cache_hits") else None)
f = jax.jit(lambda x: jnp.tanh(x @ x.T).sum(axis=0))
out = f(jnp.arange(12.0).reshape(3, 4) / 10)
print(json.dumps({"dir": jax.config.jax_compilation_cache_dir, "hits": len(hits),
                  "out": [float(v) for v in out]}))
"""


@pytest.mark.parametrize("imports", ["import lora_jax, jax", "import jax, lora_jax"],
                         ids=["lora_jax_first", "jax_first"])
def test_a_second_process_loads_the_program_the_first_compiled(tmp_path, imports):
    """Either import order: lora_jax first sets JAX's variables, after jax it sets jax.config;
    both keep the user's own variable (here: write every program, however fast it compiles)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_")}  # not the suite's
    env.update({cc.VARIABLE: str(tmp_path / "jit"),
                "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"})  # any program is written

    def child():
        done = subprocess.run([sys.executable, "-c", CHILD.replace("{imports}", imports)], env=env,
                              capture_output=True, text=True, check=True)
        return json.loads(done.stdout.strip().splitlines()[-1])

    first, second = child(), child()
    assert first["dir"] == second["dir"] == str(tmp_path / "jit")
    assert first["hits"] == 0 and second["hits"] >= 1
    assert second["out"] == first["out"]
    assert any(p.name.endswith("-cache") for p in (tmp_path / "jit").iterdir())
    env[cc.VARIABLE] = "0"
    assert child()["dir"] is None


def test_cache_at_switches_the_folder_for_a_block_and_puts_it_back(tmp_path):
    import jax

    before = jax.config.jax_compilation_cache_dir
    with cc.cache_at(str(tmp_path / "bench")):
        assert jax.config.jax_compilation_cache_dir == str(tmp_path / "bench")
        # the library's cap unless the environment sets one (the suite's conftest does)
        assert jax.config.jax_compilation_cache_max_size == int(
            os.environ.get("JAX_COMPILATION_CACHE_MAX_SIZE", cc.MAX_BYTES))
        jax.jit(lambda x: x * 2)(1.0)
    assert jax.config.jax_compilation_cache_dir == before
