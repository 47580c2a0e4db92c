"""Training with truncated backpropagation through time (TBPTT), in one loop you can read top to bottom.

Each epoch walks the batchified training stream in windows of `seq_len` tokens. The hidden state is
carried from one window to the next and detached in between, so gradients stop at the window edge
while the state keeps its memory. The loss is summed on the device and read only at log points.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

from fastlm.checkpoint import BEST, CHECKPOINT, check_same_data, load_checkpoint, run_checkpoint
from fastlm.config import TrainConfig
from fastlm.data import Dictionary, batchify, batchify_for_eval, load_corpus, num_windows, tbptt_windows
from fastlm.device import prepare, set_rng_state
from fastlm.errors import DivergedError
from fastlm.models.lm import RNNLM, load_weights, parameter_count, training_bytes
from fastlm.scoring import evaluate, perplexity
from fastlm.training import distributed
from fastlm.training.progress import Pace, nothing_to_train
from fastlm.training.rundir import OpenedRun, StopFlag, open_run
from fastlm.training.scheduled_sampling import free_running_step, teacher_forcing_probability
from fastlm.training.step import build_eval_forward, build_train_step


@dataclass
class TrainResult:
    run_dir: Path
    global_step: int
    train_losses: list[float]  # the mean loss of each log interval
    valid_ppl: float | None
    test_ppl: float | None  # of the last weights
    best_test_ppl: float | None  # of the best-by-validation weights
    interrupted: bool = False
    train_seconds: float = 0.0  # steps and validation, from the first step on; checkpoint writes excluded


def train(cfg: TrainConfig, resume: str | None = None, overrides: dict | None = None,
          clock: Callable[[], float] = time.perf_counter) -> TrainResult:
    """Train (or resume: `resume` a run folder or checkpoint, `overrides` the flags given with it) a
    run; returns what it measured. Raises a UsageError subclass on bad input.

    Under torchrun the ranks train one model together (see fastlm/training/distributed.py). `clock`
    times training (tests pass a fake one).
    """
    with open_run(cfg, resume, overrides) as opened:
        return Run(opened, clock).train()


class Run:
    """One training run: its data, model and step, where it stands (epoch, step, best validation
    loss), and the named steps of its loop. `state_dict()` is the checkpoint that resumes it exactly."""

    def __init__(self, opened: OpenedRun, clock: Callable[[], float]):
        self.cfg, self.device, self.world, self.clock = opened.cfg, opened.device, opened.world, clock
        self.folder, self.run_dir = opened.folder, opened.folder.path
        self.say = tqdm.write if self.world.is_main else (lambda *args: None)
        self.epoch, self.step, self.global_step, self.best_valid = 0, 0, 0, math.inf
        self.carried = None  # the resumed (h, c), this rank's rows
        self.carried_prediction = None  # scheduled sampling's resumed last prediction, this rank's rows
        self.fed_back = None  # the last window's prediction, a candidate for the next window's first input
        self.validations = 0
        self._load_data(opened.ckpt)
        self._build(opened.ckpt)
        self.result = TrainResult(self.run_dir, self.global_step, [], None, None, None)

    def _load_data(self, ckpt: dict | None) -> None:
        cfg, world = self.cfg, self.world
        self.corpus = load_corpus(cfg.data, Dictionary(ckpt["vocab"]) if ckpt else None, cfg.vocab_size)
        self.data_fingerprint = self.corpus.fingerprint()
        if ckpt:
            check_same_data(ckpt, self.data_fingerprint, cfg.data)
        # Each rank owns a contiguous block of the global batch's rows (all rows in one process).
        self.rows, eval_rows = world.rows(cfg.batch_size), world.rows(cfg.eval_batch_size)
        self.train_data = batchify(self.corpus.train, cfg.batch_size)[self.rows].to(self.device)
        self.valid_data = batchify_for_eval(self.corpus.valid, cfg.eval_batch_size, "valid")[eval_rows].to(self.device)
        self.test_data = batchify_for_eval(self.corpus.test, cfg.eval_batch_size, "test")[eval_rows].to(self.device)
        self.steps_per_epoch = num_windows(self.train_data, cfg.seq_len)  # refuses a seq_len that leaves none
        self.planned_steps = cfg.teacher_forcing_steps or max(1, cfg.epochs * self.steps_per_epoch)  # the schedule's
        in_epochs = cfg.epochs * self.steps_per_epoch
        self.total_steps = in_epochs if cfg.max_steps is None else min(in_epochs, cfg.max_steps)  # across resumes
        self.interim_valid = self.valid_data  # validation between epochs: --eval-tokens of it
        if cfg.eval_tokens:
            self.interim_valid = self.valid_data[:, : max(2, cfg.eval_tokens // cfg.eval_batch_size)]

    def _build(self, ckpt: dict | None) -> None:
        """The model (from the seed, or the checkpoint's weights and position), then the step."""
        cfg, device, vocab_size = self.cfg, self.device, len(self.corpus.dictionary)
        self.amp_dtype = prepare(device, cfg.amp, training_bytes(cfg, vocab_size), self.say)
        self.scaler = torch.amp.GradScaler(device.type) if self.amp_dtype == torch.float16 else None  # fp16's
        torch.manual_seed(cfg.seed)
        self.model = RNNLM.from_config(asdict(cfg), vocab_size).to(device)
        self.model.shard_batch(self.world.rank, self.world.size)  # dropout masks as one process would draw them
        if ckpt:
            load_weights(self.model, ckpt["model"], "the checkpoint")
            self.load_state_dict(ckpt)
            self.say(f"Resuming {self.run_dir} at epoch {self.epoch + 1}, step {self.step}/{self.steps_per_epoch} "
                     f"(step {self.global_step} in all)")
        self.build_step(ckpt["optimizer"] if ckpt else None, self.carried if self.step > 0 else None)
        ranks = f"{self.world.size} ranks of {self.train_data.shape[0]} rows, " if self.world.enabled else ""
        steps = "CUDA graphs" if self.stepper.graph is not None else "eager steps"
        self.say(f"fastlm: {vocab_size} words, {parameter_count(cfg, vocab_size):,} parameters, "
                 f"{self.steps_per_epoch} steps/epoch, device {device}, {ranks}"
                 f"LSTM backend {self.model.lstm.backend}, {steps}, run folder {self.run_dir}")
        self.eval_forward = build_eval_forward(self.model, self.valid_data.shape[0], cfg.seq_len, self.amp_dtype,
                                               self.stepper.graphs, self.say)

    def build_step(self, optimizer_state: dict | None, state) -> None:
        """The training step (captured and checked when the run has graphs) and its optimizer."""
        window = next(iter(tbptt_windows(self.train_data, self.cfg.seq_len, start=self.step)))
        self.stepper, self.optimizer, _ = build_train_step(
            self.model, self.cfg, device=self.device, world=self.world, amp_dtype=self.amp_dtype, scaler=self.scaler,
            first_window=window, state=state, optimizer_state=optimizer_state, say=self.say)

    # -- the loop ----------------------------------------------------------------------------------

    def train(self) -> TrainResult:
        cfg = self.cfg
        self.pace = Pace(self.clock, self.global_step, self.total_steps, cfg.batch_size * cfg.seq_len,
                         show=self.world.is_main)
        if reason := nothing_to_train(self.epoch, cfg.epochs, self.global_step, cfg.max_steps):  # folder untouched
            self.say(reason)
            return self.result
        with StopFlag() as stop:
            while self.epoch < cfg.epochs:
                self.start_epoch()
                for inputs, targets in tbptt_windows(self.train_data, cfg.seq_len, start=self.step):
                    if cfg.max_steps is not None and self.global_step >= cfg.max_steps or stop.agreed:
                        break
                    self.train_step(inputs, targets)  # forward, backward, clip, update
                    self.stepper.detach_state()  # the next window starts from these (h, c) as values
                    if self.global_step == self.pace.start_step + 1:
                        self.say(self.pace.first_step(cfg.log_interval))
                    if self.step % cfg.log_interval == 0 or self.step == self.steps_per_epoch:
                        self.log_train(stop)
                    if cfg.eval_interval and self.global_step % cfg.eval_interval == 0:
                        self.validate_interim()
                self.pace.end_epoch()
                if self.step < self.steps_per_epoch:  # stopped early: --max-steps, Ctrl-C or SIGTERM
                    self.save_where_stopped(stop)
                    break
                self.end_epoch()
        self.result.global_step, self.result.train_seconds = self.global_step, self.pace.training_seconds()
        self.say(self.pace.summary(self.global_step, self.validations, self.result.train_seconds))
        if self.epoch >= cfg.epochs and not self.result.interrupted:
            self.test()
        return self.result

    def save_where_stopped(self, stop: StopFlag) -> None:
        """Mid-epoch: checkpoint.pt with the carried state, so that --resume goes on exactly here."""
        self.refuse_to_save_divergence(with_loss=True)
        self.save(self.state_dict(self.stepper.state), CHECKPOINT)
        self.result.interrupted = stop.requested
        if stop.requested:
            self.say(f"Stopped at epoch {self.epoch + 1}, step {self.step}/{self.steps_per_epoch}; saved "
                     f"{self.run_dir / CHECKPOINT}. Continue with: python -m fastlm.train --resume {self.run_dir}")

    def start_epoch(self) -> None:
        self.stepper.reset_state(self.carried if self.step > 0 else None)  # zeros, or the resumed state
        self.fed_back = self.carried_prediction if self.step > 0 else None  # an epoch starts from the true word
        self.pace.start_epoch(self.epoch, self.step, self.steps_per_epoch)

    def train_step(self, inputs: torch.Tensor, targets: torch.Tensor) -> None:
        cfg = self.cfg
        p_true = teacher_forcing_probability(cfg.teacher_forcing, cfg.teacher_forcing_schedule,
                                             self.global_step / self.planned_steps)
        if p_true >= 1.0:
            self.stepper.step(inputs, targets)
            self.fed_back = None  # the captured step returns no prediction: the next window starts from the truth
        else:  # the words fed chosen step by step, eagerly, in fp32
            loss, state, self.fed_back = free_running_step(self.model, self.optimizer, inputs, targets,
                                                           self.stepper.state, cfg.clip, p_true,
                                                           cfg.free_running_token, self.fed_back)
            self.stepper.record(loss, state)
        self.teacher_forcing = p_true
        self.step, self.global_step = self.step + 1, self.global_step + 1
        self.pace.step_taken()

    def log_train(self, stop: StopFlag) -> None:
        distributed.sum_(self.stepper.loss_sum)  # each rank's mean over its rows: average them
        loss_sum = self.stepper.take_loss_sum()  # the loop's one sync: the steps are done before the clock reads
        steps, seconds_per_step, tokens_per_s = self.pace.lap()
        mean_loss = loss_sum / steps / self.world.size
        stop.agree(self.world)
        if not math.isfinite(mean_loss):
            raise DivergedError(f"the training loss became {mean_loss} by step {self.global_step}; stopped without "
                                f"saving: {self.folder.kept()} (try a lower --lr)")
        partial = f" (mean of {steps} steps)" if steps != self.cfg.log_interval else ""  # a resume, an epoch's end
        eta = self.pace.eta(self.global_step, seconds_per_step)
        self.say(f"Epoch [{self.epoch + 1}/{self.cfg.epochs}], Step[{self.step}/{self.steps_per_epoch}], "
                 f"Loss: {mean_loss:.4f}{partial}, Perplexity: {perplexity(mean_loss):5.2f}, {seconds_per_step:.3f} "
                 f"s/step, step {self.global_step}/{self.total_steps}, ETA {eta}")
        self.record(split="train", epoch=self.epoch + 1, step=self.step, global_step=self.global_step, steps=steps,
                    loss=mean_loss, ppl=perplexity(mean_loss), tokens_per_s=tokens_per_s,
                    time=self.pace.training_seconds(), teacher_forcing=self.teacher_forcing,
                    lr=self.optimizer.param_groups[0]["lr"])
        self.result.train_losses.append(mean_loss)

    def validate_interim(self) -> None:
        loss = self.validate(self.interim_valid)
        self.record(split="valid", epoch=self.epoch + 1, step=self.step, global_step=self.global_step, loss=loss,
                    ppl=perplexity(loss), tokens=self.interim_valid.numel(), time=self.pace.training_seconds())

    def end_epoch(self) -> None:
        valid_loss = self.validate(self.valid_data)
        if not math.isfinite(valid_loss):
            raise DivergedError(f"the validation loss is {valid_loss} after epoch {self.epoch + 1}; stopped without "
                                f"saving: {self.folder.kept()} (try a lower --lr)")
        self.refuse_to_save_divergence()
        self.epoch, self.step = self.epoch + 1, 0
        self.result.valid_ppl = perplexity(valid_loss)
        self.say(f"Epoch [{self.epoch}/{self.cfg.epochs}] validation perplexity: {self.result.valid_ppl:.2f}")
        self.record(split="valid", epoch=self.epoch, global_step=self.global_step, loss=valid_loss,
                    ppl=self.result.valid_ppl, time=self.pace.training_seconds())
        if valid_loss < self.best_valid:
            self.best_valid = valid_loss
            self.save(self.state_dict(None), BEST)
        elif self.cfg.lr_decay != 1:
            self.anneal()
        self.save(self.state_dict(None), CHECKPOINT)

    def anneal(self) -> None:
        """Divide the learning rate by --lr-decay (validation did not improve); a captured step holds
        the old rate, so it is captured again."""
        for group in self.optimizer.param_groups:
            group["lr"] /= self.cfg.lr_decay
        self.say(f"Validation did not improve: learning rate now {self.optimizer.param_groups[0]['lr']:.4g}")
        if self.stepper.graph is not None:  # captured again, from the state it carries
            self.build_step(self.optimizer.state_dict(), self.stepper.state)

    def test(self) -> None:
        """Test perplexity of the last weights, then of the best-by-validation ones."""
        self.result.test_ppl = perplexity(self.validate(self.test_data))
        self.say(f"Test perplexity (last weights, {self.run_dir / CHECKPOINT}): {self.result.test_ppl:.2f}")
        self.record(split="test", weights="last", global_step=self.global_step, ppl=self.result.test_ppl)
        best = distributed.from_rank0(lambda: load_checkpoint(self.run_dir / BEST)["model"]
                                      if (self.run_dir / BEST).is_file() else None)  # rank 0's file
        if best is not None:
            self.model.load_state_dict(best)
            self.result.best_test_ppl = perplexity(self.validate(self.test_data))
            self.say(f"Test perplexity (best validation, {self.run_dir / BEST}): {self.result.best_test_ppl:.2f}")
            self.record(split="test", weights="best", global_step=self.global_step, ppl=self.result.best_test_ppl)
        else:  # resumed into a new --out whose validation never beat the run's best: best.pt stayed behind
            self.say(f"No test of the best weights: validation never improved on the run's best in {self.run_dir}")

    # -- what the loop's steps share ---------------------------------------------------------------

    def validate(self, data: torch.Tensor) -> float:
        self.validations += 1
        return evaluate(self.model, data, self.cfg.seq_len, amp_dtype=self.amp_dtype, forward=self.eval_forward)

    def record(self, **fields_) -> None:
        """Append one record to metrics.jsonl (rank 0 only)."""
        if self.world.is_main:
            self.folder.append(fields_)

    def save(self, checkpoint: dict, name: str) -> None:
        with self.pace.not_counted():
            self.folder.save(checkpoint, name, self.global_step, write=self.world.is_main)  # rank 0 writes

    def refuse_to_save_divergence(self, with_loss: bool = False) -> None:
        """Never write a non-finite model: checked before every save, mid-interval with the loss summed
        since the last log point too (a divergence between log points)."""
        if not self.stepper.finite(with_loss):
            raise DivergedError(f"the training diverged by step {self.global_step} (non-finite loss or weights); "
                                f"stopped without saving: {self.folder.kept()} (try a lower --lr)")

    def state_dict(self, carried: tuple[torch.Tensor, torch.Tensor] | None) -> dict:
        """The checkpoint at the current position, `carried` being the (h, c) a mid-epoch position
        continues from (every rank's rows, gathered)."""
        rows = lambda t, dim=1: distributed.gather_rows(t.detach(), dim).cpu()  # noqa: E731 (every rank's rows)
        return run_checkpoint(
            model=self.model, optimizer=self.optimizer, config=asdict(self.cfg), data=self.data_fingerprint,
            vocab=list(self.corpus.dictionary.idx2word), epoch=self.epoch, step=self.step,
            global_step=self.global_step, best_valid_loss=self.best_valid, scaler=self.scaler,
            state=None if carried is None else tuple(map(rows, carried)),
            fed_back=None if carried is None or self.fed_back is None else rows(self.fed_back, 0))

    def load_state_dict(self, ckpt: dict) -> None:
        """The run's position from a checkpoint (the model and optimizer are loaded where they are built)."""
        if self.scaler is not None and ckpt.get("scaler"):  # absent in checkpoints of runs without float16
            self.scaler.load_state_dict(ckpt["scaler"])
        self.epoch, self.step, self.global_step = ckpt["epoch"], ckpt["step"], ckpt["global_step"]
        self.best_valid = ckpt["best_valid_loss"]
        if ckpt["state"] is not None:  # all rows of the global batch: take this rank's
            self.carried = tuple(s[:, self.rows].to(self.device) for s in ckpt["state"])
        if ckpt.get("fed_back") is not None:  # absent in checkpoints of runs without scheduled sampling
            self.carried_prediction = ckpt["fed_back"][self.rows].to(self.device)
        set_rng_state(ckpt["rng"])
