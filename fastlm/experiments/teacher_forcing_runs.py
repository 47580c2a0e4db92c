"""The arms of the teacher-forcing comparison and their runs: an `Arm` says what a model is fed;
`arm_config` is the run it trains for a seed; `train_arm` trains it, or reuses or resumes the run
a runs folder already holds, so a comparison stopped half-way goes on where it stopped."""
from __future__ import annotations

import fcntl
import math
import shutil
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from fastlm.checkpoint import CHECKPOINT, load_checkpoint
from fastlm.config import TrainConfig
from fastlm.errors import TrainingError
from fastlm.experiments.teacher_forcing_facts import TF
from fastlm.training.rundir import METRICS
from fastlm.training.scheduled_sampling import teacher_forcing_probability
from fastlm.training.trainer import train


@dataclass(frozen=True)
class Arm:
    """One way of training: the probability P of feeding the true word, its decay over the run, the
    model's word fed otherwise (its argmax, or a sample from its softmax), and how many of the
    comparison's seeds it trains (None: all)."""
    p: float = 1.0
    schedule: str = "constant"
    token: str = "argmax"
    seeds: int | None = None

    @classmethod
    def parse(cls, spec: str) -> "Arm":
        """`P[:schedule[:token[:seeds]]]`, e.g. `0`, `0:constant:sample`, `1:inverse-sigmoid`, `0::sample:2`."""
        parts = spec.split(":")
        try:
            p = float(parts[0])
            seeds = int(parts[3]) if len(parts) > 3 and parts[3] else None
        except ValueError:
            raise TrainingError(f"--arm {spec}: write P[:schedule[:token[:seeds]]], P a probability and seeds a "
                                "count, e.g. 0 or 1:inverse-sigmoid or 0:constant:sample:2") from None
        if len(parts) > 4:
            raise TrainingError(f"--arm {spec}: at most four parts, P:schedule:token:seeds")
        if seeds is not None and seeds < 1:
            raise TrainingError(f"--arm {spec}: its seeds must be at least 1, got {seeds}")
        schedule, token = (parts[k] if len(parts) > k and parts[k] else default
                           for k, default in ((1, "constant"), (2, "argmax")))
        return cls(p, schedule, token, seeds)

    def setting(self) -> "Arm":
        """The arm without its seed count: what its runs are (the word fed otherwise means nothing
        when the true word is always fed)."""
        if self.p >= 1 and self.schedule == "constant":
            return Arm()
        return replace(self, seeds=None)

    @property
    def teacher_forced(self) -> bool:
        return self.p >= 1 and self.schedule == "constant"

    @property
    def folder(self) -> str:
        if self.teacher_forced:
            return TF
        return f"P{self.p:g}" + (f"-{self.schedule}" if self.schedule != "constant" else "") + f"-{self.token}"

    @property
    def name(self) -> str:
        sampled = " (sampled)" if self.token == "sample" else ""
        if self.teacher_forced:
            return TF
        if self.schedule != "constant":
            start = f", from P {self.p:g}" if self.p != 1 else ""
            return f"scheduled sampling ({self.schedule}{start}){sampled}"
        return f"free-running{sampled}" if self.p == 0 else f"P = {self.p:g}{sampled}"

    def described(self) -> str:
        """What the arm feeds the model, in words."""
        if self.teacher_forced:
            return "P = 1: every input is the true previous word."
        fed = ("the model's own prediction at the step before, its argmax (the most likely word)" if
               self.token == "argmax" else "a word sampled from the model's softmax at the step before")
        if self.schedule != "constant":
            first, last = (teacher_forcing_probability(self.p, self.schedule, s) for s in (0.0, 1.0))
            return (f"P decays from {first:.3g} to {last:.2g} over the run ({self.schedule} schedule of "
                    f"`training/scheduled_sampling.py`); an input that is not the true word is {fed}.")
        if self.p == 0:
            return f"P = 0: every input after the epoch's first word is {fed}, across window edges too."
        return f"each input is the true word with probability {self.p:g}, else {fed}."


TEACHER_FORCED = Arm()


def arm_config(base: TrainConfig, arm: Arm, seed: int, steps: int, eval_interval: int, eval_tokens: int | None,
               runs_dir: Path, windows_per_epoch: int) -> TrainConfig:
    """The run one arm trains for one seed: eager and in fp32 for every arm, since free running goes
    step by step without CUDA graphs or autocast and the teacher-forced arm must not differ in precision."""
    return replace(base, seed=seed, out=str(runs_dir / arm.folder / f"seed-{seed}"), max_steps=steps,
                   epochs=math.ceil(steps / windows_per_epoch), teacher_forcing=arm.p,
                   teacher_forcing_schedule=arm.schedule, teacher_forcing_steps=steps,
                   free_running_token=arm.token, eval_interval=eval_interval, eval_tokens=eval_tokens,
                   log_interval=max(1, steps // 20), amp="off", cuda_graphs=False)


def train_arm(cfg: TrainConfig) -> None:
    """Train `cfg`'s run into `cfg.out`, or take the one already there: a finished run of the same
    setting is reused, an unfinished one resumed, so an experiment stopped half-way goes on where it
    stopped."""
    folder = Path(cfg.out)
    if (folder / CHECKPOINT).is_file():
        saved = load_checkpoint(folder / CHECKPOINT)
        differs = next((k for k, v in asdict(cfg).items() if k != "out" and saved["config"].get(k) != v), None)
        if differs is not None:  # the folder may have moved: its own path is no setting
            raise TrainingError(f"{folder} holds a run with another {differs} ({saved['config'].get(differs)!r}, "
                                f"this experiment's is {getattr(cfg, differs)!r}): pass another --runs folder")
        if saved["global_step"] >= cfg.max_steps:
            return
        result = train(cfg, resume=str(folder))
    else:
        if folder.is_dir() and {p.name for p in folder.iterdir()} <= {METRICS, ".lock"}:
            _remove_dead_run(folder)  # killed before its first checkpoint: it starts again
        result = train(cfg)
    if result.interrupted:  # a shorter run would be compared as if it had the full budget
        raise KeyboardInterrupt


def _remove_dead_run(folder: Path) -> None:
    """Remove a run folder holding only a lock and records, unless a live training holds the lock (a
    one-epoch run writes its first checkpoint at the epoch's end: until then it looks like this)."""
    with open(folder / ".lock", "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise TrainingError(f"{folder} is in use by another training: wait for it to end, or pass another "
                                "--runs folder") from None
        shutil.rmtree(folder)
