"""What a training run needs besides the loop: its folder, its RNG state, and a polite Ctrl-C."""
from __future__ import annotations

import signal
import threading
from datetime import datetime
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from fastlm import distributed


class StopFlag:
    """Ctrl-C asks the loop to stop after the current step (and save); a second Ctrl-C aborts."""

    def __init__(self):
        self.requested = False  # this process saw Ctrl-C
        self.agreed = False  # every rank stops at the same step: decided at log points under torchrun
        self._previous = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        self.requested = True
        self.agreed = self.agreed or not dist.is_initialized()
        signal.signal(signal.SIGINT, signal.default_int_handler)
        tqdm.write("Stopping after this step and saving a checkpoint (Ctrl-C again to abort without saving)")

    def agree(self, world) -> None:
        if world.enabled:
            flag = torch.tensor([float(self.requested)], device=distributed.collective_device())
            distributed.sum_(flag)
            self.agreed = self.agreed or bool(flag.item() > 0)

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


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
