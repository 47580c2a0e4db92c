"""Opening a run (its config from the flags or the checkpoint, the device, torchrun, the folder
locked for one run and one process), the folder's files, and a polite Ctrl-C or SIGTERM."""
from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import signal
import threading
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Iterator

import torch
import torch.distributed as dist
from tqdm import tqdm

from fastlm.checkpoint import (
    BEST,
    CHECKPOINT,
    FOR_RESUME,
    check_finite_weights,
    checkpoint_path,
    load_checkpoint,
    save_checkpoint,
)
from fastlm.config import TrainConfig, check_config, resume_config
from fastlm.device import pick_device, use_device
from fastlm.errors import CheckpointError, RunFolderError, TrainingError, first_line
from fastlm.files import write_atomically
from fastlm.training import distributed


class StopFlag:
    """Ctrl-C, SIGTERM (what schedulers and containers send before killing) or SIGHUP (a closed
    terminal) asks the loop to stop after the current step and save; a second one aborts."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

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
        for other, previous in self._previous.items():  # a second signal unwinds as it would outside the loop
            signal.signal(other, previous if previous is not None else signal.SIG_DFL)
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


RUN_FILES = (CHECKPOINT, BEST, METRICS)


class RunFolder:
    """A run's folder, which belongs to one run and one process at a time.

    `open` creates it, refuses a fresh run where a run already is (resume it, or pick another
    folder), and takes an exclusive lock (flock on `.lock`): a second process is refused, and the
    lock goes with its process, so a killed run never leaves it stuck. It also removes the temporary
    files of checkpoint writes that a killed process left behind (only the lock holder writes here).
    """

    def __init__(self, path: Path, saved_step: int | None = None):
        self.path = Path(path)
        self.saved_step = saved_step  # the global step its checkpoint.pt holds, None while there is none
        self._lock = None
        self._created = [self.path]  # the folders `open` made (the run folder and missing parents)

    def open(self, fresh: bool, restarted: bool = False, launch: str | None = None) -> None:
        """Create and lock the folder (`restarted`: by an attempt of torchrun `launch` after the one
        that opened it); the lock file names the torchrun launch once the folder took the run."""
        self._created = [p for p in (self.path, *self.path.parents) if not p.exists()]
        new_lock = not (self.path / ".lock").exists()
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
        self._lock = lock
        problem = self._unusable(fresh, restarted)
        if problem is not None:
            self.close()
            if new_lock:  # a folder that is not ours keeps nothing of this attempt
                (self.path / ".lock").unlink(missing_ok=True)
            raise TrainingError(problem)
        lock.seek(0)
        lock.truncate()
        lock.write(f"pid {os.getpid()}" + (f", torchrun launch {launch}" if launch else "") + "\n")
        lock.flush()
        for name in RUN_FILES:  # only the lock holder writes them, so their temporary files are stale
            for stale in self.path.glob(f".{name}.*.tmp"):
                stale.unlink(missing_ok=True)

    def _unusable(self, fresh: bool, restarted: bool) -> str | None:
        """Why the folder cannot take this run, if it cannot (a restarted attempt takes over the
        records of the earlier one, which died before its first checkpoint)."""
        odd = next((path for path in map(self.path.joinpath, RUN_FILES) if path.exists() and not path.is_file()), None)
        if odd is not None:  # a FIFO would block the run at its first write, a folder fail it at its first save
            return (f"{odd} is not a regular file: a run folder's {odd.name} must be one; remove it, or pick "
                    "another --out")
        if restarted:  # an earlier attempt left them (`open_run` resumes its checkpoint.pt, if there is one)
            return None
        if fresh and ((self.path / CHECKPOINT).exists() or (self.path / BEST).exists()):
            return f"{self.path} already holds a run: continue it with --resume {self.path}, or pick another --out"
        if fresh and (self.path / METRICS).exists():
            return (f"{self.path} holds a {METRICS} but no checkpoint (a run that diverged or stopped early, or a file "
                    f"of yours): remove {self.path / METRICS}, or pick another --out")
        return None

    def close(self) -> None:
        if self._lock is not None:
            self._lock.close()  # closing releases the flock
            self._lock = None

    def remove_if_unused(self) -> None:
        """Remove the folder when it holds nothing but the lock file (a run stopped by bad input),
        and the parents `open` created for it, as long as they are empty."""
        if self.path.is_dir() and [p.name for p in self.path.iterdir()] == [".lock"]:
            (self.path / ".lock").unlink()
            for folder in self._created:
                if any(folder.iterdir()):
                    break
                folder.rmdir()

    def save(self, checkpoint: dict, name: str, global_step: int, write: bool = True) -> None:
        """Write a checkpoint (atomically; `write=False` on the ranks that leave it to rank 0) and
        remember which step checkpoint.pt now holds."""
        if write:
            save_checkpoint(checkpoint, self.path / name)
        if name == CHECKPOINT:
            self.saved_step = global_step

    def kept(self) -> str:
        """What the folder holds to go back to, said truthfully."""
        if self.saved_step is None:
            return f"no checkpoint was written to {self.path}"
        return f"{self.path / CHECKPOINT} keeps step {self.saved_step}"

    def append(self, record: dict) -> None:
        """Append one record to metrics.jsonl whole or not at all: a write cut short (disk full) is
        cut back off, so readers never meet half a line."""
        path = self.path / METRICS
        # JSON has no inf or NaN (most readers refuse Python's `Infinity`): null, and the value kept by name
        nonfinite = {k: str(v) for k, v in record.items() if isinstance(v, float) and not math.isfinite(v)}
        if nonfinite:
            record = {**record, **dict.fromkeys(nonfinite), "nonfinite": nonfinite}
        line = (json.dumps(record, allow_nan=False) + "\n").encode()
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
        kept = [json.dumps(r) + "\n" for r in read_metrics(self.path) if r.get("global_step", 0) <= global_step]
        try:
            write_atomically(path, "".join(kept))
        except OSError as err:
            raise RunFolderError(f"cannot rewrite {path} ({first_line(err)}): it is as it was; free some space, "
                                 "then --resume the run") from None


def read_metrics(run_dir: Path) -> list[dict]:
    """The records of a run folder's metrics.jsonl, in order ([] when it has none); a line that is no
    JSON object (torn by a write cut short, or edited by hand) is skipped."""
    path = Path(run_dir) / METRICS
    if not path.is_file():
        return []
    records = []
    for line in path.read_bytes().splitlines():  # bytes: a torn or foreign line may not even be UTF-8
        try:
            record = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue
        if isinstance(record, dict):
            nonfinite = record.pop("nonfinite", None)  # the values `append` wrote as null
            if isinstance(nonfinite, dict):
                record |= {k: float(v) for k, v in nonfinite.items()}
            records.append(record)
    return records


def new_run_dir() -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    run_dir, n = Path("runs") / stamp, 1
    while run_dir.exists():
        n += 1
        run_dir = Path("runs") / f"{stamp}-{n}"
    return run_dir


@dataclass
class OpenedRun:
    """What opening a run settled: its checked config, the checkpoint it resumes (None for a new
    run), where it trains, and its folder, locked."""
    cfg: TrainConfig
    ckpt: dict | None
    device: torch.device
    world: distributed.World
    folder: RunFolder


@contextlib.contextmanager
def open_run(cfg: TrainConfig, resume: str | None = None, overrides: dict | None = None) -> Iterator[OpenedRun]:
    """Open a new run, or resume one (`resume`: a run folder or a checkpoint; `overrides`: the flags
    given with it): torchrun joined, the config settled and checked, the device chosen, the folder
    created and locked (rank 0 owns it; every rank learns whether it may go on). An attempt that
    torchrun restarted goes on from the checkpoint its earlier attempts left. On leaving, the lock
    is released, a folder this call created and nothing wrote to is removed, and torchrun is left."""
    overrides = overrides or {}
    # Joined first, so that rank 0 alone reads the checkpoint; the process group's kind (NCCL or
    # gloo) follows the device asked for, as a resumed run's saved device is not known yet.
    joined_cuda = pick_device((overrides.get("device") or "auto") if resume is not None else cfg.device).type == "cuda"
    world = distributed.join(cuda=joined_cuda)
    try:
        cfg, ckpt, source, restarted = distributed.from_rank0(lambda: _settle(cfg, resume, overrides, world.launch))
        device = pick_device(cfg.device)
        if world.enabled and (device.type == "cuda") != joined_cuda:
            raise TrainingError(f"this run trains on {cfg.device}: pass --device {cfg.device} with --resume under "
                                "torchrun (the ranks join before reading the checkpoint)")
        if world.enabled and device.type == "cuda":
            device = torch.device("cuda", world.local_rank)
        check_config(cfg, world, device)
        use_device(device)
        path = Path(cfg.out) if cfg.out else new_run_dir()
        in_place = source is not None and path.resolve() == source.parent.resolve()
        folder = RunFolder(path, saved_step=ckpt["global_step"] if in_place else None)
        problem, existed = None, folder.path.exists()
        if world.is_main:
            try:
                if in_place and source.name != CHECKPOINT:
                    _refuse_rolling_back(folder.path, source, ckpt)
                folder.open(fresh=not in_place, restarted=restarted, launch=world.launch)
            except TrainingError as err:
                problem = err
        refused = torch.tensor([float(problem is not None)], device=distributed.collective_device())
        if distributed.sum_(refused).item():
            raise problem or TrainingError(f"rank 0 could not use {folder.path} as the run folder (it says why)")
        try:
            if (in_place or restarted) and world.is_main:  # records of steps a crash cut off: the run repeats them
                folder.keep_records_up_to(ckpt["global_step"] if in_place else 0)
            if restarted and world.is_main:
                tqdm.write("torchrun restarted the job: going on from " + (
                    f"{source} (step {ckpt['global_step']})" if source else "the start (no checkpoint yet)"))
            yield OpenedRun(cfg, ckpt, device, world, folder)
        finally:
            folder.close()
            if not existed and world.is_main:
                folder.remove_if_unused()  # bad input stopped the run before it wrote anything
    finally:
        distributed.leave(world)


def _settle(cfg: TrainConfig, resume: str | None, overrides: dict, launch: str | None
            ) -> tuple[TrainConfig, dict | None, Path | None, bool]:
    """The run's config, the checkpoint it goes on from and its path (None, None for a new run), and
    whether torchrun restarted it. Rank 0's work: the files may lie on its disk alone."""
    source = checkpoint_path(resume) if resume is not None else None
    out = overrides.get("out", str(source.parent)) if source is not None else cfg.out
    restarted = out is not None and _opened_in_launch(Path(out), launch)
    if restarted and (Path(out) / CHECKPOINT).is_file():  # the same command again goes on from there
        source = Path(out) / CHECKPOINT
    if source is None:
        return cfg, None, None, restarted
    ckpt = _load_for_resume(source)
    if resume is not None:
        cfg = resume_config(ckpt["config"], {**overrides, "out": out})
    elif ckpt["config"] != asdict(cfg):
        raise TrainingError(f"torchrun restarted the job, but {source} holds a run with other settings: resume it "
                            "with --resume, or pick another --out")
    return cfg, ckpt, source, restarted


def _load_for_resume(source: Path) -> dict:
    ckpt = load_checkpoint(source, needs=FOR_RESUME)
    check_finite_weights(ckpt, source)
    return ckpt


def _opened_in_launch(run_dir: Path, launch: str | None) -> bool:
    """Whether an earlier attempt of this torchrun launch took the run folder (its lock file says
    so): then torchrun restarted the job. (The restart count torchrun passes differs between
    machines, and a launch's id is new with every launch, unlike `--rdzv-id`.)"""
    try:
        return launch is not None and (run_dir / ".lock").read_text().strip().endswith(f"torchrun launch {launch}")
    except OSError:
        return False


def _refuse_rolling_back(run_dir: Path, source: Path, ckpt: dict) -> None:
    """Resuming from best.pt (or another file) in its own folder would overwrite a later checkpoint.pt."""
    latest = run_dir / CHECKPOINT
    try:
        step = load_checkpoint(latest)["global_step"]
    except CheckpointError:  # none, or unreadable: nothing to protect
        return
    if step != ckpt["global_step"]:
        raise TrainingError(f"resuming from {source} (step {ckpt['global_step']}) in {run_dir} would overwrite "
                            f"{latest} (step {step}): pass --out NEW_FOLDER to continue from {source.name} there")
