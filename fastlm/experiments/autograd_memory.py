"""What detaching the hidden state saves: the autograd graph's memory, measured exactly.

With detach, each window's graph is freed by its backward: memory is flat. Without it, window k's
loss back-propagates through all k windows before it, so every one of their graphs must stay
alive (`retain_graph=True`): memory grows linearly with k, and so does the backward's work.

Bytes are counted with `torch.autograd.graph.saved_tensors_hooks`: every tensor autograd saves for
backward passes through `pack`, and is released when the graph that holds it is freed. Tensors that
share storage are counted once. Parameters the graph merely refers to cost nothing extra and are
not counted. But a graph kept alive for later backward passes (no detach) needs the weights its
window actually used, and the optimizer updates parameters in place after each window: there each
parameter a window's graph saves is copied once per window (a snapshot), which is part of the price
and is counted, apart from the activations.

A user's loop that merely leaves out `detach()` does not do this: `user_loops_without_detach`
runs three such loops and reports what happens to each.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fastlm.errors import first_line
from fastlm.models.lm import RNNLM
from fastlm.training.optimizer import update


class _Saved:
    """A saved tensor held by the graph; tells the meter when the graph lets it go."""

    __slots__ = ("meter", "key", "tensor")

    def __init__(self, meter: "SavedTensorMeter", key, tensor: torch.Tensor):
        self.meter, self.key, self.tensor = meter, key, tensor

    def __del__(self):
        self.meter._release(self.key)


class SavedTensorMeter:
    """Counts the bytes autograd keeps for backward while the context is active.

    `live_bytes` is the size of the distinct storages held by graphs that are still alive, not
    counting `parameters` unless `snapshot_parameters`. Then each parameter storage a graph saves is
    copied once per window (call `new_window` before each window's forward), every saved view of it
    rebuilt on that copy, and the copy counted in `snapshot_bytes`; `activation_bytes` is the rest.
    """

    def __init__(self, parameters=(), snapshot_parameters: bool = False):
        self._params = {p.untyped_storage().data_ptr() for p in parameters}
        self._snapshot = snapshot_parameters
        self._window_copies: dict[int, tuple[torch.UntypedStorage, int]] = {}  # parameter key -> (copy, version)
        self._refs: dict[int, list] = {}  # storage key -> [bytes, references, is a snapshot]
        self.live_bytes = 0
        self.snapshot_bytes = 0
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)

    def __enter__(self):
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self._hooks.__exit__(*exc)

    @property
    def activation_bytes(self) -> int:
        return self.live_bytes - self.snapshot_bytes

    def new_window(self) -> None:
        """The optimizer may have changed the parameters since the last forward: copy them anew.

        The meter is told rather than left to notice: fused Adam updates the parameters in place
        without bumping their version counters."""
        self._window_copies.clear()

    def _pack(self, tensor: torch.Tensor) -> _Saved:
        # Hold a detached alias: a saved *output* would otherwise point back at the node that saves
        # it (tensor.grad_fn), a reference cycle that keeps the graph alive after it is dropped.
        tensor = tensor.detach()
        is_parameter = tensor.untyped_storage().data_ptr() in self._params
        if is_parameter:
            if not self._snapshot:
                return _Saved(self, None, tensor)
            tensor = self._on_window_copy(tensor)
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        entry = self._refs.setdefault(key, [storage.nbytes(), 0, is_parameter])
        if entry[1] == 0:
            self.live_bytes += entry[0]
            self.snapshot_bytes += entry[0] * entry[2]
        entry[1] += 1
        return _Saved(self, key, tensor)

    def _on_window_copy(self, view: torch.Tensor) -> torch.Tensor:
        """`view` of a parameter, rebuilt (same size, stride and offset) on this window's copy of the
        parameter's storage: a backend that saves W_hh once per time step still holds one copy."""
        key = view.untyped_storage().data_ptr()
        copy, version = self._window_copies.get(key, (None, None))
        # A non-fused optimizer's step within the window does bump the version: copy again then.
        if copy is None or version != view._version:
            copy, version = self._window_copies[key] = (view.untyped_storage().clone(), view._version)
        return view.new_empty(0).set_(copy, view.storage_offset(), view.size(), view.stride())

    @staticmethod
    def _unpack(saved: _Saved) -> torch.Tensor:
        return saved.tensor

    def _release(self, key) -> None:
        if key is None:  # a parameter, not counted
            return
        entry = self._refs[key]
        entry[1] -= 1
        if entry[1] == 0:
            self.live_bytes -= entry[0]
            self.snapshot_bytes -= entry[0] * entry[2]
            del self._refs[key]


@dataclass
class ChunkMeasurement:
    chunk: int
    graph_bytes: int  # held by autograd right before this window's backward: activations + snapshots
    activation_bytes: int
    snapshot_bytes: int  # copies of the weights that retained graphs need (no detach only)
    bytes_after_step: int  # still held once the step is done
    step_s: float
    loss: float
    cuda_peak_bytes: int | None = None


def run_chunks(model, optimizer, windows, detach: bool, clip: float) -> list[ChunkMeasurement]:
    """Train on consecutive windows, with or without cutting the graph between them."""
    device = model.linear.weight.device
    state = model.init_state(windows[0][0].shape[0], device)
    measurements = []
    with SavedTensorMeter(model.parameters(), snapshot_parameters=not detach) as meter:
        for k, (inputs, targets) in enumerate(windows, 1):
            if device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
            meter.new_window()
            if detach:
                state = tuple(s.detach() for s in state)
            logits, state = model(inputs, state)
            loss = F.cross_entropy(logits, targets.reshape(-1))
            held = (meter.live_bytes, meter.activation_bytes, meter.snapshot_bytes)
            # Without detach the next window's backward runs through this graph again: keep it.
            update(model, optimizer, loss, clip, retain_graph=not detach)
            loss_value = loss.item()
            del logits, loss
            peak = None
            if device.type == "cuda":
                torch.cuda.synchronize()
                peak = torch.cuda.max_memory_allocated()
            measurements.append(ChunkMeasurement(k, *held, meter.live_bytes, time.perf_counter() - start,
                                                 loss_value, peak))
        del state  # frees the retained graphs while the meter still listens
    return measurements


def count_graph_nodes(loss: torch.Tensor) -> int:
    """Autograd nodes a backward from `loss` would visit."""
    seen, stack = set(), [loss.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        stack.extend(next_node for next_node, _ in node.next_functions)
    return len(seen)


# -- what a user's loop without detach does ----------------------------------------------------

USER_LOOPS = {  # name -> (retain_graph, fused Adam)
    "loss.backward(); Adam": (False, False),
    "loss.backward(retain_graph=True); Adam": (True, False),
    "loss.backward(retain_graph=True); Adam(fused=True)": (True, True),
}
FASTLM_ARM = "fastlm's no-detach arm (retain_graph=True, weight snapshots)"
TINY_SHAPE = dict(vocab=13, embed=5, hidden=7, batch=3, seq_len=4)


@dataclass
class LoopOutcome:
    loop: str
    failed_at_window: int | None  # None: it ran through every window
    error: str | None  # the error's first line
    gradient_error: float | None  # last window's gradient against the true one, ‖g − g*‖ / ‖g*‖
    step_bumps_version: bool | None = None  # whether the optimizer's step told autograd it changed the weights


def user_loops_without_detach(windows: int = 2, lr: float = 0.1) -> list[LoopOutcome]:
    """Train a tiny float32 model (torch's LSTM) on `windows` windows without detach, as a user
    might, once per loop in `USER_LOOPS` and once as fastlm's no-detach arm does, and say what
    happened: the error, or how far the last window's gradient is from the true one (float64, each
    window run with the weights it had then, by torch's own modules)."""
    steps = TINY_SHAPE["seq_len"]
    tokens = torch.randint(0, TINY_SHAPE["vocab"], (TINY_SHAPE["batch"], windows * steps + 1),
                           generator=torch.Generator().manual_seed(1))
    data = [(tokens[:, i * steps:(i + 1) * steps], tokens[:, i * steps + 1:(i + 1) * steps + 1])
            for i in range(windows)]
    outcomes = [_user_loop(name, retain_graph, fused, data, lr) for name, (retain_graph, fused) in USER_LOOPS.items()]
    return outcomes + [_fastlm_arm(data, lr)]


def _tiny_model(fused: bool, lr: float):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = RNNLM(TINY_SHAPE["vocab"], TINY_SHAPE["embed"], TINY_SHAPE["hidden"], backend="torch")
    return model, torch.optim.Adam(model.parameters(), lr=lr, fused=fused)


def _user_loop(name: str, retain_graph: bool, fused: bool, windows, lr: float) -> LoopOutcome:
    model, optimizer = _tiny_model(fused, lr)
    state, weights, bumps = model.init_state(TINY_SHAPE["batch"]), [], None
    for k, (inputs, targets) in enumerate(windows, 1):
        weights.append(_weights_of(model))
        logits, state = model(inputs, state)
        loss = F.cross_entropy(logits, targets.reshape(-1))
        optimizer.zero_grad()
        try:
            loss.backward(retain_graph=retain_graph)
        except RuntimeError as err:
            return LoopOutcome(name, k, first_line(err), None, bumps)
        versions = [p._version for p in model.parameters()]
        optimizer.step()
        bumps = any(p._version != v for p, v in zip(model.parameters(), versions))
    return LoopOutcome(name, None, None, _gradient_error(model, weights, windows), bumps)


def _fastlm_arm(windows, lr: float) -> LoopOutcome:
    # Window k starts from the weights that training on the k - 1 windows before it leaves.
    weights = [_weights_of(_tiny_model(True, lr)[0])]
    for k in range(1, len(windows) + 1):
        model, optimizer = _tiny_model(True, lr)
        run_chunks(model, optimizer, windows[:k], detach=False, clip=math.inf)
        weights.append(_weights_of(model))
    return LoopOutcome(FASTLM_ARM, None, None, _gradient_error(model, weights[:-1], windows))


def _weights_of(model) -> dict[str, torch.Tensor]:
    return {key: w.detach().double().clone() for key, w in model.state_dict().items()}


def _gradient_error(model, weights: list[dict], windows) -> float:
    """‖g − g*‖ / ‖g*‖ over all parameters: g = model's gradients, g* = `true_last_window_gradient`."""
    true = true_last_window_gradient(weights, windows)
    got = torch.cat([p.grad.double().flatten() for _, p in sorted(model.named_parameters())])
    expected = torch.cat([true[name].flatten() for name, _ in sorted(model.named_parameters())])
    return ((got - expected).norm() / expected.norm()).item()


def true_last_window_gradient(weights: list[dict], windows) -> dict[str, torch.Tensor]:
    """The gradient of the last window's loss back-propagated through all windows, window k run
    with `weights[k]` (the weights it had then), in float64 with torch's own modules. The weights
    are shared by all windows, so their gradient is the sum over the windows' copies."""
    state, copies = None, []
    for window_weights, (inputs, targets) in zip(weights, windows):
        copy = _plain_modules(window_weights)
        out, state = copy["lstm"](copy["embed"](inputs), state)
        logits = copy["linear"](out).reshape(-1, copy["linear"].out_features)
        copies.append(copy)
    F.cross_entropy(logits, targets.reshape(-1)).backward()
    return {name: sum(_grad(copy, name) for copy in copies) for name in weights[0]}


def _plain_modules(weights: dict) -> nn.ModuleDict:
    vocab, embed = weights["embed.weight"].shape
    hidden = weights["linear.weight"].shape[1]
    with torch.random.fork_rng(devices=[]):  # the initialisation is overwritten: leave the caller's random stream
        modules = nn.ModuleDict({"embed": nn.Embedding(vocab, embed),
                                 "lstm": nn.LSTM(embed, hidden, batch_first=True),
                                 "linear": nn.Linear(hidden, vocab)}).double()
    modules.load_state_dict(weights)
    return modules


def _grad(modules: nn.ModuleDict, name: str) -> torch.Tensor:
    parameter = modules.get_parameter(name)
    return torch.zeros_like(parameter) if parameter.grad is None else parameter.grad
