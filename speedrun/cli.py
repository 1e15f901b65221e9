"""Command-line plumbing shared by both trainers: user errors are one line, bugs keep tracebacks.

A `UsageError` is a mistake the user can fix (a bad option value, a missing or unsuitable
file): the trainer prints `error: <message>` on stderr and exits 2, as argparse does, before
anything is trained or written.  Every other exception is a bug and keeps its traceback.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Callable


class UsageError(ValueError):
    """A user error: the message names the option or file and says what to do."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors (unknown option, bad int, invalid choice) are UsageErrors, so they
    take the same one-line path as the trainer's own checks."""

    def error(self, message: str):
        raise UsageError(message)


def run(main: Callable[[list[str] | None], int], argv: list[str] | None = None) -> int:
    """main(argv), with a UsageError turned into one `error:` line (rank 0 only) and status 2."""
    try:
        return main(argv)
    except UsageError as error:
        if os.environ.get("RANK", "0") == "0":  # under torchrun every rank fails the same way
            print(f"error: {error}", file=sys.stderr, flush=True)
        return 2
