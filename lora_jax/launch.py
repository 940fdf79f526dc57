"""Start N local processes of one multi-process run (JAX's CPU collectives), for trying the
multi-process path on one machine:

    python -m lora_jax.launch --processes 2 -- train.py --config configs/ft_lora.py \
        --workdir runs/two_processes --config.task=rte

Every process runs ``python <the arguments after -->`` with the ``LORA_JAX_*`` variables that
`lora_jax.distributed.initialize` reads (coordinator on a free local port, process count, its
id) and, with ``--platform cpu``, ``--devices-per-process`` CPU devices. Process 0's output is
passed through; the others' lines are prefixed ``[process i]``. When one process fails or is
killed, the launcher stops the others (they would otherwise wait for it in a collective) and
exits with a one-line ``error:`` naming it. On a cluster, start one process per host with the
same variables instead (see the README), or set ``LORA_JAX_DISTRIBUTED=auto``.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time

from lora_jax.distributed import ENV_COORDINATOR, ENV_NUM_PROCESSES, ENV_PROCESS_ID
from lora_jax.results import ENV_COMMAND, module_command

GRACE_SECONDS = 10.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_env(base: dict, process_id: int, processes: int, port: int, platform: str,
                devices: int) -> dict:
    env = dict(base)
    env.update({ENV_COORDINATOR: f"127.0.0.1:{port}", ENV_NUM_PROCESSES: str(processes),
                ENV_PROCESS_ID: str(process_id)})
    if platform == "cpu":
        env["JAX_PLATFORMS"] = "cpu"
        flags = [f for f in env.get("XLA_FLAGS", "").split()
                 if not f.startswith("--xla_force_host_platform_device_count")]
        env["XLA_FLAGS"] = " ".join([*flags, f"--xla_force_host_platform_device_count={devices}"])
    elif platform == "gpu":  # one GPU per process
        env["CUDA_VISIBLE_DEVICES"] = str(process_id)
    return env


def _relay(stream, prefix: str, out) -> None:
    for line in iter(stream.readline, b""):
        out.write(prefix + line.decode(errors="replace"))
        out.flush()


def describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with status {code}"


def first_failure(codes: list[int | None]) -> tuple[int, int] | None:
    """(process id, exit code) of the failure to report among `codes` (``Popen.poll()`` of each
    process), or None. A process killed by a signal comes first: its peers then fail in their
    collectives, and may exit before the launcher looks."""
    failed = [(i, c) for i, c in enumerate(codes) if c not in (None, 0)]
    return min(failed, key=lambda ic: (ic[1] >= 0, ic[0])) if failed else None


def stop(procs: list[subprocess.Popen]) -> None:
    """SIGTERM every process still running, SIGKILL what is left after GRACE_SECONDS."""
    for p in procs:
        if p.poll() is None:
            p.terminate()
    deadline = time.monotonic() + GRACE_SECONDS
    for p in procs:
        try:
            p.wait(max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def launch(command: list[str], processes: int, platform: str = "cpu",
           devices_per_process: int = 1, typed: str = "") -> int:
    """Run `command` (arguments for ``python``) in `processes` processes; the exit status.
    typed: the launcher's command line, which the processes record as their command."""
    port = free_port()
    procs, relays = [], []
    for i in range(processes):
        env = process_env(os.environ, i, processes, port, platform, devices_per_process)
        if typed:
            env[ENV_COMMAND] = typed
        piped = i > 0
        p = subprocess.Popen([sys.executable, *command], env=env,
                             stdout=subprocess.PIPE if piped else None,
                             stderr=subprocess.STDOUT if piped else None)
        procs.append(p)
        if piped:
            t = threading.Thread(target=_relay, args=(p.stdout, f"[process {i}] ", sys.stdout),
                                 daemon=True)
            t.start()
            relays.append(t)
    try:
        while True:
            codes = [p.poll() for p in procs]
            failed = first_failure(codes)
            if failed:
                i, code = failed
                running = sum(c is None for c in codes)
                print(f"error: process {i} of {processes} {describe_exit(code)}"
                      + (f"; stopping the other {running}" if running else ""),
                      file=sys.stderr, flush=True)
                stop(procs)
                return code if code > 0 else 1
            if all(c == 0 for c in codes):
                return 0
            time.sleep(0.2)
    except KeyboardInterrupt:
        stop(procs)
        return 130
    finally:
        for t in relays:
            t.join(timeout=5)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--" not in argv:
        print("error: put the command after --, e.g. python -m lora_jax.launch --processes 2 "
              "-- train.py --config configs/ft_lora.py --workdir runs/x", file=sys.stderr)
        return 2
    cut = argv.index("--")
    parser = argparse.ArgumentParser(prog="python -m lora_jax.launch", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--processes", type=int, required=True, help="how many processes")
    parser.add_argument("--platform", choices=("cpu", "gpu", "default"), default="cpu",
                        help="cpu: CPU devices (gloo collectives); gpu: one GPU per process; "
                             "default: leave the environment as it is")
    parser.add_argument("--devices-per-process", type=int, default=1,
                        help="CPU devices each process simulates (--platform cpu)")
    args = parser.parse_args(argv[:cut])
    command = argv[cut + 1:]
    if args.processes < 1 or args.devices_per_process < 1:
        parser.error("--processes and --devices-per-process must be at least 1")
    if not command:
        parser.error("no command after --")
    typed = module_command("lora_jax.launch", argv)
    return launch(command, args.processes, args.platform, args.devices_per_process, typed)


if __name__ == "__main__":
    sys.exit(main())
