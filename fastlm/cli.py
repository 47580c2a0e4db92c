"""What the entry points share: turning known errors into one line on stderr and an exit code."""
from __future__ import annotations

import sys
from typing import Callable

from fastlm.checkpoint import CheckpointError
from fastlm.config import TrainingError
from fastlm.data import DataError
from fastlm.trainer import DivergedError

EXIT_FAILED = 1  # the job ran and failed (training diverged)
EXIT_USAGE = 2  # bad input: the message says what to fix
EXIT_INTERRUPTED = 130  # stopped by Ctrl-C


def run_main(main: Callable[[list[str] | None], int], argv: list[str] | None = None) -> None:
    """Run an entry point's `main`, mapping known errors to `error: …` on stderr and an exit code."""
    try:
        code = main(argv)
    except DivergedError as err:
        print(f"error: {err}", file=sys.stderr)
        code = EXIT_FAILED
    except (DataError, CheckpointError, TrainingError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        code = EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        code = EXIT_INTERRUPTED
    sys.exit(code)
