"""XLA flags the library sets by default, each kept only for a measured gain.

XLA reads ``XLA_FLAGS`` once, when JAX creates its first backend, so `apply_default_flags` runs
on ``import lora_jax`` (before any JAX computation of ours). A flag the user already put in
``XLA_FLAGS`` is left as the user set it; ``LORA_JAX_XLA_FLAGS=0`` turns the defaults off. A
flag is only added for the jaxlib versions it was measured on: XLA aborts on flags it does not
know, so other versions run with XLA's own defaults.
"""

from __future__ import annotations

import importlib.metadata
import os

# name -> (value, (lowest jaxlib, first jaxlib not covered)); a value is a string, or a dict
# from `cpu_vendor()` to string whose "" entry is every other CPU.
DEFAULT_FLAGS = {
    # XLA:CPU sends dots (with their neighbouring elementwise ops) to YNNPACK fusions by default.
    # Profiled on the MiniLM-L3 LoRA train step (2 cores, batch 32, fp32, dropout on): those
    # fusions ran the (B*H) batched attention dots at ~23 GFLOP/s; with them off (Eigen dots)
    # the step went from 22 to 29 examples/s at length 128 and from 61 to 69 at length 64
    # (alternating runs, jaxlib 0.10.2), and compiles faster. No effect on GPU backends.
    # On a 2-core Intel Xeon (Sapphire Rapids, AVX-512): the MiniLM-L3 LoRA step at length 128,
    # batch 32, 30 steps per run, alternating runs: 50.7 and 51.8 examples/s with the fusions
    # off against 47.4 and 46.3 with XLA's default (on), so off on both vendors.
    # YNNPACK for lone dots only (LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT: no elementwise ops fused
    # in) on that Intel Xeon, quiet, against the fusions off (jaxlib 0.10.2, fp32, same
    # tokens and fp32-accurate products): T5 greedy decoding 2555 -> 2984 and 2664 -> 2997
    # tokens/s, 4-beam search 780 -> 916 and 761 -> 881 (one process each, 5 alternating
    # rounds, benchmarks.t5_generate shapes); in alternating processes, the T5 prompt + LoRA
    # step 51.6 -> 58.5 and 53.7 -> 63.3 examples/s, the MiniLM-L3 LoRA step 182 -> 189 and
    # 184 -> 194 at length 64. One path loses: the stacked k = 6 features (per-slot batched
    # GEMMs, which YNNPACK also takes) 18.50 -> 18.42, 20.04 -> 18.97 and 19.64 -> 18.00
    # examples/s (benchmarks.attens, alternating processes), while 7 single passes of our
    # encoder stay level (18.58 -> 18.77, 21.19 -> 20.97, 19.90 -> 20.30). On a 2-core AMD
    # EPYC with AVX2 only (no AVX-512; jaxlib 0.10.2, fp32, one process each, off then on):
    # T5 greedy decoding 1957 -> 1506 tokens/s, beam search 705 -> 601, the MiniLM-L3 LoRA
    # step at length 128 45.5 -> 33.9 examples/s, the T5 prompt + LoRA step 38.6 -> 40.8
    # (benchmarks.t5_generate / t5_train / train_throughput): so AMD keeps the fusions off.
    "xla_cpu_experimental_ynn_fusion_type": ({"intel": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT",
                                              "": ""}, ((0, 10), (0, 11))),
    # With those fusions off, XLA:CPU's tree_reduction_rewriter splits every reduction over an
    # axis longer than 32 (RMSNorm/LayerNorm over d_model, softmax over keys) into a
    # reduce-window and a reduce that no longer fuse with their neighbours: 125 reduce-windows
    # in the T5 greedy decoder, 741 fusions against 519 without the pass. Without it, in one
    # process with alternating rounds (jaxlib 0.10.2, 2 cores, fp32): T5 greedy decoding 3813
    # -> 3900 tokens/s, beam search 1036 -> 1076, the MiniLM-L3 LoRA step 72.0 -> 75.8
    # examples/s at length 128 and 162 -> 165 at length 64, the T5 prompt + LoRA step 73.8 ->
    # 76.3. Same tokens. Precision: row sums of 256-4096 floats err as before (~1e-7 of
    # sum |x|); of 2^20 floats 4.5e-7 against 0.6e-7. The GPU pass has another name
    # ("tree-reduction-rewriter") and is not touched.
    "xla_disable_hlo_passes": ("tree_reduction_rewriter", ((0, 10), (0, 11))),
}
# Measured and NOT set: XLA:CPU's oneDNN dot fusions (both
# "--xla_cpu_use_onednn=true --xla_cpu_experimental_onednn_fusion_type=dot"; either alone
# changes nothing). On a 2-core Intel Xeon (Sapphire Rapids, jaxlib 0.10.2) they lift the
# MiniLM-L3 LoRA train step from 57 to 66-71 examples/s at length 128 and from 126 to 149 at
# length 64, but the eval forward (a softmax feeding the probabilities x values dot) aborts the
# process ("partition compile failed", SIGILL) and a lone scaled Q K^T einsum crashed in 1 of 4
# runs. A flag that can kill a user's run is not a default. Their lone-dot variant
# (--xla_cpu_experimental_onednn_fusion_type=LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT) runs that
# attention, but is no faster than YNNPACK's lone dots in float32 (same Xeon, one process each:
# a 4096 x 384 x 384 GEMM 197 against 242 GFLOP/s; a 16 x 384 x 1536 one 323 against 159 us,
# oneDNN repacking the weight at every call, ONEDNN_VERBOSE=1). oneDNN picks its AMX kernels
# there only with ONEDNN_DEFAULT_FPMATH_MODE=BF16 (float32 products from bf16-rounded inputs,
# 758 GFLOP/s on that GEMM): a precision change the library does not make for its users.
# bfloat16 arrays do not reach AMX either: XLA:CPU hands oneDNN the dot converted to float32.


