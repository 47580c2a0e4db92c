"""`python -m fastlm.train` for torchrun, except that rank 1 is killed once (SIGKILL: what an
out-of-memory killer or a lost machine does) at step 10 of the second epoch, after the first
epoch's checkpoint and before the second's. The file named by $DIES_ONCE_MARKER records the death,
so that no later attempt dies again, whichever machine rank 1 lands on then."""
import os
import signal
from pathlib import Path

from fastlm.cli import run_main
from fastlm.train import main
from fastlm.training.trainer import Run

KILLED_AT = (1, 10)  # (epochs done, step into the next)
MARKER = Path(os.environ["DIES_ONCE_MARKER"])


def dying(train_step):
    def train_step_or_die(run, inputs, targets):
        if (run.epoch, run.step) == KILLED_AT:
            MARKER.touch()
            os.kill(os.getpid(), signal.SIGKILL)
        train_step(run, inputs, targets)
    return train_step_or_die


if os.environ["RANK"] == "1" and not MARKER.exists():
    Run.train_step = dying(Run.train_step)
run_main(main)
