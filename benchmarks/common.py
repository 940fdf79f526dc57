"""What every benchmark records beside its figures, and how it writes them."""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from collections.abc import Callable

from benchmarks.roofline import best_gemm_rate, gemm_fields, gemm_rates
from lora_jax.xla_flags import cpuinfo_field


def cpu_model() -> str:
    """The host CPU's model name (Linux /proc/cpuinfo, else `platform.processor()`): machines of
    the same kind and core count differ from one session to the next."""
    return cpuinfo_field("model name") or platform.processor() or "unknown"


# The vector and matrix extensions that decide XLA:CPU's and PyTorch's kernels (x86: SSE to
# AVX-512 and AMX; Arm: NEON/SVE), in the names /proc/cpuinfo uses.
VECTOR_EXTENSIONS = ("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512bw", "avx512vl",
                     "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16",
                     "amx_int8", "asimd", "sve", "sve2")


def cpu_vector_extensions() -> list[str]:
    """Which of `VECTOR_EXTENSIONS` the host CPU reports, in that order ([] off Linux)."""
    flags = set((cpuinfo_field("flags") or cpuinfo_field("Features")).split())
    return [x for x in VECTOR_EXTENSIONS if x in flags]


# The widest vector unit a CPU has, by the first of these extensions it reports: two machines of
# one vendor and family can differ there (an AMD EPYC with AVX-512 against one with AVX2 only ran
# the benchmarks' large GEMM at 438-487 against 168 GFLOP/s), so it names the machine kind too.
VECTOR_LEVELS = (("avx512f", "avx512"), ("avx2", "avx2"), ("avx", "avx"), ("sve", "sve"),
                 ("asimd", "neon"))


def vector_level(extensions: list[str]) -> str:
    """"avx512", "avx2", "avx", "sve" or "neon": the widest of `VECTOR_LEVELS` in
    `extensions` (`cpu_vector_extensions()`); "" when none."""
    return next((level for flag, level in VECTOR_LEVELS if flag in extensions), "")


def cpu_family_slug(model: str) -> str:
    """The vendor and family of a CPU model name, file-name safe: "Intel(R) Xeon(R) Processor"
    -> "intel_xeon", "AMD EPYC 7B13" -> "amd_epyc"; "" when nothing is left."""
    import re

    words = re.sub(r"\((r|tm)\)", " ", model.lower()).split()
    words = [re.sub(r"[^a-z0-9]+", "", w) for w in words
             if w not in {"processor", "cpu", "core", "unknown"}]
    return "_".join(w for w in words[:2] if w)


def environment() -> dict:
    """Library versions, the machine the figures were measured on, the process settings that
    change speed (XLA_FLAGS, lora_jax's malloc settings), the process's peak resident memory so
    far, the code (git commit), the date and the exact command."""
    import resource

    import jax
    import torch

    import lora_jax
    from lora_jax.results import command_line, git_commit

    dev = jax.devices()[0]
    return {"jax": jax.__version__, "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
            "machine": f"{platform.machine()} {dev.platform.upper()} ({dev.device_kind}), "
                       f"{os.cpu_count()} CPU cores",
            "cpu": cpu_model(),
            "cpu_vector_extensions": cpu_vector_extensions(),
            "jax_default_matmul_precision": jax.config.jax_default_matmul_precision,
            "xla_flags": os.environ.get("XLA_FLAGS", ""),
            "malloc_keeps_heap": lora_jax.MALLOC_KEEPS_HEAP,
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
            "git_commit": git_commit(), "date": time.strftime("%Y-%m-%d"),
            "command": command_line()}


def machine_slug() -> str:
    """A short file-name-safe name of this machine: "cpu_2cores_intel_xeon_avx512",
    "gpu_nvidia_h100_80gb_hbm3". CPUs are named by vendor, family and widest vector unit too,
    since the same core count of two vendors, or of one family with and without AVX-512, gives
    other figures (results/ keeps one file per machine kind)."""
    import re

    import jax

    dev = jax.devices()[0]
    if dev.platform == "cpu":
        parts = [cpu_family_slug(cpu_model()), vector_level(cpu_vector_extensions())]
        return "_".join([f"cpu_{os.cpu_count()}cores", *(p for p in parts if p)])
    return re.sub(r"[^a-z0-9]+", "_", f"{dev.platform}_{dev.device_kind}".lower()).strip("_")