# Per-program XLA compile options (`jax.jit(..., compiler_options=compile_options(name))`) for a
# program whose best XLA:CPU setting differs from the process default above; same layout as
# DEFAULT_FLAGS, a value being a dict of options.
PROGRAM_OPTIONS = {
    # The stacked k-adapter feature pass (ensemble.features): its GEMMs have (k + 1) B T rows or
    # a leading slot axis, where YNNPACK's lone dots (the Intel default above) run below Eigen.
    # On a 2-core Intel Xeon (Sapphire Rapids, jaxlib 0.10.2, fp32), one process each: a
    # 28672 x 384 x 384 GEMM 175 -> 254 GFLOP/s, 7 batched 4096 x 384 x 384 GEMMs 132 -> 206;
    # the benchmarks.attens pass (MiniLM-L3, k = 6 + base, batch 32 x 128), compiled both ways
    # in one process, alternating rounds, same features to 4e-7: 12.8 -> 15.6 and 12.2 -> 14.9
    # examples/s (PyTorch + PEFT's 7 passes 19.8 and 16.5 in those rounds). AMD already runs
    # these dots on Eigen.
    "stacked_features": ({"intel": {"xla_cpu_experimental_ynn_fusion_type": ""}, "": {}},
                         ((0, 10), (0, 11))),
}
# Names of the flags that lora_jax (not the user) put in XLA_FLAGS, comma-separated, kept in the
# environment so that child processes, which inherit XLA_FLAGS, tell them from the user's too.
ADDED_VARIABLE = "LORA_JAX_ADDED_FLAGS"


def _version(text: str) -> tuple[int, int]:
    major, minor = text.split(".")[:2]
    return int(major), int("".join(ch for ch in minor if ch.isdigit()) or 0)


def cpuinfo_field(name: str) -> str:
    """The first value of `name` in Linux's /proc/cpuinfo ("" elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == name:
                    return value.strip()
    except OSError:
        pass
    return ""


def cpu_vendor() -> str:
    """"intel" or "amd" from /proc/cpuinfo's vendor_id; "" for any other CPU or system."""
    return {"GenuineIntel": "intel", "AuthenticAMD": "amd"}.get(cpuinfo_field("vendor_id"), "")


def apply_default_flags(environ=os.environ, vendor: str | None = None) -> list[str]:
    """Add each default flag that fits the installed jaxlib (and the CPU `vendor`, by default
    `cpu_vendor()`) to XLA_FLAGS unless already set there; returns the flags added."""
    if environ.get("LORA_JAX_XLA_FLAGS", "1") == "0":
        return []
    try:
        jaxlib = _version(importlib.metadata.version("jaxlib"))
    except (importlib.metadata.PackageNotFoundError, ValueError):
        return []
    vendor = cpu_vendor() if vendor is None else vendor
    current = environ.get("XLA_FLAGS", "")
    added = []
    for name, (value, (lowest, beyond)) in DEFAULT_FLAGS.items():
        if isinstance(value, dict):
            value = value.get(vendor, value[""])
        if lowest <= jaxlib < beyond and f"--{name}" not in current:
            added.append(f"--{name}={value}")
    if added:
        environ["XLA_FLAGS"] = " ".join([current, *added]).strip()
        names = {flag[2:].partition("=")[0] for flag in added}
        names.update(filter(None, environ.get(ADDED_VARIABLE, "").split(",")))
        environ[ADDED_VARIABLE] = ",".join(sorted(names))
    return added


def compile_options(program: str, environ=os.environ, vendor: str | None = None,
                    backend: str | None = None) -> dict | None:
    """The XLA compile options of `program` (a `PROGRAM_OPTIONS` name) for this CPU vendor
    (default `cpu_vendor()`) and JAX backend (default `jax.default_backend()`), for
    ``jax.jit(..., compiler_options=...)``; None where none apply: a backend other than CPU, a
    jaxlib they were not measured on, ``LORA_JAX_XLA_FLAGS=0``. An option the user set in
    ``XLA_FLAGS`` is left out, so the user's flag holds."""
    value, (lowest, beyond) = PROGRAM_OPTIONS[program]
    if environ.get("LORA_JAX_XLA_FLAGS", "1") == "0":
        return None
    if backend is None:
        import jax

        backend = jax.default_backend()
    try:
        jaxlib = _version(importlib.metadata.version("jaxlib"))
    except (importlib.metadata.PackageNotFoundError, ValueError):
        return None
    if backend != "cpu" or not lowest <= jaxlib < beyond:
        return None
    options = value.get(cpu_vendor() if vendor is None else vendor, value[""])
    flags, ours = environ.get("XLA_FLAGS", ""), environ.get(ADDED_VARIABLE, "").split(",")
    options = {name: v for name, v in options.items() if name in ours or f"--{name}" not in flags}
    return options or None
