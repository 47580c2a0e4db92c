"""What the entry points share: turning known errors into one line on stderr and an exit code."""
from __future__ import annotations

import argparse
import signal
import sys
from typing import Callable

from fastlm.errors import DivergedError, UsageError


class ArgumentParser(argparse.ArgumentParser):
    """argparse, with a bad flag reported in one line (what is wrong, and where to look), exit 2."""

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"error: {message} (see {self.prog} --help)\n")


EXIT_FAILED = 1  # the job ran and failed (training diverged)
EXIT_USAGE = 2  # bad input: the message says what to fix
EXIT_INTERRUPTED = 130  # stopped by Ctrl-C


def run_main(main: Callable[[list[str] | None], int], argv: list[str] | None = None) -> None:
    """Run an entry point's `main`, mapping known errors to `error: …` on stderr and an exit code."""
    signal.signal(signal.SIGINT, signal.default_int_handler)  # from here a Ctrl-C is a KeyboardInterrupt
    try:
        code = main(argv)
    except DivergedError as err:
        print(f"error: {err}", file=sys.stderr)
        code = EXIT_FAILED
    except UsageError as err:  # DataError, CheckpointError, TrainingError among them; the rest are bugs
        print(f"error: {err}", file=sys.stderr)
        code = EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        code = EXIT_INTERRUPTED
    sys.exit(code)
