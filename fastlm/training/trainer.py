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
import torch.nn.functional as F
from tqdm import tqdm

from fastlm.training import distributed
from fastlm.allocator import retain_freed_memory
from fastlm.checkpoint import (BEST, CHECKPOINT, FOR_RESUME, FORMAT, CheckpointError, check_finite_weights,
                               checkpoint_path, first_line, load_checkpoint, save_checkpoint)
from fastlm.config import (DEFAULT_DATA, TrainConfig, TrainingError, amp_dtype_for, check_config,
                           check_cpu_can_multiply, check_fits, cpu_multiplies_bf16, pick_device, resume_config,
                           scheduled_sampling, use_device)
from fastlm.data import (PTB_URL, Corpus, Dictionary, batchify, batchify_for_eval, ensure_ptb, eval_windows,
                         num_windows, tbptt_windows)
from fastlm.training.graphs import GraphAPI, GraphedForward, GraphedStep, autocast, graph_api
from fastlm.models.lstm import resolve_backend
from fastlm.models.lm import RNNLM, load_weights
from fastlm.training.optimizer import make_optimizer
from fastlm.training.rundir import RunFolder, StopFlag, new_run_dir, rng_state, set_rng_state
from fastlm.training.scheduled_sampling import free_running_step, teacher_forcing_probability


class DivergedError(TrainingError):
    """The loss became non-finite; the last good checkpoint is kept."""


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


@torch.no_grad()
def evaluate(model: RNNLM, data: torch.Tensor, seq_len: int, amp_dtype: torch.dtype | None = None,
             forward: GraphedForward | None = None) -> float:
    """Mean cross-entropy per token over a batchified split, the state carried across windows.

    The full-length windows run through one `GraphedForward`: `forward`, one built for `data`'s
    batch size and reused across calls (the trainer captures one as a CUDA graph for the whole run),
    or else an eager one made for this call. A shorter last window runs eagerly from the state they
    leave.
    """
    if forward is not None and forward.inputs.shape != (data.shape[0], seq_len):
        raise ValueError(f"evaluate: the forward is built for windows {tuple(forward.inputs.shape)}, "
                         f"the data gives ({data.shape[0]}, {seq_len})")
    was_training = model.training
    model.eval()
    windows = list(eval_windows(data, seq_len))
    full = [w for w in windows if w[0].shape[1] == seq_len]
    if forward is None:
        forward = GraphedForward(model, data.shape[0], seq_len, amp_dtype)
    forward.reset()
    for inputs, targets in full:
        forward(inputs, targets)
    total, state = forward.total, (forward.h, forward.c)
    for inputs, targets in windows[len(full):]:
        with autocast(data.device.type, amp_dtype):
            logits, state = model(inputs, state)
            total += F.cross_entropy(logits, targets.reshape(-1), reduction="sum")
    model.train(was_training)
    count = torch.tensor(float(sum(t.numel() for _, t in windows)), dtype=torch.float64, device=data.device)
    distributed.sum_(total)  # under torchrun each rank scored its own rows
    distributed.sum_(count)
    return total.item() / max(count.item(), 1.0)


def _graphs_for(cfg: TrainConfig, device: torch.device, world: distributed.World, scaler, say) -> GraphAPI | None:
    """The CUDA graph mechanism this run captures its step with, or None to run it eagerly."""
    api = graph_api(device)
    wanted = cfg.cuda_graphs if cfg.cuda_graphs is not None else api is not None
    if not wanted:
        return None
    if api is None:
        raise TrainingError("--cuda-graphs needs a CUDA device: use --no-cuda-graphs on the CPU")
    if world.enabled:
        say("CUDA graphs with DistributedDataParallel are not set up yet: running each step eagerly")
    elif scaler is not None:
        say("fp16 needs a gradient scaler whose overflow check reads the host: running eagerly (bf16 can graph)")
    elif scheduled_sampling(cfg):
        say("scheduled sampling runs step by step: running eagerly, without CUDA graphs")
    else:
        return api
    return None


