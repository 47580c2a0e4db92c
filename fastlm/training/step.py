"""The training step, and validation's forward, on static buffers: eager, or captured as a CUDA graph.

Everything a step touches lives in buffers allocated once (the window's inputs and targets, the
carried (h, c), the gradients, the optimizer state, a device-side loss sum), so that a graph can
replay it on fixed addresses. One step is

    copy the window into the static inputs → forward, loss, backward, clip, update (one replay)

and then the detach: the window's final (h, c) copied, as values, into the static state the next
window starts from. The loss is summed on the device and read only when the trainer logs.

`build_train_step` chooses graphs or eager for a run, captures, checks the first replay against
eager execution and falls back to eager steps (saying why) when capture or check fails.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from fastlm.config import TrainConfig, scheduled_sampling
from fastlm.device import autocast
from fastlm.errors import first_line
from fastlm.models.lm import RNNLM
from fastlm.models.lstm import resolve_backend
from fastlm.training import distributed
from fastlm.training.graphs import WARMUP_STEPS, GraphAPI, graph_api
from fastlm.training.optimizer import make_optimizer, update
from fastlm.training.snapshot import Snapshot

# How far the first replayed loss may be from an eager forward's (relative), by autocast dtype.
REPLAY_TOLERANCE = {None: 1e-5, torch.bfloat16: 1e-2, torch.float16: 5e-3}


class EvalForward:
    """Validation as a captured forward: loss summed on the device over windows of one shape."""

    def __init__(self, model: RNNLM, batch_size: int, seq_len: int, amp_dtype: torch.dtype | None = None,
                 graphs: GraphAPI | None = None):
        self.model, self.amp_dtype = model, amp_dtype
        device = model.linear.weight.device
        self.device_type = device.type
        self.inputs = torch.zeros(batch_size, seq_len, dtype=torch.long, device=device)
        self.targets = torch.zeros(batch_size, seq_len, dtype=torch.long, device=device)
        self.h, self.c = model.init_state(batch_size, device)
        self.total = torch.zeros((), dtype=torch.float64, device=device)
        self.graph = None
        if graphs is not None:
            was_training = model.training
            model.eval()  # record the forward as validation runs it
            try:
                with graphs.side_stream():
                    for _ in range(WARMUP_STEPS):
                        self._forward()
                self.graph = graphs.capture(self._forward, self._buffers)
            finally:
                model.train(was_training)
        self.reset()

    def _buffers(self) -> dict[str, torch.Tensor]:
        return {"inputs": self.inputs, "targets": self.targets, "h": self.h, "c": self.c, "total": self.total,
                **dict(self.model.named_parameters())}

    @torch.no_grad()
    def _forward(self) -> None:
        with autocast(self.device_type, self.amp_dtype):
            logits, (h, c) = self.model(self.inputs, (self.h, self.c))
            self.total += F.cross_entropy(logits, self.targets.reshape(-1), reduction="sum")
        self.h.copy_(h)  # carried to the next window
        self.c.copy_(c)

    def reset(self) -> None:
        self.zero_state()
        self.total.zero_()

    def zero_state(self) -> None:
        self.h.zero_()
        self.c.zero_()

    def __call__(self, inputs: torch.Tensor, targets: torch.Tensor) -> None:
        self.inputs.copy_(inputs)
        self.targets.copy_(targets)
        if self.graph is not None:
            self.graph.replay()
        else:
            self._forward()


class TrainStep:
    """One teacher-forced TBPTT step on static buffers, replayed as a CUDA graph when captured.

    `graphs` (a `GraphAPI`) captures the step; None runs it eagerly. The optimizer must be
    capturable for a capture. `amp_dtype` turns on autocast; `scaler` (a GradScaler, for float16)
    only runs eagerly, since its inf check reads a flag on the host. `keep_outputs` keeps each
    step's forward, `outputs` = (logits (B·T, V), features (B, T, H)), computed before the update
    (dynamic evaluation scores them).
    """

    def __init__(self, model: RNNLM, optimizer: torch.optim.Optimizer, batch_size: int, seq_len: int,
                 clip: float, amp_dtype: torch.dtype | None = None, graphs: GraphAPI | None = None, scaler=None,
                 keep_outputs: bool = False):
        if graphs is not None and scaler is not None:
            raise ValueError("a GradScaler cannot run inside a CUDA graph: run float16 eagerly")
        self.keep_outputs, self.outputs = keep_outputs, None
        self.model, self.optimizer, self.clip, self.amp_dtype, self.scaler = model, optimizer, clip, amp_dtype, scaler
        lm = getattr(model, "module", model)  # the RNNLM, also inside DistributedDataParallel
        self.device = device = lm.linear.weight.device
        self.device_type = device.type
        self.inputs = torch.zeros(batch_size, seq_len, dtype=torch.long, device=device)
        self.targets = torch.zeros(batch_size, seq_len, dtype=torch.long, device=device)
        self.h, self.c = lm.init_state(batch_size, device)  # the static state each window starts from
        self.new_h, self.new_c = self.h, self.c  # the state a step ends with, until the detach carries it over
        self.awaiting_detach = False  # from a step until `detach_state` (or `reset_state`) settles the next start
        self.loss_sum = torch.zeros((), device=device)
        # A graph reads and writes the gradients it was captured with, so they must stay allocated:
        # zeroed in place. Eagerly, freeing them is cheaper (backward then writes instead of adds).
        self.free_grads = graphs is None
        self.graphs, self.graph = graphs, None
        self._before_capture: Snapshot | None = None
        if graphs is not None:
            self._capture(graphs)

    def _step(self) -> None:
        with autocast(self.device_type, self.amp_dtype):
            if self.keep_outputs:
                logits, (h, c), features = self.model(self.inputs, (self.h, self.c), return_features=True)
                self.outputs = logits.detach(), features.detach()
            else:
                logits, (h, c) = self.model(self.inputs, (self.h, self.c))
            loss = F.cross_entropy(logits, self.targets.reshape(-1))
        update(self.model, self.optimizer, loss, self.clip, self.scaler, free_grads=self.free_grads)
        self.loss_sum += loss.detach()
        self.new_h, self.new_c = h.detach(), c.detach()  # in a graph: its output memory, refilled by each replay

    def _buffers(self) -> dict[str, torch.Tensor]:
        buffers = {"inputs": self.inputs, "targets": self.targets, "h": self.h, "c": self.c,
                   "loss_sum": self.loss_sum}
        for name, p in self.model.named_parameters():
            buffers[name] = p
            if p.grad is not None:
                buffers[f"{name}.grad"] = p.grad
            for key, value in self.optimizer.state.get(p, {}).items():
                if isinstance(value, torch.Tensor):
                    buffers[f"{name}.{key}"] = value
        return buffers

    def _capture(self, graphs: GraphAPI) -> None:
        # The warm-up runs real steps, and a capture may stop halfway: put everything back as it was,
        # so that capturing changes nothing the trainer can see. Optimizer state the warm-up created
        # (Adam's moments and step count) stays, zeroed, as the first real step would have made it.
        if not all(group.get("capturable", True) for group in self.optimizer.param_groups):
            raise ValueError("capturing the step needs an optimizer made with capturable=True "
                             "(its step count must live on the device)")
        before = Snapshot(self)
        try:
            with graphs.side_stream():
                for _ in range(WARMUP_STEPS):
                    self._step()
            self.graph = graphs.capture(self._step, self._buffers)
            self._replayed = self.new_h, self.new_c, self.outputs  # the capture's outputs: each replay rewrites them
        except BaseException:
            before.restore_all(self)  # the eager fallback starts from the same model
            raise
        before.restore_keeping_new_state(self)
        self._before_capture = before
        self._captured_lrs = self._learning_rates()

    def _learning_rates(self) -> list:
        return [group["lr"] for group in self.optimizer.param_groups]

    def check_replay(self, inputs: torch.Tensor, targets: torch.Tensor) -> str | None:
        """The start-up self-check of a captured step: None when capture kept every parameter bit for
        bit and one replay on this window matches eager execution (its loss that of an eager forward,
        its parameter updates those of an eager step, within the dtype's tolerance), else what
        differs. The trial steps are undone; costs one forward and two steps."""
        if self.graph is None:
            return None
        before, self._before_capture = self._before_capture, None
        changed = before.changed_parameters()  # on a GPU: a restore that raced the side stream
        if changed:
            before.restore_keeping_new_state(self)  # so that an eager fallback starts from the right model
            return f"capture changed {len(changed)} parameter(s), first {changed[0]}"
        trial = Snapshot(self)
        lm = getattr(self.model, "module", self.model)
        with torch.no_grad(), autocast(self.device_type, self.amp_dtype):
            logits, _ = lm(inputs, (self.h, self.c))
            expected = F.cross_entropy(logits, targets.reshape(-1)).item()
        trial.restore_rng()  # the replay draws the dropout masks that forward drew
        self.step(inputs, targets)
        replayed, replayed_updates = self.take_loss_sum(), trial.updates()
        trial.restore_keeping_new_state(self)
        self._step()  # the same step, eagerly, from the same values
        eager_updates = trial.updates()
        trial.restore_keeping_new_state(self)
        tolerance = REPLAY_TOLERANCE[self.amp_dtype]
        error = abs(replayed - expected) / max(abs(expected), 1e-30)
        if not error <= tolerance:  # also catches NaN
            return (f"the first replayed loss {replayed:.6g} differs from an eager forward's {expected:.6g} "
                    f"(relative {error:.1e} > {tolerance:.0e})")
        moved = torch.cat([u.flatten().double() for u in replayed_updates])
        eager = torch.cat([u.flatten().double() for u in eager_updates])
        error = ((moved - eager).norm() / eager.norm().clamp_min(1e-30)).item()
        if not error <= tolerance:
            return (f"the first replay updated the parameters differently from an eager step "
                    f"(relative {error:.1e} > {tolerance:.0e})")
        return None

    def reset_state(self, state: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        """Zero the carried state (epoch start), or load one (resume)."""
        self.awaiting_detach = False
        if state is None:
            self.h.zero_()
            self.c.zero_()
        else:
            self.h.copy_(state[0])
            self.c.copy_(state[1])

    def step(self, inputs: torch.Tensor, targets: torch.Tensor) -> None:
        """Forward, loss, backward, clip and update on one window; then call `detach_state`."""
        if self.awaiting_detach:
            raise RuntimeError("TrainStep.step: call detach_state() after each step (TBPTT carries the state into "
                               "the next window), or reset_state() to start afresh")
        self.awaiting_detach = True
        self.inputs.copy_(inputs, non_blocking=True)
        self.targets.copy_(targets, non_blocking=True)
        if self.graph is not None:
            if self._learning_rates() != self._captured_lrs:  # a graph replays the rate it was captured with
                raise RuntimeError("the learning rate changed since the step was captured: capture it again")
            self.graph.replay()
            self.new_h, self.new_c, self.outputs = self._replayed
        else:
            self._step()

    @torch.no_grad()
    def detach_state(self) -> None:
        """TBPTT's detach: the next window starts from this window's final (h, c) as values, with no
        autograd graph behind them, so its gradients stop at the window edge."""
        self.h.copy_(self.new_h)
        self.c.copy_(self.new_c)
        self.awaiting_detach = False

    def record(self, loss: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor]) -> None:
        """Account for a step taken outside (scheduled sampling): its loss and the state it ended with."""
        self.loss_sum += loss.detach()
        self.new_h, self.new_c = (s.detach() for s in state)
        self.awaiting_detach = True

    @property
    def state(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.h, self.c

    def finite(self, with_loss: bool = False) -> bool:
        """Whether every weight, and with `with_loss` the loss summed since the last read, is finite (one sync)."""
        finite = torch.stack([torch.isfinite(p).all() for p in self.model.parameters()]).all()
        return bool((finite & torch.isfinite(self.loss_sum) if with_loss else finite).item())

    def take_loss_sum(self) -> float:
        """The summed loss since the last call (the one host-device sync), then reset."""
        value = self.loss_sum.item()
        self.loss_sum.zero_()
        return value


def try_capture(make_step: Callable[[], TrainStep], first_window: tuple[torch.Tensor, torch.Tensor],
                state: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[TrainStep | None, str | None]:
    """A captured step from `make_step`, started from `state` and checked on `first_window`: (step, None),
    or (None, why not) when the capture or its check failed (the model and optimizer as they were)."""
    try:
        step = make_step()
        step.reset_state(state)
        problem = step.check_replay(*first_window)
    except Exception as err:  # capture can fail on an unsupported op (or a Triton error); eager is the same math
        return None, f"the capture failed ({first_line(err)})"
    return (step, None) if problem is None else (None, problem)


def _graphs_for(cfg: TrainConfig, device: torch.device, world: distributed.World, scaler, say) -> GraphAPI | None:
    """The CUDA graph mechanism this run captures its step with, or None to run it eagerly."""
    api = graph_api(device)
    if api is None or cfg.cuda_graphs is False:
        return None
    if world.enabled:
        say("CUDA graphs with DistributedDataParallel are not set up yet: running each step eagerly")
    elif scaler is not None:
        say("fp16 needs a gradient scaler whose overflow check reads the host: running eagerly (bf16 can graph)")
    elif scheduled_sampling(cfg):
        say("scheduled sampling runs step by step: running eagerly, without CUDA graphs")
    else:
        return api
    return None


def build_train_step(model: RNNLM, cfg: TrainConfig, *, device: torch.device, world: distributed.World,
                     amp_dtype: torch.dtype | None, scaler: torch.amp.GradScaler | None,
                     first_window: tuple[torch.Tensor, torch.Tensor], state: tuple[torch.Tensor, torch.Tensor] | None,
                     optimizer_state: dict | None, say: Callable[[str], None]
                     ) -> tuple[TrainStep, torch.optim.Optimizer, str]:
    """The run's training step, its optimizer (from `optimizer_state` when given) and LSTM backend.

    With graphs (a CUDA device, or the simulation), the step is captured from the carried `state`
    and checked on `first_window`; when the capture or the check fails it says why in one line and
    falls back to eager steps, with an optimizer that is not capturable and, for --backend auto, the
    backend auto picks for eager steps. Under torchrun the model is wrapped in DistributedDataParallel.
    """
    graphs, batch_size = _graphs_for(cfg, device, world, scaler, say), first_window[0].shape[0]
    model.lstm.backend = resolve_backend(cfg.backend, device, amp_dtype, graphed=graphs is not None)
    net = model
    if world.enabled:
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = make_optimizer(model, cfg.lr, capturable=graphs is not None, state=optimizer_state,
                               kind=cfg.optimizer)
    if graphs is None:
        return TrainStep(net, optimizer, batch_size, cfg.seq_len, cfg.clip, amp_dtype, None, scaler), optimizer, \
            model.lstm.backend
    step, problem = try_capture(lambda: TrainStep(net, optimizer, batch_size, cfg.seq_len, cfg.clip, amp_dtype, graphs),
                                first_window, state)
    if step is not None:
        return step, optimizer, model.lstm.backend
    optimizer = make_optimizer(model, cfg.lr, capturable=False, state=optimizer.state_dict(), kind=cfg.optimizer)
    backend = resolve_backend(cfg.backend, device, amp_dtype, graphed=False)
    switched = f", LSTM backend {backend}" if backend != model.lstm.backend else ""
    model.lstm.backend = backend
    say(f"CUDA graphs off: {problem}; training eagerly from the same weights{switched}")
    return TrainStep(net, optimizer, batch_size, cfg.seq_len, cfg.clip, amp_dtype), optimizer, backend


def build_eval_forward(model: RNNLM, batch_size: int, seq_len: int, amp_dtype: torch.dtype | None,
                       graphs: GraphAPI | None, say: Callable[[str], None]) -> EvalForward:
    """Validation's forward, captured when the training step is (validation and test batches have one
    shape, so one capture serves them all); eager when capture fails, saying so."""
    if graphs is not None:
        try:
            return EvalForward(model, batch_size, seq_len, amp_dtype, graphs)
        except Exception as err:  # noqa: BLE001 (validation eagerly is the same math)
            say(f"CUDA graph capture of validation failed ({first_line(err)}): validating eagerly")
    return EvalForward(model, batch_size, seq_len, amp_dtype)