def emit(result: dict, path: str) -> None:
    """Prints `result` as one JSON line; also writes it (indented) to `path` when given."""
    print(json.dumps(result))
    if path:
        with open(path, "w") as f:
            json.dump(result, f, indent=2)
            f.write("\n")


def checked_code_state(out_dir: str, prefix: str, allow_dirty: bool) -> dict:
    """Before any measuring: one error line (exit 2) for an --out-dir that is a file, or for
    code with uncommitted changes unless `allow_dirty` (`lora_jax.results.code_state`); else
    the code state the record keeps."""
    from lora_jax.cli import fail
    from lora_jax.errors import UserError
    from lora_jax.results import code_state

    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        fail(f"--out-dir {out_dir!r} is a file, not a folder")
    try:
        return code_state(os.path.join(out_dir, f"{prefix}.json"), allow_dirty)
    except UserError as e:
        fail(str(e))


def measure_and_write(out_dir: str, prefix: str, allow_dirty: bool, measure: Callable[[], dict],
                      markdown: Callable[[dict], str]) -> int:
    """A profile script's record: `checked_code_state` first, then ``measure()`` with the
    environment it ran in, written by `write_result_files`; returns 0 (the exit status)."""
    code = checked_code_state(out_dir, prefix, allow_dirty)
    result = {**measure(), "environment": {**environment(), **code}}
    write_result_files(out_dir, prefix, result, markdown(result))
    return 0


def write_result_files(out_dir: str, prefix: str, result: dict, markdown: str) -> None:
    """Writes `result` to <out_dir>/<prefix>_<machine>.json (and prints it as one JSON line) and
    its `markdown` table beside it as .md; says on stderr which files it wrote."""
    os.makedirs(out_dir, exist_ok=True)
    stem = os.path.join(out_dir, f"{prefix}_{machine_slug()}")
    emit(result, stem + ".json")
    with open(stem + ".md", "w") as f:
        f.write(markdown)
    print(f"wrote {stem}.json and {stem}.md", file=sys.stderr)


def emit_measured(result: dict, path: str) -> None:
    """`emit` a single benchmark script's `result` with the `environment` it was measured in."""
    emit({**result, **environment()}, path)


def alternating_rounds(runs: dict[str, Callable[[], object]], rounds: int) -> dict[str, list[float]]:
    """Wall seconds of each warmed-up callable, `rounds` times; the callables take turns
    within every round, so each side sees the same machine load."""
    seconds = {name: [] for name in runs}
    for _ in range(rounds):
        for name, fn in runs.items():
            t0 = time.perf_counter()
            fn()
            seconds[name].append(time.perf_counter() - t0)
    return seconds


def comparison(what: str, unit: str, work: float, ours: list[float], peer: list[float], *,
               ours_label: str, peer_label: str, flops: float | None = None,
               gemm_flops_per_s: float | None = None, bytes_moved: float | None = None,
               memory_bytes_per_s: float | None = None,
               peer_flops: float | None = None) -> dict:
    """One row of a benchmark: rates (`work` units per call over each round's seconds) of our
    side and its peer, their medians, ratio ours/peer, and, when `flops` (per call) and the
    machine's GEMM rate are given, each side's achieved FLOP/s and its fraction of that rate
    (`peer_flops`: the peer's FLOPs per call where it does other work than ours, e.g. rows we
    skip); the same for `bytes_moved` (per call) and the machine's memory rate."""
    import numpy as np

    rates = {"ours": [work / s for s in ours], "peer": [work / s for s in peer]}
    med = {side: float(np.median(r)) for side, r in rates.items()}
    row = {"what": what, "unit": unit, "ours_label": ours_label, "peer_label": peer_label,
           "ours": med["ours"], "peer": med["peer"], "ratio": med["ours"] / med["peer"],
           "ours_rounds": rates["ours"], "peer_rounds": rates["peer"]}
    calls_per_s = {side: med[side] / work for side in ("ours", "peer")}
    if flops is not None and gemm_flops_per_s:
        row.update(roofline_fields(flops, gemm_flops_per_s, calls_per_s, "gflop_per_call",
                                   "gflops", "gemm", peer_flops))
    if bytes_moved is not None and memory_bytes_per_s:
        row.update(roofline_fields(bytes_moved, memory_bytes_per_s, calls_per_s,
                                   "gbytes_per_call", "gbytes_per_s", "memory"))
    return row


