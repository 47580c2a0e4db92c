"""What a run shows of its pace: a progress bar per epoch, the first step's cost at once, then at each
log point the time per step, tokens per second and the time left. Validation is not counted."""
from __future__ import annotations

import contextlib
from typing import Callable

from tqdm import tqdm


def duration(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


class Pace:
    """Timing of the steps since the start of this process and since the last log point; `show`:
    whether this process draws the bar (under torchrun, rank 0 only)."""

    def __init__(self, clock: Callable[[], float], start_step: int, total_steps: int, tokens_per_step: int,
                 show: bool = True):
        self.clock, self.start_step, self.total_steps = clock, start_step, total_steps
        self.tokens_per_step, self.show = tokens_per_step, show
        self.start_time = self.last_time = clock()
        self.steps = 0  # since the last log point
        self.uncounted = 0.0  # seconds of checkpoint writes: not training time
        self.bar = None

    @contextlib.contextmanager
    def not_counted(self):
        started = self.clock()
        try:
            yield
        finally:
            self.uncounted += self.clock() - started

    def training_seconds(self) -> float:
        """Steps and validation since the first step of this process, checkpoint writes excluded."""
        return self.clock() - self.start_time - self.uncounted

    def summary(self, global_step: int, validations: int, seconds: float) -> str:
        return (f"Training time: {seconds:.1f} s for {global_step - self.start_step} steps and {validations} "
                f"validation passes ({self.uncounted:.1f} s of checkpoint writes not counted)")

    def start_epoch(self, epoch: int, step: int, steps_per_epoch: int) -> None:
        """A bar for the epoch, and timing afresh: the validation before it is not a step."""
        self.steps, self.last_time = 0, self.clock()
        self.bar = tqdm(total=steps_per_epoch, initial=step, desc=f"epoch {epoch + 1}", unit="step",
                        disable=None if self.show else True)

    def step_taken(self) -> None:
        self.steps += 1
        self.bar.update()

    def end_epoch(self) -> None:
        self.bar.close()

    def first_step(self, log_interval: int) -> str:
        """A first line at once, not after --log-interval steps: what a step costs, when the run ends."""
        seconds = self.clock() - self.start_time
        return (f"First step done in {seconds:.2f} s; at that pace the {self.total_steps - self.start_step} steps of "
                f"this run take {self.eta(self.start_step + 1, seconds)}, and the first log line comes at step "
                f"{log_interval}")

    def eta(self, global_step: int, seconds_per_step: float) -> str:
        """Time left for the steps still to come at this pace."""
        return duration(max(0, self.total_steps - global_step) * seconds_per_step)

    def lap(self) -> tuple[int, float, float]:
        """(steps, seconds per step, tokens per second) since the last log point, which this one becomes."""
        now = self.clock()
        steps, seconds_per_step = self.steps, (now - self.last_time) / self.steps
        self.steps, self.last_time = 0, now
        self.bar.set_postfix(tok_s=f"{self.tokens_per_step / seconds_per_step:,.0f}")
        return steps, seconds_per_step, self.tokens_per_step / seconds_per_step


def nothing_to_train(epoch: int, epochs: int, global_step: int, max_steps: int | None) -> str | None:
    """Why a resumed run that has already done what it is asked has nothing to do, if it has."""
    at_max_steps = max_steps is not None and global_step >= max_steps
    if epoch >= epochs:
        also = f" and raise --max-steps above {max_steps} (it stops the run too)" if at_max_steps else ""
        return (f"Nothing to train: the run has finished its {epoch} epoch(s); pass --epochs N with N > {epoch}{also} "
                "to train more")
    if at_max_steps:
        return (f"Nothing to train: the run is at step {global_step} and --max-steps is {max_steps}; raise "
                "--max-steps (it counts across resumes) to train more")
    return None