def _captured_step(net, model: RNNLM, optimizer, cfg: TrainConfig, device: torch.device, batch_size: int,
                   amp_dtype, graphs: GraphAPI, first_window, state, say) -> tuple[GraphedStep, torch.optim.Adam]:
    """The step captured as a graph and checked on the first window. When the capture or the check
    fails, says why in one line and returns the eager step instead, with a new optimizer that is not
    capturable and, for --backend auto, the backend auto picks for eager steps."""
    try:
        stepper = GraphedStep(net, optimizer, batch_size, cfg.seq_len, cfg.clip, amp_dtype, graphs)
        stepper.reset_state(state)
        problem = stepper.check_replay(*first_window)
    except Exception as err:  # capture can fail on an unsupported op (or a Triton error); eager is the same math
        problem = f"the capture failed ({first_line(err)})"
    if problem is None:
        return stepper, optimizer
    optimizer = make_optimizer(model, cfg.lr, capturable=False, state=optimizer.state_dict(), kind=cfg.optimizer)
    backend = resolve_backend(cfg.backend, device, amp_dtype, graphed=False)
    switched = f", LSTM backend {backend}" if backend != model.lstm.backend else ""
    model.lstm.backend = backend
    say(f"CUDA graphs off: {problem}; training eagerly from the same weights{switched}")
    return GraphedStep(net, optimizer, batch_size, cfg.seq_len, cfg.clip, amp_dtype), optimizer


def perplexity(loss: float) -> float:
    return math.exp(loss) if loss < 700 else math.inf


def train(cfg: TrainConfig, resume: str | None = None, overrides: dict | None = None,
          clock: Callable[[], float] = time.perf_counter) -> TrainResult:
    """Train (or resume) a run; returns what it measured. Raises TrainingError/DataError on bad input.

    Under torchrun the ranks train one model together (see fastlm/training/distributed.py). `clock` times
    training (tests pass a fake one).
    """
    ckpt, source = None, None
    if resume is not None:
        source = checkpoint_path(resume)
        ckpt = load_checkpoint(source, needs=FOR_RESUME)
        check_finite_weights(ckpt, source)
        overrides = {"out": str(source.parent), **(overrides or {})}
        cfg = resume_config(ckpt["config"], overrides)
    check_config(cfg)
    device = pick_device(cfg.device)
    world = distributed.join(cuda=device.type == "cuda")
    try:
        if world.enabled and device.type == "cuda":
            device = torch.device("cuda", world.local_rank)
        use_device(device)
        if world.enabled and cfg.out is None:
            raise TrainingError("under torchrun pass --out (every rank must agree on the run folder)")
        folder = RunFolder(Path(cfg.out) if cfg.out else new_run_dir())
        in_place = source is not None and folder.path.resolve() == source.parent.resolve()
        if in_place and source.name != CHECKPOINT:
            _refuse_rolling_back(folder.path, source, ckpt)
        problem, existed = None, folder.path.exists()
        if world.is_main:  # rank 0 owns the folder; every rank learns whether it may go on
            try:
                folder.open(fresh=not in_place)
            except TrainingError as err:
                problem = err
        refused = torch.tensor([float(problem is not None)], device=distributed.collective_device())
        if distributed.sum_(refused).item():
            raise problem or TrainingError(f"rank 0 could not use {folder.path} as the run folder (it says why)")
        try:
            if in_place and world.is_main:
                folder.keep_records_up_to(ckpt["global_step"])  # a crash after them: the resumed run repeats them
            return Run(cfg, ckpt, device, world, clock, folder, saved_step=ckpt["global_step"] if in_place else None
                       ).train()
        finally:
            folder.close()
            if not existed and world.is_main:
                folder.remove_if_unused()  # bad input stopped the run before it wrote anything
    finally:
        distributed.leave(world)


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


