"""Writing a file whole or not at all."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable


def write_atomically(path: str | os.PathLike, content: bytes | str | Callable[[Path], None]) -> None:
    """Write `content` (bytes, text, or a function that writes the path it is given) to a temporary
    file beside `path`, then rename it over `path`. A crash never leaves half a file, and a failed
    write (disk full) leaves what was there as it was; the error is raised for the caller to word."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # hidden, and named so a run folder can sweep it
    try:
        if isinstance(content, bytes):
            tmp.write_bytes(content)
        elif isinstance(content, str):
            tmp.write_text(content)
        else:
            content(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
