"""What the entry points share: turning known errors into one line on stderr and an exit code."""
from __future__ import annotations

import argparse
import os
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
EXIT_TERMINATED = 143  # stopped by SIGTERM


class Terminated(KeyboardInterrupt):
    """SIGTERM, or SIGHUP (a closed terminal), outside the training loop (which stops politely on its
    own): unwind as for Ctrl-C, so that what was set up (a run folder, a temporary file) is cleaned up."""


def _terminate(signum, frame):
    raise Terminated


def run_main(main: Callable[[list[str] | None], int], argv: list[str] | None = None) -> None:
    """Run an entry point's `main`, mapping known errors to `error: …` on stderr and an exit code.

    Under torchrun only rank 0 prints the error; every rank exits with the same code."""
    signal.signal(signal.SIGINT, signal.default_int_handler)  # from here a Ctrl-C is a KeyboardInterrupt
    for stream in (sys.stdout, sys.stderr):  # a word the terminal's encoding lacks is shown escaped, not a crash
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGHUP, _terminate)
    say = (lambda text: print(text, file=sys.stderr)) if os.environ.get("RANK", "0") == "0" else (lambda text: None)
    try:
        code = main(argv)
    except DivergedError as err:
        say(f"error: {err}")
        code = EXIT_FAILED
    except UsageError as err:  # DataError, CheckpointError, TrainingError among them; the rest are bugs
        say(f"error: {err}")
        code = EXIT_USAGE
    except KeyboardInterrupt as interrupt:
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):  # decided: more must not break the exit
            signal.signal(signum, signal.SIG_IGN)
        say("terminated" if isinstance(interrupt, Terminated) else "interrupted")
        code = EXIT_TERMINATED if isinstance(interrupt, Terminated) else EXIT_INTERRUPTED
    sys.exit(code)
