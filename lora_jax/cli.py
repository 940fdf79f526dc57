"""The one error path of every command-line entry point (train.py, the sweep, the quickstart,
ensemble.train_modules, the reports, the benchmarks).

Bad input ends with ONE line ``error: <what is wrong and how to fix it>`` on stderr and exit
status 2, never a traceback: `UserError` raised anywhere below a command, and argparse's own
complaints (`ArgumentParser`), both end here.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import NoReturn

from lora_jax.errors import UserError

EXIT_USAGE = 2


def fail(message: str) -> NoReturn:
    """Print ``error: message`` (one line) on stderr and exit with status 2."""
    print(f"error: {' '.join(str(message).split())}", file=sys.stderr)
    sys.exit(EXIT_USAGE)


class ArgumentParser(argparse.ArgumentParser):
    """argparse with a one-line ``error:`` instead of the usage block on a bad argument."""

    def error(self, message: str) -> NoReturn:
        fail(f"{message} (see {self.prog} --help)")


def run_main(main: Callable[[], int | None]) -> int:
    """Run a command's body; a UserError becomes the one-line error and exit status 2."""
    try:
        return main() or 0
    except UserError as e:
        fail(str(e))
