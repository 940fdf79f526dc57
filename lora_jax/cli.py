"""The one error path of every command-line entry point (train.py, the sweep, the quickstart,
ensemble.train_modules, the reports, the benchmarks).

Bad input ends with ONE line ``error: <what is wrong and how to fix it>`` on stderr and exit
status 2, never a traceback: `UserError` raised anywhere below a command, and argparse's own
complaints (`ArgumentParser`), both end here. In a multi-process run, the runtime error a
process gets when another process is gone (its collective loses the connection) ends as one
line and exit status 1 too: the cause is the other process, whose own failure is reported by
the launcher or the cluster.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import NoReturn

from lora_jax.errors import UserError

EXIT_USAGE = 2
EXIT_PEER_LOST = 1
# what XLA's CPU (gloo) collectives and JAX's coordination service say when a peer is gone
PEER_LOST_MARKERS = ("Connection reset by peer", "Connection closed by peer", "Broken pipe",
                     "heartbeat", "Socket closed")


def fail(message: str) -> NoReturn:
    """Print ``error: message`` (one line) on stderr and exit with status 2."""
    print(f"error: {' '.join(str(message).split())}", file=sys.stderr)
    sys.exit(EXIT_USAGE)


class ArgumentParser(argparse.ArgumentParser):
    """argparse with a one-line ``error:`` instead of the usage block on a bad argument."""

    def error(self, message: str) -> NoReturn:
        fail(f"{message} (see {self.prog} --help)")


def lost_peer(error: BaseException) -> bool:
    """Whether `error` is a multi-process run's runtime error for a process that is gone."""
    jax = sys.modules.get("jax")
    if jax is None or not isinstance(error, jax.errors.JaxRuntimeError):
        return False
    return jax.process_count() > 1 and any(m in str(error) for m in PEER_LOST_MARKERS)


def run_main(main: Callable[[], int | None]) -> int:
    """Run a command's body; a UserError becomes the one-line error and exit status 2, a lost
    peer of a multi-process run one line and exit status 1."""
    try:
        return main() or 0
    except UserError as e:
        fail(str(e))
    except Exception as e:
        if not lost_peer(e):
            raise
        import jax

        first = str(e).strip().splitlines()[0]
        print(f"error: process {jax.process_index()} of {jax.process_count()}: another process "
              f"of the run is gone ({' '.join(first.split())}); stopping. Relaunch with "
              "--config.resume=True to go on from the last checkpoint", file=sys.stderr)
        return EXIT_PEER_LOST