def roofline_fields(per_call: float, machine_rate: float, calls_per_s: dict[str, float],
                    per_call_key: str, rate_key: str, limit: str,
                    peer_per_call: float | None = None) -> dict:
    """A row's fields for one roofline: the amount per call (FLOPs or bytes, in billions; the
    peer's own under ``peer_<per_call_key>`` when `peer_per_call` is given), each side's
    achieved rate (billions per second) and its fraction of the machine's rate."""
    amounts = {"ours": per_call, "peer": per_call if peer_per_call is None else peer_per_call}
    fields = {per_call_key: per_call / 1e9}
    if peer_per_call is not None:
        fields[f"peer_{per_call_key}"] = peer_per_call / 1e9
    for side, calls in calls_per_s.items():
        fields[f"{side}_{rate_key}"] = amounts[side] * calls / 1e9
        fields[f"{side}_fraction_of_{limit}"] = amounts[side] * calls / machine_rate
    return fields


def jax_step_runner(step: Callable, trainable, opt_state, frozen, batch) -> Callable[[int], None]:
    """run(n): n calls of a jitted `trainer.make_train_step` step on one fixed batch, carrying
    (and donating) the trainable tree and optimizer state; blocks until the last is done.
    Warmed up (compiled) before it is returned."""
    import jax

    state = {"trainable": trainable, "opt_state": opt_state}

    def run(n: int) -> None:
        for i in range(n):
            state["trainable"], state["opt_state"], _ = step(
                state["trainable"], state["opt_state"], i, frozen, batch)
        jax.block_until_ready(state["trainable"])

    run(3)
    return run


def torch_step_runner(one_step: Callable[[], None]) -> Callable[[int], None]:
    """run(n): n calls of a PyTorch train step, synchronised with the GPU when there is one.
    Warmed up before it is returned."""
    import torch

    def run(n: int) -> None:
        for _ in range(n):
            one_step()
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    run(3)
    return run


def train_step_comparison(what: str, jax_run: Callable[[int], None],
                          torch_run: Callable[[int], None], *, batch: int, steps: int,
                          rounds: int, dtype: str, step_flops: float,
                          gemm_size: int = 2048,
                          peer_step_flops: float | None = None) -> tuple[dict, dict]:
    """JAX against PyTorch + PEFT train steps (`jax_step_runner` / `torch_step_runner`):
    `rounds` alternating rounds of `steps` steps each, between two roofline GEMM measurements
    (square matmuls of side `gemm_size`). Returns the comparison row (examples/s, `step_flops`
    per step against the GEMM rate; `peer_step_flops` when PyTorch's step does other work) and
    the GEMM fields of the record."""
    gemm = [gemm_rates(dtype, gemm_size)]
    seconds = alternating_rounds({"jax": lambda: jax_run(steps),
                                  "torch": lambda: torch_run(steps)}, rounds)
    gemm.append(gemm_rates(dtype, gemm_size))
    row = comparison(what, "examples/s", batch * steps, seconds["jax"], seconds["torch"],
                     ours_label=f"JAX {dtype}",
                     peer_label="PyTorch + PEFT" + (" + AMP" if dtype == "bfloat16" else ""),
                     flops=step_flops * steps, gemm_flops_per_s=best_gemm_rate(gemm),
                     peer_flops=None if peer_step_flops is None else peer_step_flops * steps)
    return row, gemm_fields(gemm)


def require_positive(args, *names: str) -> None:
    """A one-line error (exit 2) for the first of `names` (argparse dests) below 1."""
    from lora_jax.cli import fail

    for name in names:
        if getattr(args, name) < 1:
            fail(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
