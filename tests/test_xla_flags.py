"""The XLA flags lora_jax sets on import: added for the jaxlib they were measured on, never over
the user's own setting, off with LORA_JAX_XLA_FLAGS=0, and in effect in a fresh process."""

from __future__ import annotations

import json
import subprocess
import sys

from lora_jax import xla_flags


def test_flags_are_added_once_and_respect_the_user(monkeypatch):
    monkeypatch.setattr(xla_flags.importlib.metadata, "version", lambda _: "0.10.2")
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    assert xla_flags.apply_default_flags(env) == ["--xla_cpu_experimental_ynn_fusion_type="]
    assert env["XLA_FLAGS"] == ("--xla_force_host_platform_device_count=2 "
                                "--xla_cpu_experimental_ynn_fusion_type=")
    assert xla_flags.apply_default_flags(env) == []  # already there
    user = {"XLA_FLAGS": "--xla_cpu_experimental_ynn_fusion_type=dot"}
    assert xla_flags.apply_default_flags(user) == [] and user["XLA_FLAGS"].endswith("=dot")
    off = {"LORA_JAX_XLA_FLAGS": "0"}
    assert xla_flags.apply_default_flags(off) == [] and "XLA_FLAGS" not in off


def test_other_jaxlib_versions_get_xlas_defaults(monkeypatch):
    for version in ("0.9.1", "0.11.0", "1.0.0"):
        monkeypatch.setattr(xla_flags.importlib.metadata, "version", lambda _, v=version: v)
        env = {}
        assert xla_flags.apply_default_flags(env) == [] and env == {}, version


def test_importing_lora_jax_sets_the_flag_before_the_backend_starts():
    code = ("import os, json, lora_jax, jax, jax.numpy as jnp; jnp.ones(2).block_until_ready();"
            "print(json.dumps(os.environ.get('XLA_FLAGS', '')))")
    env = {k: v for k, v in __import__("os").environ.items() if k != "XLA_FLAGS"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    flags = json.loads(out.stdout.strip().splitlines()[-1])
    expected = xla_flags.apply_default_flags({})
    assert all(flag in flags for flag in expected)
