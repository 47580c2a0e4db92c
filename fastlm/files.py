"""Writing files: whole or not at all where a file is replaced, in place where the path is a device or
a pipe, and never over a file that fastlm keeps for itself."""
from __future__ import annotations

import os
import stat
import sys
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable

from fastlm.errors import UsageError

# A run folder's own files: a command's output written over them would lose a run's records or its lock.
OWN_FILES = {"metrics.jsonl": "a run's metrics.jsonl", ".lock": "a run's lock file"}
CHECKPOINT_SUFFIXES = (".pt", ".pth")
# torch.save writes a zip archive; before torch 1.6 (and pickle itself, protocols 2 to 5) a pickle.
CHECKPOINT_MAGIC = (b"PK\x03\x04", *(bytes([0x80, protocol]) for protocol in range(2, 6)))


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


def check_output_path(path: str | os.PathLike, example: str, flag: str = "--out") -> None:
    """Refuse, before any work, an output path that `write_output` would refuse or cannot write: a
    UsageError naming the problem and the fix (`example` is a file name to suggest)."""
    name = f"{flag} {path}"
    target, in_place = _target(Path(path), name, example)
    if in_place:  # asked, not opened: closing a FIFO's only writer would end its reader's input
        if isinstance(target, Path) and not os.access(target, os.W_OK):
            raise UsageError(f"cannot write {name} (permission denied): pick another file")
        return
    try:
        with tempfile.NamedTemporaryFile(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp"):
            pass
    except OSError as err:
        raise UsageError(f"cannot write {name} ({err.strerror or err}): pick another file") from None


def write_output(path: str | os.PathLike, content: str | bytes | Callable[[BinaryIO], None], example: str,
                 flag: str = "--out") -> None:
    """Write a command's output (text, bytes, or a function writing to the binary file it is given).

    The rule: a regular file or a new path is replaced atomically (through a symbolic link, the file
    it points to, so the link stays). A character device, a FIFO, or a link to one (/dev/null, a named
    pipe) is opened for writing and streamed, never renamed onto: a rename would put a regular file in
    the device's or the link's place. This process's stdout or stderr, whatever it is (/dev/stdout
    redirected to a file), is written through its own descriptor, after what was printed. A file
    fastlm keeps for itself (a run's metrics.jsonl or .lock, a checkpoint: *.pt, *.pth, or a zip or
    pickle by its first bytes), a folder and any other kind of file are refused: a UsageError naming
    the problem and the fix, as is a write that fails (disk full, a reader gone).
    """
    name = f"{flag} {path}"
    target, in_place = _target(Path(path), name, example)
    write = content if callable(content) else lambda file: file.write(_bytes(content))
    kept = "what it received so far stays" if in_place else \
        "the file there is as it was" if target.exists() else "nothing was written"
    try:
        if in_place:
            with _open_in_place(target) as file:
                write(file)
        else:
            write_atomically(target, lambda tmp: _write_file(tmp, write))
    except OSError as err:
        raise UsageError(f"cannot write {name} ({err.strerror or err}): {kept}; free some space or pick another "
                         "file") from None


def _target(path: Path, name: str, example: str) -> tuple[Path | int, bool]:
    """Where to write `path` (a path, or the descriptor of this process's stdout or stderr) and
    whether in place (see `write_output`), or a UsageError."""
    try:
        mode = os.stat(path)  # follows links: /dev/stdout is whatever this process's stdout is
    except FileNotFoundError:
        mode = None  # a new file (or a link to one)
    except OSError as err:
        raise UsageError(f"cannot write {name} ({err.strerror or err}): pick another file") from None
    if mode is not None and _std_stream(mode) is not None:
        return _std_stream(mode), True
    if mode is not None and (stat.S_ISCHR(mode.st_mode) or stat.S_ISFIFO(mode.st_mode)):
        return path, True
    if mode is not None and stat.S_ISDIR(mode.st_mode):
        raise UsageError(f"{name} is a folder: name a file in it, e.g. {path / example}")
    if mode is not None and not stat.S_ISREG(mode.st_mode):
        raise UsageError(f"{name} is neither a file, a FIFO nor a character device: name a file, e.g. {example}")
    target = Path(os.path.realpath(path))
    owner = _owned(path) or _owned(target)
    if owner:
        raise UsageError(f"{name} is {owner}: fastlm never writes over one, name another file, e.g. {example}")
    return target, False


def _open_in_place(target: Path | int) -> BinaryIO:
    if isinstance(target, int):
        # A file reopened by its path (`--out /dev/stdout > file`) would have an offset of its own,
        # and the prints that follow would overwrite what was written there.
        sys.stdout.flush()
        sys.stderr.flush()
        return open(os.dup(target), "wb")
    return open(target, "ab")


def _owned(path: Path) -> str | None:
    """What `path` is when fastlm keeps it for itself (see `write_output`), else None."""
    if path.name in OWN_FILES:
        return OWN_FILES[path.name]
    if path.suffix.lower() in CHECKPOINT_SUFFIXES or _first_bytes(path).startswith(CHECKPOINT_MAGIC):
        return "a checkpoint (or named like one)"
    return None


def _first_bytes(path: Path) -> bytes:
    try:
        with open(path, "rb") as file:
            return file.read(4)
    except OSError:  # none (a new file), or unreadable: the write itself will tell
        return b""


def _std_stream(mode: os.stat_result) -> int | None:
    """The descriptor, 1 or 2, of this process's stdout or stderr when `mode` is its file, else None."""
    for fd in (1, 2):
        try:
            other = os.fstat(fd)
        except OSError:  # closed
            continue
        if (other.st_dev, other.st_ino) == (mode.st_dev, mode.st_ino):
            return fd
    return None


def _bytes(content: str | bytes) -> bytes:
    return content.encode() if isinstance(content, str) else content


def _write_file(path: Path, write: Callable[[BinaryIO], None]) -> None:
    with open(path, "wb") as file:
        write(file)