class Run:
    """One training run: its data, model and steps, where it stands (epoch, step, best validation
    loss), and the named steps of its loop. `state_dict()` is the checkpoint that resumes it exactly."""

    def __init__(self, cfg: TrainConfig, ckpt: dict | None, device: torch.device, world: distributed.World,
                 clock: Callable[[], float], folder: RunFolder, saved_step: int | None = None):
        if world.enabled and scheduled_sampling(cfg):
            raise TrainingError("scheduled sampling runs step by step and is not supported under torchrun yet: "
                                "train it in one process")
        if world.enabled and (cfg.dropout or cfg.weight_drop):
            raise TrainingError("dropout and weight drop are not supported under torchrun yet (every rank would draw "
                                "the same masks for its rows): train them in one process")
        self.cfg, self.device, self.world, self.clock = cfg, device, world, clock
        self.folder, self.run_dir = folder, folder.path
        self.saved_step = saved_step  # the global step checkpoint.pt holds, None while there is none
        self.say = tqdm.write if world.is_main else (lambda *args: None)
        self.epoch, self.step, self.global_step, self.best_valid = 0, 0, 0, math.inf
        self.carried = None  # the resumed (h, c), this rank's rows
        self.carried_prediction = None  # scheduled sampling's resumed last prediction, this rank's rows
        self.fed_back = None  # the last window's prediction, a candidate for the next window's first input
        self.saving_seconds, self.validations = 0.0, 0  # checkpoint writes are not training time
        self._load_data(ckpt)
        self._build_model(ckpt)
        self._build_steps()
        self.result = TrainResult(self.run_dir, self.global_step, [], None, None, None)

    def _load_data(self, ckpt: dict | None) -> None:
        cfg, world = self.cfg, self.world
        if Path(cfg.data) == Path(DEFAULT_DATA):
            ensure_ptb(cfg.data, PTB_URL)
        self.corpus = Corpus(cfg.data, Dictionary(ckpt["vocab"]) if ckpt else None, cfg.vocab_size)
        # Each rank owns a contiguous block of the global batch's rows (all rows in one process).
        self.rows = world.rows(cfg.batch_size)
        eval_rows = world.rows(cfg.eval_batch_size, "--eval-batch-size")
        self.train_data = batchify(self.corpus.train, cfg.batch_size)[self.rows].to(self.device)
        self.valid_data = batchify_for_eval(self.corpus.valid, cfg.eval_batch_size, "valid")[eval_rows].to(self.device)
        self.test_data = batchify_for_eval(self.corpus.test, cfg.eval_batch_size, "test")[eval_rows].to(self.device)
        tbptt_windows(self.train_data, cfg.seq_len)  # rejects a seq_len too long for the data, before any work
        self.steps_per_epoch = num_windows(self.train_data, cfg.seq_len)
        self.planned_steps = cfg.teacher_forcing_steps or max(1, cfg.epochs * self.steps_per_epoch)
        self.interim_valid = self.valid_data
        if cfg.eval_tokens:
            self.interim_valid = self.valid_data[:, : max(2, cfg.eval_tokens // cfg.eval_batch_size)]

    def _build_model(self, ckpt: dict | None) -> None:
        cfg, device = self.cfg, self.device
        torch.manual_seed(cfg.seed)
        self.amp_dtype = amp_dtype_for(cfg.amp, device)
        self.scaler = torch.amp.GradScaler(device.type) if self.amp_dtype == torch.float16 else None
        check_fits(cfg, len(self.corpus.dictionary), device)
        self.graphs = _graphs_for(cfg, device, self.world, self.scaler, self.say)
        backend = resolve_backend(cfg.backend, device, self.amp_dtype, graphed=self.graphs is not None)
        self.model = RNNLM.from_config(asdict(cfg), len(self.corpus.dictionary), backend).to(device)
        if device.type == "cpu":
            check_cpu_can_multiply(self.amp_dtype)
            retain_freed_memory()  # no page faults on freshly mapped tensors every step
            if cfg.amp == "auto" and cpu_multiplies_bf16():
                self.say("this CPU has AMX bfloat16 units: --amp bf16 may train faster (output layer in bf16, "
                         "LSTM in fp32)")
        if ckpt:
            load_weights(self.model, ckpt["model"], "the checkpoint")
        self.optimizer = make_optimizer(self.model, cfg.lr, capturable=self.graphs is not None,
                                        state=ckpt["optimizer"] if ckpt else None, kind=cfg.optimizer)
        if ckpt:
            self.load_state_dict(ckpt)
            self.say(f"Resuming {self.run_dir} at epoch {self.epoch + 1}, step {self.step}/{self.steps_per_epoch} "
                     f"(step {self.global_step} in all)")

    def _build_steps(self) -> None:
        cfg, model = self.cfg, self.model
        self.net = model
        if self.world.enabled:
            self.net = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        local_batch = self.train_data.shape[0]
        self.say(
            f"fastlm: {len(self.corpus.dictionary)} words, {self.steps_per_epoch} steps/epoch, device {self.device}, "
            f"{f'{self.world.size} ranks of {local_batch} rows, ' if self.world.enabled else ''}"
            f"LSTM backend {model.lstm.backend}, {'CUDA graphs' if self.graphs else 'eager steps'}, "
            f"run folder {self.run_dir}"
        )
        self._build_step()
        # Validation and test batches have the same shape: one forward, captured once, serves them all.
        self.eval_forward = None
        if self.graphs is not None:
            try:
                self.eval_forward = GraphedForward(model, self.valid_data.shape[0], cfg.seq_len, self.amp_dtype,
                                                   self.graphs)
            except Exception as err:  # noqa: BLE001 (validation eagerly is the same math)
                self.say(f"CUDA graph capture of validation failed ({first_line(err)}): validating eagerly")
        if self.eval_forward is None:
            self.eval_forward = GraphedForward(model, self.valid_data.shape[0], cfg.seq_len, self.amp_dtype)

    def _build_step(self) -> None:
        """The training step: captured (and checked) when the run has graphs, else eager."""
        cfg, local_batch = self.cfg, self.train_data.shape[0]
        if self.graphs is None:
            self.stepper = GraphedStep(self.net, self.optimizer, local_batch, cfg.seq_len, cfg.clip, self.amp_dtype,
                                       None, self.scaler)
            return
        window = next(iter(tbptt_windows(self.train_data, cfg.seq_len, start=self.step)))
        previous = getattr(self, "stepper", None)  # captured again (a new learning rate): keep its state
        state = previous.state if previous is not None else (self.carried if self.step > 0 else None)
        self.stepper, self.optimizer = _captured_step(
            self.net, self.model, self.optimizer, cfg, self.device, local_batch, self.amp_dtype, self.graphs, window,
            state, self.say)
        if self.stepper.graph is None:
            self.graphs = None

    # -- the loop ----------------------------------------------------------------------------------

    def train(self) -> TrainResult:
        cfg = self.cfg
        self.start_time, self.start_step = self.clock(), self.global_step
        if self.nothing_to_train():
            return self.result
        with StopFlag() as stop:
            while self.epoch < cfg.epochs:
                self.start_epoch()
                for inputs, targets in tbptt_windows(self.train_data, cfg.seq_len, start=self.step):
                    if cfg.max_steps is not None and self.global_step >= cfg.max_steps or stop.agreed:
                        break
                    self.train_step(inputs, targets)
                    if self.global_step == self.start_step + 1:
                        self.say_first_step()
                    if self.step % cfg.log_interval == 0 or self.step == self.steps_per_epoch:
                        self.log_train(stop)
                    if cfg.eval_interval and self.global_step % cfg.eval_interval == 0:
                        self.validate_interim()
                self.bar.close()
                if self.step < self.steps_per_epoch:  # stopped early: --max-steps, Ctrl-C or SIGTERM
                    self.refuse_to_save_divergence(self.stepper.loss_sum)
                    self.save(self.state_dict(self.stepper.state), CHECKPOINT)
                    self.result.interrupted = stop.requested
                    if stop.requested:
                        self.say(f"Stopped at epoch {self.epoch + 1}, step {self.step}/{self.steps_per_epoch}; saved "
                                 f"{self.run_dir / CHECKPOINT}. Continue with: python -m fastlm.train --resume "
                                 f"{self.run_dir}")
                    break
                self.end_epoch()
        self.result.global_step, self.result.train_seconds = self.global_step, self.training_seconds()
        self.say(f"Training time: {self.result.train_seconds:.1f} s for {self.global_step - self.start_step} steps and "
                 f"{self.validations} validation passes ({self.saving_seconds:.1f} s of checkpoint writes not counted)")
        if self.epoch >= cfg.epochs and not self.result.interrupted:
            self.test()
        return self.result

    def nothing_to_train(self) -> bool:
        """A resumed run that has already done what it is asked says so, and leaves its folder alone."""
        cfg = self.cfg
        if self.epoch >= cfg.epochs:
            self.say(f"Nothing to train: the run has finished its {self.epoch} epoch(s); pass --epochs N with N > "
                     f"{self.epoch} to train more")
        elif cfg.max_steps is not None and self.global_step >= cfg.max_steps:
            self.say(f"Nothing to train: the run is at step {self.global_step} and --max-steps is {cfg.max_steps}; "
                     "raise --max-steps (it counts across resumes) to train more")
        else:
            return False
        return True

    def planned_steps_in_total(self) -> int:
        total = self.cfg.epochs * self.steps_per_epoch
        return total if self.cfg.max_steps is None else min(total, self.cfg.max_steps)

    def eta(self, seconds_per_step: float) -> str:
        """Time left for the steps still to come at this pace (validation passes not included)."""
        left = int(max(0, self.planned_steps_in_total() - self.global_step) * seconds_per_step)
        return f"{left // 3600}h{left % 3600 // 60:02d}m" if left >= 3600 else f"{left // 60}m{left % 60:02d}s"

    def say_first_step(self) -> None:
        """A first line at once, not after --log-interval steps: what a step costs, when the run ends."""
        seconds = self.clock() - self.start_time
        self.say(f"First step done in {seconds:.2f} s; at that pace the "
                 f"{self.planned_steps_in_total() - self.start_step} steps of this run take {self.eta(seconds)}, "
                 f"and the first log line comes at step {self.cfg.log_interval}")

    def start_epoch(self) -> None:
        self.stepper.reset_state(self.carried if self.step > 0 else None)  # zeros, or the resumed state
        self.fed_back = self.carried_prediction if self.step > 0 else None  # an epoch starts from the true word
        self.steps_since_log, self.last_log_time = 0, self.clock()
        self.bar = tqdm(total=self.steps_per_epoch, initial=self.step, desc=f"epoch {self.epoch + 1}", unit="step",
                        disable=None if self.world.is_main else True)

    def train_step(self, inputs: torch.Tensor, targets: torch.Tensor) -> None:
        cfg = self.cfg
        p_true = teacher_forcing_probability(cfg.teacher_forcing, cfg.teacher_forcing_schedule,
                                             self.global_step / self.planned_steps)
        if p_true >= 1.0:
            self.stepper.step(inputs, targets)
            self.fed_back = None  # the captured step returns no prediction: the next window starts from the truth
        else:  # step by step, eagerly, in fp32
            loss, state, self.fed_back = free_running_step(self.model, self.optimizer, inputs, targets,
                                                           self.stepper.state, cfg.clip, p_true,
                                                           cfg.free_running_token, self.fed_back)
            self.stepper.record(loss, state)
        self.teacher_forcing = p_true
        self.step, self.global_step = self.step + 1, self.global_step + 1
        self.steps_since_log += 1
        self.bar.update()

    def log_train(self, stop: StopFlag) -> None:
        distributed.sum_(self.stepper.loss_sum)  # each rank's mean over its rows: average them
        mean_loss = self.stepper.take_loss_sum() / self.steps_since_log / self.world.size  # the loop's one sync
        stop.agree(self.world)
        if not math.isfinite(mean_loss):
            raise DivergedError(f"the training loss became {mean_loss} by step {self.global_step}; stopped without "
                                f"saving: {self.kept()} (try a lower --lr)")
        now = self.clock()
        seconds_per_step = (now - self.last_log_time) / self.steps_since_log
        tokens_per_s = self.cfg.batch_size * self.cfg.seq_len / seconds_per_step
        self.say(f"Epoch [{self.epoch + 1}/{self.cfg.epochs}], Step[{self.step}/{self.steps_per_epoch}], "
                 f"Loss: {mean_loss:.4f}, Perplexity: {perplexity(mean_loss):5.2f}, {seconds_per_step:.3f} s/step, "
                 f"step {self.global_step}/{self.planned_steps_in_total()}, ETA {self.eta(seconds_per_step)}")
        self.bar.set_postfix(tok_s=f"{tokens_per_s:,.0f}")
        self.record(split="train", epoch=self.epoch + 1, step=self.step, global_step=self.global_step,
                    loss=mean_loss, ppl=perplexity(mean_loss), tokens_per_s=tokens_per_s,
                    time=self.training_seconds(), teacher_forcing=self.teacher_forcing,
                    lr=self.optimizer.param_groups[0]["lr"])
        self.result.train_losses.append(mean_loss)
        self.steps_since_log, self.last_log_time = 0, now

    def validate_interim(self) -> None:
        loss = self.validate(self.interim_valid)
        self.record(split="valid", epoch=self.epoch + 1, step=self.step, global_step=self.global_step, loss=loss,
                    ppl=perplexity(loss), tokens=self.interim_valid.numel(), time=self.training_seconds())

    def end_epoch(self) -> None:
        valid_loss = self.validate(self.valid_data)
        if not math.isfinite(valid_loss):
            raise DivergedError(f"the validation loss is {valid_loss} after epoch {self.epoch + 1}; stopped without "
                                f"saving: {self.kept()} (try a lower --lr)")
        self.refuse_to_save_divergence()
        self.epoch, self.step = self.epoch + 1, 0
        self.result.valid_ppl = perplexity(valid_loss)
        self.say(f"Epoch [{self.epoch}/{self.cfg.epochs}] validation perplexity: {self.result.valid_ppl:.2f}")
        self.record(split="valid", epoch=self.epoch, global_step=self.global_step, loss=valid_loss,
                    ppl=self.result.valid_ppl, time=self.training_seconds())
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
        if self.stepper.graph is not None:
            self._build_step()

    def test(self) -> None:
        """Test perplexity of the last weights, then of the best-by-validation ones."""
        self.result.test_ppl = perplexity(self.validate(self.test_data))
        self.say(f"Test perplexity (last weights, {self.run_dir / CHECKPOINT}): {self.result.test_ppl:.2f}")
        self.record(split="test", weights="last", global_step=self.global_step, ppl=self.result.test_ppl)
        distributed.barrier()  # best.pt is written by rank 0 and read by all
        if (self.run_dir / BEST).is_file():
            self.model.load_state_dict(load_checkpoint(self.run_dir / BEST, self.device)["model"])
            self.result.best_test_ppl = perplexity(self.validate(self.test_data))
            self.say(f"Test perplexity (best validation, {self.run_dir / BEST}): {self.result.best_test_ppl:.2f}")
            self.record(split="test", weights="best", global_step=self.global_step, ppl=self.result.best_test_ppl)

    # -- what the loop's steps share ---------------------------------------------------------------

    def validate(self, data: torch.Tensor) -> float:
        self.validations += 1
        return evaluate(self.model, data, self.cfg.seq_len, amp_dtype=self.amp_dtype, forward=self.eval_forward)

    def training_seconds(self) -> float:
        return self.clock() - self.start_time - self.saving_seconds

    def record(self, **fields_) -> None:
        """Append one record to metrics.jsonl (rank 0 only)."""
        if self.world.is_main:
            self.folder.append(fields_)

    def save(self, checkpoint: dict, name: str) -> None:
        started = self.clock()
        if self.world.is_main:
            save_checkpoint(checkpoint, self.run_dir / name)
        if name == CHECKPOINT:
            self.saved_step = self.global_step
        self.saving_seconds += self.clock() - started

    def kept(self) -> str:
        """What the run folder holds to go back to, said truthfully."""
        if self.saved_step is None:
            return f"no checkpoint was written to {self.run_dir}"
        return f"{self.run_dir / CHECKPOINT} keeps step {self.saved_step}"

    def refuse_to_save_divergence(self, unlogged_loss: torch.Tensor | None = None) -> None:
        """Never write a non-finite model: the weights, and the loss summed since the last log point
        (a divergence between log points), are checked before every save (one sync)."""
        finite = torch.stack([torch.isfinite(p).all() for p in self.model.parameters()]).all()
        if unlogged_loss is not None:
            finite = finite & torch.isfinite(unlogged_loss)
        if not finite.item():
            raise DivergedError(f"the training diverged by step {self.global_step} (non-finite loss or weights); "
                                f"stopped without saving: {self.kept()} (try a lower --lr)")

    def state_dict(self, carried: tuple[torch.Tensor, torch.Tensor] | None) -> dict:
        """The checkpoint at the current position: everything `load_state_dict` needs to resume
        exactly, `carried` being the (h, c) a mid-epoch position continues from."""
        return {
            "format": FORMAT,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "config": asdict(self.cfg),
            "vocab": list(self.corpus.dictionary.idx2word),
            "epoch": self.epoch,
            "step": self.step,
            "global_step": self.global_step,
            "state": None if carried is None else tuple(distributed.gather_rows(s.detach()).cpu() for s in carried),
            "fed_back": None if carried is None or self.fed_back is None else
            distributed.gather_rows(self.fed_back, dim=0).cpu(),
            "rng": rng_state(),
            "scaler": None if self.scaler is None else self.scaler.state_dict(),  # float16's loss scale
            "best_valid_loss": self.best_valid,
        }

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
