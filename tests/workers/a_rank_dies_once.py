"""`python -m fastlm.train` for torchrun, except that one rank is killed once (SIGKILL: what an
out-of-memory killer or a lost machine does) at a given step.

$DIES_ONCE_MARKER names a file that records the death, so that no later attempt dies again,
whichever machine the rank lands on then; $DIES_RANK is the rank (1 unless told), $DIES_AT the
position as `epochs done,step into the next` (1,10 unless told: after the first epoch's checkpoint).
"""
import os
import signal
from pathlib import Path

from fastlm.cli import run_main
from fastlm.train import main
from fastlm.training.trainer import Run

MARKER = Path(os.environ["DIES_ONCE_MARKER"])
KILLED_AT = tuple(int(n) for n in os.environ.get("DIES_AT", "1,10").split(","))


def dying(train_step):
    def train_step_or_die(run, inputs, targets):
        if (run.epoch, run.step) == KILLED_AT:
            MARKER.touch()
            os.kill(os.getpid(), signal.SIGKILL)
        train_step(run, inputs, targets)
    return train_step_or_die


if os.environ["RANK"] == os.environ.get("DIES_RANK", "1") and not MARKER.exists():
    Run.train_step = dying(Run.train_step)
run_main(main)
