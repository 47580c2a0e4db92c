"""The whole TBPTT training step as one CUDA graph: static buffers, capture, replay.

A CUDA graph replays recorded kernels on fixed addresses, so everything the step touches lives in
buffers allocated once: the window's inputs and targets, the carried (h, c), the gradients, the
optimizer state and a device-side loss sum. One step is then

    copy the window into the static inputs → replay (forward, loss, backward, clip, Adam)
    → copy the new (h, c) into the static state inputs

and that last copy *is* the TBPTT detach: the next replay starts from the values, with no graph
behind them. The loss is summed on the device and read only when the trainer logs.

`GraphedStep(capture=False)` runs the very same step eagerly (CPU, or when capture fails), so its
numerics are tested on the CPU against the plain loop.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from fastlm.model import RNNLM

WARMUP_STEPS = 3  # eager iterations on a side stream before capture, as torch.cuda.graphs documents


def autocast(device_type: str, amp_dtype: torch.dtype | None):
    """Autocast to `amp_dtype`, or a context that changes nothing when it is None."""
    return torch.autocast(device_type, dtype=amp_dtype or torch.bfloat16, enabled=amp_dtype is not None)


class GraphedForward:
    """Validation as a captured forward: loss summed on the device over windows of one shape."""

    def __init__(self, model: RNNLM, batch_size: int, seq_len: int, amp_dtype: torch.dtype | None = None,
                 capture: bool = False):
        self.model, self.amp_dtype = model, amp_dtype
        device = model.linear.weight.device
        self.device_type = device.type
        self.inputs = torch.zeros(batch_size, seq_len, dtype=torch.long, device=device)
        self.targets = torch.zeros(batch_size, seq_len, dtype=torch.long, device=device)
        self.h, self.c = model.init_state(batch_size, device)
        self.total = torch.zeros((), dtype=torch.float64, device=device)
        self.graph = None
        if capture:
            was_training = model.training
            model.eval()  # record the forward as validation runs it
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side), torch.no_grad():
                for _ in range(WARMUP_STEPS):
                    self._forward()
            torch.cuda.current_stream().wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph), torch.no_grad():
                self._forward()
            model.train(was_training)
        self.reset()

    @torch.no_grad()
    def _forward(self) -> None:
        with autocast(self.device_type, self.amp_dtype):
            logits, (h, c) = self.model(self.inputs, (self.h, self.c))
            self.total += F.cross_entropy(logits, self.targets.reshape(-1), reduction="sum")
        self.h_next, self.c_next = h, c

    def reset(self) -> None:
        self.h.zero_()
        self.c.zero_()
        self.total.zero_()

    def __call__(self, inputs: torch.Tensor, targets: torch.Tensor) -> None:
        self.inputs.copy_(inputs)
        self.targets.copy_(targets)
        self.graph.replay() if self.graph is not None else self._forward()
        self.h.copy_(self.h_next)
        self.c.copy_(self.c_next)


class GraphedStep:
    """One teacher-forced TBPTT step on static buffers, replayed as a CUDA graph when captured.

    `amp_dtype` turns on autocast; `scaler` (a GradScaler, for float16) only runs eagerly, since its
    inf check reads a flag on the host.
    """

    def __init__(self, model: RNNLM, optimizer: torch.optim.Optimizer, batch_size: int, seq_len: int,
                 clip: float, amp_dtype: torch.dtype | None = None, capture: bool = False, scaler=None):
        if capture and scaler is not None:
            raise ValueError("a GradScaler cannot run inside a CUDA graph: run float16 eagerly")
        self.model, self.optimizer, self.clip, self.amp_dtype, self.scaler = model, optimizer, clip, amp_dtype, scaler
        lm = getattr(model, "module", model)  # the RNNLM, also inside DistributedDataParallel
        device = lm.linear.weight.device
        self.device_type = device.type
        self.inputs = torch.zeros(batch_size, seq_len, dtype=torch.long, device=device)
        self.targets = torch.zeros(batch_size, seq_len, dtype=torch.long, device=device)
        self.h, self.c = lm.init_state(batch_size, device)  # the static state the step reads
        self.loss_sum = torch.zeros((), device=device)
        self.graph = None
        if capture:
            self._capture()

    def _step(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        with autocast(self.device_type, self.amp_dtype):
            logits, (h, c) = self.model(self.inputs, (self.h, self.c))
            loss = F.cross_entropy(logits, self.targets.reshape(-1))
        if self.scaler is None:
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip, foreach=True)
            self.optimizer.step()
        else:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)  # clip the true gradients, not the scaled ones
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip, foreach=True)
            self.scaler.step(self.optimizer)  # skipped when the gradients overflowed
            self.scaler.update()
        self.loss_sum += loss.detach()
        self.h_next, self.c_next = h.detach(), c.detach()

    def _capture(self) -> None:
        # Warm-up runs real steps; put the model and optimizer back as they were so that capturing
        # changes nothing the trainer can see. Optimizer state the warm-up created (Adam's moments
        # and step count) starts at zero, as it would have on the first real step.
        saved = {id(t): t.detach().clone() for t in self._state_tensors()}
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(WARMUP_STEPS):
                    self._step()
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self._step()
            self.graph = graph
        finally:  # also when capture fails, so the eager fallback starts from the same model
            with torch.no_grad():
                for tensor in self._state_tensors():
                    tensor.copy_(saved[id(tensor)]) if id(tensor) in saved else tensor.zero_()
            self.loss_sum.zero_()

    def _state_tensors(self) -> list[torch.Tensor]:
        tensors = [p.data for p in self.model.parameters()]
        for state in self.optimizer.state.values():
            tensors += [v for v in state.values() if isinstance(v, torch.Tensor)]
        return tensors

    def reset_state(self, state: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        """Zero the carried state (epoch start), or load one (resume)."""
        if state is None:
            self.h.zero_()
            self.c.zero_()
        else:
            self.h.copy_(state[0])
            self.c.copy_(state[1])

    def step(self, inputs: torch.Tensor, targets: torch.Tensor) -> None:
        self.inputs.copy_(inputs, non_blocking=True)
        self.targets.copy_(targets, non_blocking=True)
        if self.graph is not None:
            self.graph.replay()
        else:
            self._step()
        self.h.copy_(self.h_next)  # the detach: values cross the window edge, gradients do not
        self.c.copy_(self.c_next)

    def record(self, loss: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor]) -> None:
        """Account for a step taken outside (scheduled sampling): its loss and the state it left."""
        self.loss_sum += loss.detach()
        self.reset_state(tuple(s.detach() for s in state))

    @property
    def state(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.h, self.c

    def take_loss_sum(self) -> float:
        """The summed loss since the last call (the one host-device sync), then reset."""
        value = self.loss_sum.item()
        self.loss_sum.zero_()
        return value
