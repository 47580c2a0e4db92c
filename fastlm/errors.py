"""The errors a user can cause. Each message says what to change; the entry points print it as one
line and exit 2. Any other exception is a bug in fastlm, and keeps its traceback.

`UsageError` is a ValueError, so code calling the library can catch it as one.
"""


class UsageError(ValueError):
    """A request that cannot be carried out as asked (a flag, a file, a word, a path)."""
