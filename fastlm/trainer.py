"""Training with truncated backpropagation through time (TBPTT), in one loop you can read top to bottom.

Each epoch walks the batchified training stream in windows of `seq_len` tokens. The hidden state is
carried from one window to the next and detached in between, so gradients stop at the window edge
while the state keeps its memory. The loss is summed on the device and read only at log points.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from fastlm import distributed
from fastlm.allocator import retain_freed_memory
from fastlm.checkpoint import BEST, CHECKPOINT, checkpoint_path, load_checkpoint, save_checkpoint
from fastlm.config import (DEFAULT_DATA, TrainConfig, TrainingError, amp_dtype_for, check_config, cpu_multiplies_bf16,
                           pick_device, resume_config, use_device)
from fastlm.data import PTB_URL, Corpus, Dictionary, batchify, ensure_ptb, eval_windows, num_windows, tbptt_windows
from fastlm.graphs import GraphAPI, GraphedForward, GraphedStep, autocast, graph_api
from fastlm.lstm import resolve_backend
from fastlm.model import RNNLM
from fastlm.optimizer import make_optimizer
from fastlm.run import StopFlag, new_run_dir, rng_state, set_rng_state
from fastlm.scheduled_sampling import free_running_step, teacher_forcing_probability


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
    elif cfg.teacher_forcing < 1 or cfg.teacher_forcing_schedule != "constant":
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
        problem = f"the capture failed ({(str(err).splitlines() or [type(err).__name__])[0]})"
    if problem is None:
        return stepper, optimizer
    optimizer = make_optimizer(model, cfg.lr, capturable=False, state=optimizer.state_dict())
    backend = resolve_backend(cfg.backend, device, amp_dtype, graphed=False)
    switched = f", LSTM backend {backend}" if backend != model.lstm.backend else ""
    model.lstm.backend = backend
    say(f"CUDA graphs off: {problem}; training eagerly from the same weights{switched}")
    return GraphedStep(net, optimizer, batch_size, cfg.seq_len, cfg.clip, amp_dtype), optimizer


def perplexity(loss: float) -> float:
    return math.exp(loss) if loss < 700 else math.inf


def train(cfg: TrainConfig, resume: str | None = None, overrides: dict | None = None) -> TrainResult:
    """Train (or resume) a run; returns what it measured. Raises TrainingError/DataError on bad input.

    Under torchrun the ranks train one model together (see fastlm/distributed.py).
    """
    ckpt = None
    if resume is not None:
        ckpt = load_checkpoint(resume)
        overrides = {"out": str(checkpoint_path(resume).parent), **(overrides or {})}
        cfg = resume_config(ckpt["config"], overrides)
    check_config(cfg)
    device = pick_device(cfg.device)
    world = distributed.join(cuda=device.type == "cuda")
    try:
        return _train(cfg, ckpt, device, world)
    finally:
        distributed.leave(world)


def _train(cfg: TrainConfig, ckpt: dict | None, device: torch.device, world: distributed.World) -> TrainResult:
    if world.enabled and device.type == "cuda":
        device = torch.device("cuda", world.local_rank)
    use_device(device)
    run_dir = Path(cfg.out) if cfg.out else new_run_dir()
    if world.enabled and cfg.out is None:
        raise TrainingError("under torchrun pass --out (every rank must agree on the run folder)")
    if world.enabled and cfg.teacher_forcing < 1:
        raise TrainingError("scheduled sampling runs step by step and is not supported under torchrun yet: "
                            "train it in one process")
    say = tqdm.write if world.is_main else (lambda *args: None)

    # -- data ------------------------------------------------------------------------------------
    if Path(cfg.data) == Path(DEFAULT_DATA):
        ensure_ptb(cfg.data, PTB_URL)
    dictionary = Dictionary(ckpt["vocab"]) if ckpt else None
    corpus = Corpus(cfg.data, dictionary)
    # Each rank owns a contiguous block of the global batch's rows (all rows in one process).
    rows = world.rows(cfg.batch_size)
    eval_rows = world.rows(cfg.eval_batch_size, "--eval-batch-size")
    train_data = batchify(corpus.train, cfg.batch_size)[rows].to(device)
    valid_data = batchify(corpus.valid, cfg.eval_batch_size)[eval_rows].to(device)
    test_data = batchify(corpus.test, cfg.eval_batch_size)[eval_rows].to(device)
    tbptt_windows(train_data, cfg.seq_len)  # rejects a seq_len too long for the data, before any work
    steps_per_epoch = num_windows(train_data, cfg.seq_len)
    planned_steps = cfg.teacher_forcing_steps or max(1, cfg.epochs * steps_per_epoch)  # the schedule's horizon
    interim_valid = valid_data
    if cfg.eval_tokens:
        interim_valid = valid_data[:, : max(2, cfg.eval_tokens // cfg.eval_batch_size)]
    local_batch = train_data.shape[0]

    # -- model and optimizer ---------------------------------------------------------------------
    torch.manual_seed(cfg.seed)
    vocab_size = len(corpus.dictionary)
    amp_dtype = amp_dtype_for(cfg.amp, device)
    scaler = torch.amp.GradScaler(device.type) if amp_dtype == torch.float16 else None
    graphs = _graphs_for(cfg, device, world, scaler, say)
    backend = resolve_backend(cfg.backend, device, amp_dtype, graphed=graphs is not None)
    model = RNNLM(vocab_size, cfg.embed_size, cfg.hidden_size, cfg.num_layers, backend=backend).to(device)
    if device.type == "cpu":
        retain_freed_memory()  # no page faults on freshly mapped tensors every step
        if cfg.amp == "auto" and cpu_multiplies_bf16():
            say("this CPU has AMX bfloat16 units: --amp bf16 may train faster (output layer in bf16, LSTM in fp32)")
    epoch, step, global_step, best_valid = 0, 0, 0, math.inf
    state = None
    if ckpt:
        model.load_state_dict(ckpt["model"])
    optimizer = make_optimizer(model, cfg.lr, capturable=graphs is not None, state=ckpt and ckpt["optimizer"])
    if ckpt:
        if scaler is not None and ckpt.get("scaler"):  # absent in checkpoints of runs without float16
            scaler.load_state_dict(ckpt["scaler"])
        epoch, step, global_step = ckpt["epoch"], ckpt["step"], ckpt["global_step"]
        best_valid = ckpt["best_valid_loss"]
        if ckpt["state"] is not None:  # all rows of the global batch: take this rank's
            state = tuple(s[:, rows].to(device) for s in ckpt["state"])
        set_rng_state(ckpt["rng"])

    def checkpoint(position_epoch: int, position_step: int, carried) -> dict:
        return {
            "format": 1,
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "config": asdict(cfg),
            "vocab": list(corpus.dictionary.idx2word),
            "epoch": position_epoch,
            "step": position_step,
            "global_step": global_step,
            "state": None if carried is None else tuple(distributed.gather_rows(s.detach()).cpu() for s in carried),
            "rng": rng_state(),
            "scaler": None if scaler is None else scaler.state_dict(),  # float16's loss scale and growth count
            "best_valid_loss": best_valid,
        }

    if world.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
    metrics_path = run_dir / "metrics.jsonl"

    saving_seconds = 0.0  # kept out of the training time: disk speed is not training speed

    def save(obj: dict, path: Path) -> None:
        nonlocal saving_seconds
        started = time.perf_counter()
        if world.is_main:
            save_checkpoint(obj, path)
        saving_seconds += time.perf_counter() - started

    def training_seconds() -> float:
        return time.perf_counter() - start_time - saving_seconds

    def record(**fields_) -> None:
        if not world.is_main:
            return
        with open(metrics_path, "a") as metrics:
            metrics.write(json.dumps(fields_) + "\n")

    net = model
    if world.enabled:
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda"
                                                        else None)
    say(
        f"fastlm: {vocab_size} words, {steps_per_epoch} steps/epoch, device {device}, "
        f"{f'{world.size} ranks of {local_batch} rows, ' if world.enabled else ''}"
        f"LSTM backend {backend}, {'CUDA graphs' if graphs else 'eager steps'}, run folder {run_dir}"
    )
    if graphs is None:
        stepper = GraphedStep(net, optimizer, local_batch, cfg.seq_len, cfg.clip, amp_dtype, None, scaler)
    else:
        first_window = next(iter(tbptt_windows(train_data, cfg.seq_len, start=step)))
        stepper, optimizer = _captured_step(net, model, optimizer, cfg, device, local_batch, amp_dtype, graphs,
                                            first_window, state if step > 0 else None, say)
        if stepper.graph is None:
            graphs = None
    # Validation and test batches have the same shape: one forward, captured once, serves them all.
    eval_forward = None
    if graphs is not None:
        try:
            eval_forward = GraphedForward(model, valid_data.shape[0], cfg.seq_len, amp_dtype, graphs)
        except RuntimeError as err:
            say(f"CUDA graph capture of validation failed ({str(err).splitlines()[0]}): validating eagerly")
    if eval_forward is None:
        eval_forward = GraphedForward(model, valid_data.shape[0], cfg.seq_len, amp_dtype)
    validations = 0

    def validate(data: torch.Tensor) -> float:
        nonlocal validations
        validations += 1
        return evaluate(model, data, cfg.seq_len, amp_dtype=amp_dtype, forward=eval_forward)

    result = TrainResult(run_dir, global_step, [], None, None, None)
    tokens_per_step = cfg.batch_size * cfg.seq_len
    start_time, start_step = time.perf_counter(), global_step

    # -- the loop --------------------------------------------------------------------------------
    with StopFlag() as stop:
        while epoch < cfg.epochs:
            stepper.reset_state(state if step > 0 else None)  # zeros at an epoch start, else the resumed state
            steps_since_log, last_log_time = 0, time.perf_counter()
            bar = tqdm(total=steps_per_epoch, initial=step, desc=f"epoch {epoch + 1}", unit="step",
                       disable=None if world.is_main else True)
            for inputs, targets in tbptt_windows(train_data, cfg.seq_len, start=step):
                if cfg.max_steps is not None and global_step >= cfg.max_steps or stop.agreed:
                    break
                p_true = teacher_forcing_probability(cfg.teacher_forcing, cfg.teacher_forcing_schedule,
                                                     global_step / planned_steps)
                if p_true >= 1.0:
                    stepper.step(inputs, targets)
                else:  # step by step, eagerly, in fp32
                    stepper.record(*free_running_step(model, optimizer, inputs, targets, stepper.state, cfg.clip,
                                                      p_true, cfg.free_running_token))
                step, global_step = step + 1, global_step + 1
                steps_since_log += 1
                bar.update()

                if step % cfg.log_interval == 0 or step == steps_per_epoch:
                    distributed.sum_(stepper.loss_sum)  # each rank's mean over its rows: average them
                    mean_loss = stepper.take_loss_sum() / steps_since_log / world.size  # the only sync in the loop
                    stop.agree(world)
                    if not math.isfinite(mean_loss):
                        raise DivergedError(
                            f"the training loss became {mean_loss} at step {global_step}; stopped without "
                            f"saving, so {run_dir / CHECKPOINT} keeps the last good state (try a lower --lr)"
                        )
                    now = time.perf_counter()
                    tokens_per_s = steps_since_log * tokens_per_step / (now - last_log_time)
                    say(
                        f"Epoch [{epoch + 1}/{cfg.epochs}], Step[{step}/{steps_per_epoch}], "
                        f"Loss: {mean_loss:.4f}, Perplexity: {perplexity(mean_loss):5.2f}"
                    )
                    bar.set_postfix(tok_s=f"{tokens_per_s:,.0f}")
                    record(split="train", epoch=epoch + 1, step=step, global_step=global_step, loss=mean_loss,
                           ppl=perplexity(mean_loss), tokens_per_s=tokens_per_s, time=training_seconds(),
                           teacher_forcing=p_true)
                    result.train_losses.append(mean_loss)
                    steps_since_log, last_log_time = 0, now
                if cfg.eval_interval and global_step % cfg.eval_interval == 0:
                    interim_loss = validate(interim_valid)
                    record(split="valid", epoch=epoch + 1, step=step, global_step=global_step, loss=interim_loss,
                           ppl=perplexity(interim_loss), tokens=interim_valid.numel(),
                           time=training_seconds())
            bar.close()

            if step < steps_per_epoch:  # stopped early: --max-steps or Ctrl-C
                save(checkpoint(epoch, step, stepper.state), run_dir / CHECKPOINT)
                result.interrupted = stop.requested
                break

            valid_loss = validate(valid_data)
            if not math.isfinite(valid_loss):
                raise DivergedError(f"the validation loss is {valid_loss} after epoch {epoch + 1}; not saved")
            epoch, step = epoch + 1, 0
            result.valid_ppl = perplexity(valid_loss)
            say(f"Epoch [{epoch}/{cfg.epochs}] validation perplexity: {result.valid_ppl:.2f}")
            record(split="valid", epoch=epoch, global_step=global_step, loss=valid_loss, ppl=result.valid_ppl,
                   time=training_seconds())
            if valid_loss < best_valid:
                best_valid = valid_loss
                save(checkpoint(epoch, 0, None), run_dir / BEST)
            save(checkpoint(epoch, 0, None), run_dir / CHECKPOINT)

    result.global_step, result.train_seconds = global_step, training_seconds()
    say(f"Training time: {result.train_seconds:.1f} s for {global_step - start_step} steps and {validations} "
        f"validation passes ({saving_seconds:.1f} s of checkpoint writes not counted)")
    if epoch >= cfg.epochs and not result.interrupted:
        result.test_ppl = perplexity(validate(test_data))
        say(f"Test perplexity (last weights, {run_dir / CHECKPOINT}): {result.test_ppl:.2f}")
        record(split="test", weights="last", global_step=global_step, ppl=result.test_ppl)
        distributed.barrier()  # best.pt is written by rank 0 and read by all
        if (run_dir / BEST).is_file():
            model.load_state_dict(load_checkpoint(run_dir / BEST, device)["model"])
            result.best_test_ppl = perplexity(validate(test_data))
            say(f"Test perplexity (best validation, {run_dir / BEST}): {result.best_test_ppl:.2f}")
            record(split="test", weights="best", global_step=global_step, ppl=result.best_test_ppl)
    return result
