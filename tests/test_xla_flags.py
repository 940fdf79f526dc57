"""The XLA flags lora_jax sets on import: added for the jaxlib they were measured on, never over
the user's own setting, off with LORA_JAX_XLA_FLAGS=0, and in effect in a fresh process."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from lora_jax import xla_flags


def test_flags_are_added_once_and_respect_the_user(monkeypatch):
    monkeypatch.setattr(xla_flags.importlib.metadata, "version", lambda _: "0.10.2")
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    assert xla_flags.apply_default_flags(env, vendor="amd") == [
        "--xla_cpu_experimental_ynn_fusion_type=",
        "--xla_disable_hlo_passes=tree_reduction_rewriter"]
    assert env["XLA_FLAGS"] == ("--xla_force_host_platform_device_count=2 "
                                "--xla_cpu_experimental_ynn_fusion_type= "
                                "--xla_disable_hlo_passes=tree_reduction_rewriter")
    assert xla_flags.apply_default_flags(env, vendor="amd") == []  # already there
    user = {"XLA_FLAGS": "--xla_cpu_experimental_ynn_fusion_type=dot --xla_disable_hlo_passes=cse"}
    assert xla_flags.apply_default_flags(user) == [] and user["XLA_FLAGS"].endswith("=cse")
    off = {"LORA_JAX_XLA_FLAGS": "0"}
    assert xla_flags.apply_default_flags(off) == [] and "XLA_FLAGS" not in off


def test_a_flag_measured_on_one_vendor_is_set_for_that_vendor_only(monkeypatch):
    monkeypatch.setattr(xla_flags.importlib.metadata, "version", lambda _: "0.10.2")
    ynn = "--xla_cpu_experimental_ynn_fusion_type="
    for vendor, value in (("intel", "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"), ("amd", ""),
                          ("", "")):
        env = {}
        added = xla_flags.apply_default_flags(env, vendor=vendor)
        assert [f for f in added if f.startswith(ynn)] == [ynn + value], vendor
        assert env["XLA_FLAGS"].split() == added


def test_cpu_vendor_reads_proc_cpuinfo(monkeypatch):
    for vendor_id, vendor in (("GenuineIntel", "intel"), ("AuthenticAMD", "amd"),
                              ("HygonGenuine", ""), ("", "")):
        monkeypatch.setattr(xla_flags, "cpuinfo_field",
                            lambda name, v=vendor_id: v if name == "vendor_id" else "")
        assert xla_flags.cpu_vendor() == vendor


def test_other_jaxlib_versions_get_xlas_defaults(monkeypatch):
    for version in ("0.9.1", "0.11.0", "1.0.0"):
        monkeypatch.setattr(xla_flags.importlib.metadata, "version", lambda _, v=version: v)
        env = {}
        assert xla_flags.apply_default_flags(env) == [] and env == {}, version


def _fresh_process(env_changes: dict) -> dict:
    """XLA_FLAGS and the number of reduce-windows in a compiled row reduction over 256 floats,
    in a new process that imports lora_jax first."""
    code = ("import os, json, lora_jax, jax, jax.numpy as jnp\n"
            "text = jax.jit(lambda x: jnp.square(x).sum(-1)).lower(jnp.ones((16, 16, 256)))"
            ".compile().as_text()\n"
            "print(json.dumps({'flags': os.environ.get('XLA_FLAGS', ''),"
            " 'reduce_windows': text.count('reduce-window(')}))")
    env = {k: v for k, v in __import__("os").environ.items()
           if k not in ("XLA_FLAGS", "LORA_JAX_XLA_FLAGS")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, env={**env, **env_changes})
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_importing_lora_jax_sets_the_flags_before_the_backend_starts():
    expected = xla_flags.apply_default_flags({})
    if not expected:
        pytest.skip("no default flags for this jaxlib")
    ours = _fresh_process({})
    assert all(flag in ours["flags"] for flag in expected)
    # The reduction is split by tree_reduction_rewriter under the first flag alone, and is one
    # fused reduce with both.
    first_only = _fresh_process({"LORA_JAX_XLA_FLAGS": "0",
                                 "XLA_FLAGS": "--xla_cpu_experimental_ynn_fusion_type="})
    assert first_only["reduce_windows"] == 1
    assert ours["reduce_windows"] == 0


def test_program_options_for_the_cpu_vendor_and_never_over_the_user(monkeypatch):
    monkeypatch.setattr(xla_flags.importlib.metadata, "version", lambda _: "0.10.2")
    off = {"xla_cpu_experimental_ynn_fusion_type": ""}
    assert xla_flags.compile_options("stacked_features", {}, "intel", "cpu") == off
    assert xla_flags.compile_options("stacked_features", {}, "amd", "cpu") is None
    assert xla_flags.compile_options("stacked_features", {}, "intel", "gpu") is None
    assert xla_flags.compile_options("stacked_features", {"LORA_JAX_XLA_FLAGS": "0"},
                                     "intel", "cpu") is None
    # the Intel default flag that lora_jax added, here or in a parent process, is not the user's
    ours = {}
    xla_flags.apply_default_flags(ours, vendor="intel")
    assert xla_flags.compile_options("stacked_features", ours, "intel", "cpu") == off
    child = dict(ours)
    assert xla_flags.apply_default_flags(child, vendor="intel") == [] and child == ours
    assert xla_flags.compile_options("stacked_features", child, "intel", "cpu") == off
    user = {"XLA_FLAGS": "--xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_DOT"}
    xla_flags.apply_default_flags(user, vendor="intel")
    assert xla_flags.compile_options("stacked_features", user, "intel", "cpu") is None
    monkeypatch.setattr(xla_flags.importlib.metadata, "version", lambda _: "0.11.0")
    assert xla_flags.compile_options("stacked_features", {}, "intel", "cpu") is None


def test_the_stacked_pass_compiles_with_its_options_in_a_fresh_process():
    """In a child of this process (which inherits the XLA_FLAGS lora_jax set here), a dot
    jitted as the feature pass is jitted goes to YNNPACK exactly when the process default sends
    dots there and the pass's options do not (Intel: default yes, pass no; AMD: neither)."""
    code = ("import json, jax, jax.numpy as jnp\n"
            "from ensemble.features import jit_feature_fn\n"
            "f, x = (lambda x: (x @ x).sum()), jnp.ones((64, 64))\n"
            "ynn = lambda fn: '__ynn_fusion' in fn.lower(x).compile().as_text()\n"
            "print(json.dumps({'default': ynn(jax.jit(f)), 'pass': ynn(jit_feature_fn(f))}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    ynn = json.loads(out.stdout.strip().splitlines()[-1])
    default = xla_flags.apply_default_flags({})
    if not default:
        pytest.skip("no default flags for this jaxlib")
    assert ynn["default"] == any(f.endswith("INDIVIDUAL_DOT") for f in default)
    assert ynn["pass"] is False
