"""Every error a user can cause, in one place. Each message says what to change; the entry points
print it as one line and exit 2 (1 for `DivergedError`: the job ran and failed). Any other exception
is a bug in fastlm, and keeps its traceback.

`UsageError` is a ValueError, so code calling the library can catch it as one.
"""


class UsageError(ValueError):
    """A request that cannot be carried out as asked (a flag, a file, a word, a path)."""


class DataError(UsageError):
    """A corpus that cannot be read or fetched."""


class CheckpointError(UsageError):
    """A checkpoint path that cannot be used or written."""


class TrainingError(UsageError):
    """A training request that cannot be carried out (a flag, or a combination of flags)."""


class RunFolderError(TrainingError):
    """The run folder cannot be used or written."""


class DivergedError(TrainingError):
    """The loss became non-finite; the last good checkpoint is kept."""


def first_line(err: BaseException) -> str:
    """An exception's first line, or its type's name when its message is empty: for one-line reports."""
    lines = str(err).strip().splitlines()
    return lines[0] if lines else type(err).__name__
