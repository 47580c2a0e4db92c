"""What a training run needs besides the loop: its folder, its RNG state, and a polite Ctrl-C or SIGTERM."""
from __future__ import annotations

import fcntl
import json
import os
import signal
import threading
from datetime import datetime
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from fastlm.training import distributed
from fastlm.checkpoint import BEST, CHECKPOINT, first_line
from fastlm.config import TrainingError


class StopFlag:
    """Ctrl-C or SIGTERM (what schedulers and containers send before killing) asks the loop to stop
    after the current step and save; a second one aborts."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.requested = False  # this process was asked to stop
        self.agreed = False  # every rank stops at the same step: decided at log points under torchrun
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = {signum: signal.signal(signum, self._handle) for signum in self.SIGNALS}
        return self

    def _handle(self, signum, frame):
        self.requested = True
        self.agreed = self.agreed or not dist.is_initialized()
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
        tqdm.write(f"{name}: stopping after this step and saving a checkpoint (again to abort without saving)")

    def agree(self, world) -> None:
        if world.enabled:
            flag = torch.tensor([float(self.requested)], device=distributed.collective_device())
            distributed.sum_(flag)
            self.agreed = self.agreed or bool(flag.item() > 0)

    def __exit__(self, *exc):
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)


METRICS = "metrics.jsonl"  # one JSON record per line: log points, validations, tests


class RunFolderError(TrainingError):
    """The run folder cannot be used or written; the message says what to change."""
RUN_FILES = (CHECKPOINT, BEST, METRICS)


class RunFolder:
    """A run's folder, which belongs to one run and one process at a time.

    `open` creates it, refuses a fresh run where a run already is (resume it, or pick another
    folder), and takes an exclusive lock (flock on `.lock`): a second process is refused, and the
    lock goes with its process, so a killed run never leaves it stuck. It also removes the temporary
    files of checkpoint writes that a killed process left behind (only the lock holder writes here).
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self._lock = None


    def open(self, fresh: bool) -> None:
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            lock = open(self.path / ".lock", "a+")
        except OSError as err:
            raise TrainingError(f"cannot use {self.path} as the run folder ({err.strerror or err}): pick another --out"
                                ) from None
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().strip() or "another process"
            lock.close()
            raise TrainingError(f"{self.path} is in use by another training ({holder}): wait for it to end, "
                                "or pick another --out") from None
        lock.seek(0)
        lock.truncate()
        lock.write(f"pid {os.getpid()}\n")
        lock.flush()
        self._lock = lock
        if fresh and ((self.path / CHECKPOINT).exists() or (self.path / BEST).exists()):
            self.close()
            raise TrainingError(f"{self.path} already holds a run: continue it with --resume {self.path}, "
                                "or pick another --out")
        if fresh and (self.path / METRICS).exists():
            self.close()
            raise TrainingError(f"{self.path} holds the records of a run that saved no checkpoint (it diverged or was "
                                f"stopped early): remove {self.path / METRICS}, or pick another --out")
        for name in RUN_FILES:  # only the lock holder writes them, so their temporary files are stale
            for stale in self.path.glob(f".{name}.*.tmp"):
                stale.unlink(missing_ok=True)

    def close(self) -> None:
        if self._lock is not None:
            self._lock.close()  # closing releases the flock
            self._lock = None

    def remove_if_unused(self) -> None:
        """Remove the folder when it holds nothing but the lock file (a run stopped by bad input)."""
        if self.path.is_dir() and [p.name for p in self.path.iterdir()] == [".lock"]:
            (self.path / ".lock").unlink()
            self.path.rmdir()

    def append(self, record: dict) -> None:
        """Append one record to metrics.jsonl whole or not at all: a write cut short (disk full) is
        cut back off, so readers never meet half a line."""
        path = self.path / METRICS
        line = (json.dumps(record) + "\n").encode()
        try:
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        except OSError as err:
            raise RunFolderError(f"cannot write {path} ({first_line(err)}): free some space or fix its "
                                 "permissions, then --resume the run") from None
        start = os.lseek(fd, 0, os.SEEK_END)
        try:
            written = 0
            while written < len(line):
                written += os.write(fd, line[written:])
        except OSError as err:
            os.ftruncate(fd, start)
            raise RunFolderError(f"cannot write {path} ({first_line(err)}): its earlier records are intact; "
                                 "free some space, then --resume the run") from None
        finally:
            os.close(fd)

    def keep_records_up_to(self, global_step: int) -> None:
        """Drop the records of steps after `global_step` (logged before a crash, repeated by the resumed
        run) and any torn line, so that every step has one record."""
        path = self.path / METRICS
        if not path.is_file():
            return
        kept = []
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if record.get("global_step", 0) <= global_step:
                kept.append(line + "\n")
        tmp = path.with_name(f".{METRICS}.{os.getpid()}.tmp")
        try:
            tmp.write_text("".join(kept))
            os.replace(tmp, path)
        except OSError as err:
            tmp.unlink(missing_ok=True)
            raise RunFolderError(f"cannot rewrite {path} ({first_line(err)}): it is as it was; free some space, "
                                 "then --resume the run") from None


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def new_run_dir() -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    run_dir, n = Path("runs") / stamp, 1
    while run_dir.exists():
        n += 1
        run_dir = Path("runs") / f"{stamp}-{n}"
    return run_dir
