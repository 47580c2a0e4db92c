"""The whole TBPTT training step as one CUDA graph: static buffers, capture, replay.

A CUDA graph replays recorded kernels on fixed addresses, so everything the step touches lives in
buffers allocated once: the window's inputs and targets, the carried (h, c), the gradients, the
optimizer state and a device-side loss sum. One step is then

    copy the window into the static inputs → replay (forward, loss, backward, clip, Adam,
    and the new (h, c) copied into the static state)

and that last copy *is* the TBPTT detach: the next replay starts from the values, with no graph
behind them. The loss is summed on the device and read only when the trainer logs.

The graph mechanism sits behind one seam, a `GraphAPI` (`side_stream()` for the warm-up,
`capture(fn, buffers)` returning something with `replay()`):

- `CudaGraphs`: torch.cuda.CUDAGraph, what runs on a GPU;
- `SimulatedGraphs`: the same protocol on the CPU, with a CUDA graph's semantics, so that every line
  of the capture path runs in the tests and fails there as it would on a GPU. Capture records the
  dispatched aten ops (the fused kernel is a torch custom op, so it is one of them) and leaves memory
  as a capture that runs nothing does: what it wrote is put back, what it allocated is NaN. Replay
  re-runs the record on the tensors it was captured with, never the Python: a side effect is not
  repeated, a Python number changed since capture is not seen, random ops draw afresh from the
  generator. A capture refuses what a real one refuses (host reads and copies, Python data copied
  in, shapes that depend on values), and replay refuses to run when a buffer was rebound since
  capture (a real graph would go on reading the old memory).

`graph_api(device)` picks one; without it (`graphs=None`) the same step runs eagerly.
"""
from __future__ import annotations

import contextlib
import math
import os
import sys
from dataclasses import dataclass
from typing import Callable, Protocol

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves, tree_map

from fastlm.models.lm import RNNLM
from fastlm.training.optimizer import update

WARMUP_STEPS = 3  # eager iterations on a side stream before capture, as torch.cuda.graphs documents
SIMULATE_ENV = "FASTLM_SIMULATE_CUDA_GRAPHS"  # a test switch: CPU runs take the CUDA-graph path, simulated
# How far the first replayed loss may be from an eager forward's (relative), by autocast dtype.
REPLAY_TOLERANCE = {None: 1e-5, torch.bfloat16: 1e-2, torch.float16: 5e-3}

Buffers = Callable[[], dict[str, torch.Tensor]]  # name → every tensor a replay reads or writes


class Graph(Protocol):
    def replay(self) -> None: ...


class GraphAPI(Protocol):
    def side_stream(self) -> contextlib.AbstractContextManager: ...

    def capture(self, fn: Callable[[], None], buffers: Buffers) -> Graph: ...


class CudaGraphs:
    """torch.cuda's graphs on one device: warm up on a side stream, record `fn` once, replay it.

    Streams and the capture are made under `torch.cuda.device(device)`: torch.cuda.graph captures on
    a stream of the *current* device, so with cuda:1 tensors and device 0 current the step's kernels
    would run outside the capture.
    """

    def __init__(self, device: torch.device):
        self.device = device

    @contextlib.contextmanager
    def side_stream(self):
        with torch.cuda.device(self.device):
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            try:
                with torch.cuda.stream(side):
                    yield
            finally:  # also when a warm-up step raises: what runs next must not race its kernels
                torch.cuda.current_stream(self.device).wait_stream(side)

    def capture(self, fn: Callable[[], None], buffers: Buffers) -> Graph:
        with torch.cuda.device(self.device):
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, stream=torch.cuda.Stream(self.device)):
                fn()
        return graph


def _addresses(buffers: dict[str, torch.Tensor]) -> dict[str, tuple]:
    return {name: (t.data_ptr(), tuple(t.shape), t.dtype) for name, t in buffers.items()}


def _refuse(what: str) -> None:
    raise RuntimeError(f"simulated CUDA graph: the captured function {what}, which a real capture refuses")


# Python-level calls a real capture cannot contain: a device→host copy waits for kernels that have not
# run, and a copy of Python data to the device is a synchronous memcpy. (On the CPU they dispatch no op.)
_HOST_TRANSFERS = {
    torch.Tensor.item: "reads a tensor's value on the host (.item())",
    torch.Tensor.tolist: "reads a tensor's value on the host (.tolist())",
    torch.Tensor.numpy: "reads a tensor's value on the host (.numpy())",
    torch.Tensor.cpu: "copies a tensor to the host (.cpu())",
    torch.Tensor.__array__: "reads a tensor's value on the host (numpy.asarray)",
    torch.tensor: "copies Python data to the device (torch.tensor)",
    torch.as_tensor: "copies Python data to the device (torch.as_tensor)",
    torch.asarray: "copies Python data to the device (torch.asarray)",
    torch.Tensor.new_tensor: "copies Python data to the device (Tensor.new_tensor)",
}
_FROM_PYTHON_DATA = {torch.tensor, torch.as_tensor, torch.asarray, torch.Tensor.new_tensor}
_BOOLEAN_INDEXING = {torch.ops.aten.index.Tensor, torch.ops.aten.index_put_.default,
                     torch.ops.aten.index_put.default, torch.ops.aten._index_put_impl_.default}


class _NoHostTransfers(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in _HOST_TRANSFERS and not _a_cpu_scalar(func, args, kwargs or {}):
            _refuse(_HOST_TRANSFERS[func])
        return func(*args, **(kwargs or {}))


def _a_cpu_scalar(func, args, kwargs) -> bool:
    """`torch.tensor(2.0)`: a CPU scalar, which a CUDA op reads as a value at capture, no copy."""
    data = args[1] if func is torch.Tensor.new_tensor else args[0] if args else kwargs.get("data")
    return func in _FROM_PYTHON_DATA and isinstance(data, (bool, int, float)) and "device" not in kwargs


def _storage(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def _tensors(tree) -> list[torch.Tensor]:
    return [t for t in tree_leaves(tree) if isinstance(t, torch.Tensor)]


@dataclass
class _Op:
    """One dispatched op as captured: re-run on replay with these very arguments (tensors by identity,
    Python scalars as they were at capture) and in the grad mode it ran in (oneDNN's LSTM keeps its
    workspace for backward only when grad mode is on)."""
    func: torch._ops.OpOverload
    args: tuple
    kwargs: dict
    out: object
    grad_enabled: bool
    layouts: list  # (size, stride, offset) of each output tensor as made, before any in-place view op

    @property
    def is_view(self) -> bool:
        """Views need no replay: the recorded view object already aliases memory that replay refills.
        In-place views (`unsqueeze_`, `t_`) change only a tensor's metadata, once, as a kernel-less capture."""
        schema = self.func._schema
        if torch.Tag.inplace_view in self.func.tags:
            return True
        return bool(schema.returns) and all(r.alias_info is not None for r in schema.returns) and not any(
            a.alias_info is not None and a.alias_info.is_write for a in schema.arguments)

    def replay(self) -> None:
        with torch.set_grad_enabled(self.grad_enabled):
            result = self.func(*self.args, **self.kwargs)
        returns = self.func._schema.returns
        if not returns:
            return
        if len(returns) == 1:
            result, out = (result,), (self.out,)
        else:
            out = self.out
        layouts = iter(self.layouts)
        for spec, new, recorded in zip(returns, result, out):
            if spec.alias_info is not None:  # in place, or out=: already written where capture wrote
                continue
            new_leaves, recorded_leaves = tree_leaves(new), tree_leaves(recorded)
            for a, b in zip(recorded_leaves, new_leaves, strict=True):
                layout = next(layouts) if isinstance(a, torch.Tensor) else None
                if isinstance(b, torch.Tensor) and layout is not None and tuple(b.shape) == layout[0]:
                    a.as_strided(*layout).copy_(b)  # the graph's pool: capture's allocation, reused on every replay
                elif isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
                    raise RuntimeError(f"simulated CUDA graph: {self.func} gave another output on replay than at "
                                       "capture; a real graph replays fixed shapes")


class _Recorder(TorchDispatchMode):
    """Capture: each dispatched op runs once (for its outputs' shapes, and so that what follows can
    run), is refused where a real capture refuses it, and is recorded. Memory from outside that the
    ops write is saved first, so that `undo` can leave it as a capture that runs nothing leaves it."""

    def __init__(self):
        super().__init__()
        self.ops: list[_Op] = []
        self.pool: dict[int, torch.Tensor] = {}  # storage → a tensor allocated during capture
        self.outside: set[int] = set()  # storages of the tensors from outside that the ops were given
        self.overwritten: list[tuple[torch.Tensor, torch.Tensor]] = []  # (outside tensor, its value before)
        self._saved: set[int] = set()
        self.inside_op = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if torch.Tag.data_dependent_output in func.tags:
            _refuse(f"reads a tensor's value on the host ({func})")
        if torch.Tag.dynamic_output_shape in func.tags or (
                func in _BOOLEAN_INDEXING and any(t.dtype in (torch.bool, torch.uint8) for t in _tensors(args[1]))):
            _refuse(f"makes a tensor whose shape depends on values ({func}: nonzero, boolean-mask indexing)")
        if func.namespace == "profiler":  # record_function ranges: not kernels
            return func(*args, **kwargs)
        self.outside.update(s for s in map(_storage, _tensors((args, kwargs))) if s not in self.pool)
        self._save_what_it_writes(func, args, kwargs)
        self.inside_op = True
        try:
            out = func(*args, **kwargs)
        finally:
            self.inside_op = False
        returns = func._schema.returns
        fresh = [t for spec, returned in zip(returns, out if len(returns) > 1 else (out,))
                 if spec.alias_info is None for t in _tensors(returned)]
        # new memory, unless an op returns its input's storage unannounced
        self.pool.update((_storage(t), t) for t in fresh if _storage(t) not in self.outside)
        self.ops.append(_Op(func, tree_map(lambda x: x, args), tree_map(lambda x: x, kwargs), out,
                            torch.is_grad_enabled(), [(tuple(t.shape), t.stride(), t.storage_offset()) for t in fresh]))
        return out

    def _save_what_it_writes(self, func, args, kwargs) -> None:
        schema, values = func._schema, dict(zip([a.name for a in func._schema.arguments], args)) | kwargs
        for argument in schema.arguments:
            if argument.alias_info is not None and argument.alias_info.is_write:
                for t in _tensors(values.get(argument.name)):
                    if _storage(t) not in self.pool and id(t) not in self._saved:
                        self._saved.add(id(t))
                        self.overwritten.append((t, t.detach().clone()))

    @torch.no_grad()
    def undo(self) -> None:
        """Leave memory as a capture leaves it: the pool unwritten (NaN), outside tensors as they were."""
        for t in self.pool.values():
            if t.is_floating_point():
                t.fill_(math.nan)
        for t, before in reversed(self.overwritten):
            t.copy_(before)


_AUTOCAST_KEYS = torch._C.DispatchKeySet(torch._C.DispatchKey.AutocastCPU).add(torch._C.DispatchKey.AutocastCUDA)


@contextlib.contextmanager
def _triton_launches_only_inside_ops(recorder: _Recorder):
    """A Triton kernel launched from Python is no dispatched op: the record would hold the
    interpreter's copies of its arguments but not the kernel. Inside a custom op it is one op."""
    interpreter = sys.modules.get("triton.runtime.interpreter")
    if interpreter is None:  # no kernel has been interpreted in this process
        yield
        return
    run = interpreter.InterpretedFunction.run

    def guarded(kernel, *args, **kwargs):
        if not recorder.inside_op:
            raise RuntimeError(f"simulated CUDA graph: the captured function launches the Triton kernel "
                               f"{kernel.__name__} outside a torch custom op; a real graph would record it, the "
                               "simulation cannot (launch it from a torch.library.custom_op)")
        return run(kernel, *args, **kwargs)

    interpreter.InterpretedFunction.run = guarded
    try:
        yield
    finally:
        interpreter.InterpretedFunction.run = run


class SimulatedGraph:
    """A captured record of ops, replayed on the tensors it was captured with; the Python function
    that made it never runs again."""

    def __init__(self, name: str, ops: list[_Op], buffers: Buffers):
        self.name, self.buffers = name, buffers
        self.ops = [op for op in ops if not op.is_view]
        self.addresses = _addresses(buffers())

    def _check(self, when: str) -> None:
        now = _addresses(self.buffers())
        for name in sorted(set(now) | set(self.addresses)):
            if now.get(name) != self.addresses.get(name):
                raise RuntimeError(f"simulated CUDA graph: buffer {name!r} was rebound {when}; a real graph "
                                   "would go on using the memory it was captured with")

    def replay(self) -> None:
        self._check("since capture")
        # Below autograd (the record holds backward's ops already) and autocast (its casts are recorded).
        with torch._C._AutoDispatchBelowAutograd(), torch._C._ExcludeDispatchKeyGuard(_AUTOCAST_KEYS):
            for op in self.ops:
                op.replay()


class SimulatedGraphs:
    """The CUDA graph protocol on the CPU, with a CUDA graph's semantics (see the module docstring):
    for tests, never for speed."""

    def side_stream(self):
        return contextlib.nullcontext()

    def capture(self, fn: Callable[[], None], buffers: Buffers) -> Graph:
        recorder, before = _Recorder(), _addresses(buffers())
        try:
            with _NoHostTransfers(), _triton_launches_only_inside_ops(recorder), recorder:
                fn()
        finally:
            recorder.undo()
        graph = SimulatedGraph(getattr(fn, "__name__", repr(fn)), recorder.ops, buffers)
        graph.addresses, after = before, graph.addresses
        graph._check("by the captured function itself")  # eager steps and the graph would use different memory
        graph.addresses = after
        return graph


def graph_api(device: torch.device) -> GraphAPI | None:
    """CUDA graphs on a CUDA device; on the CPU the simulation when FASTLM_SIMULATE_CUDA_GRAPHS=1
    (the test switch that runs the trainer's GPU path on the CPU), else None: no graphs here."""
    if device.type == "cuda":
        return CudaGraphs(device)
    if os.environ.get(SIMULATE_ENV, "0") not in ("", "0"):
        return SimulatedGraphs()
    return None


def autocast(device_type: str, amp_dtype: torch.dtype | None):
    """Autocast to `amp_dtype`, or a context that changes nothing when it is None.

    The cast cache is off, as torch.cuda.graphs asks of autocast inside a capture; the step casts
    each weight once anyway.
    """
    return torch.autocast(device_type, dtype=amp_dtype or torch.bfloat16, enabled=amp_dtype is not None,
                          cache_enabled=False)


class GraphedForward:
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
        self.h.zero_()
        self.c.zero_()
        self.total.zero_()

    def __call__(self, inputs: torch.Tensor, targets: torch.Tensor) -> None:
        self.inputs.copy_(inputs)
        self.targets.copy_(targets)
        if self.graph is not None:
            self.graph.replay()
        else:
            self._forward()


def rng_states(device: torch.device) -> dict:
    """The states of the generators a step on `device` draws from: the CPU's, and the device's own."""
    states = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        states["cuda"] = torch.cuda.get_rng_state(device)
    return states


def set_rng_states(states: dict, device: torch.device) -> None:
    torch.set_rng_state(states["cpu"])
    if "cuda" in states:
        torch.cuda.set_rng_state(states["cuda"], device)


class _Snapshot:
    """The values of the parameters, gradients, optimizer state and carried state of a step, to put
    back exactly. Tensors are held as the live objects (never `p.data`, a new object per call)."""

    def __init__(self, step: GraphedStep):
        self.named = [(name, p, p.detach().clone()) for name, p in step.model.named_parameters()]
        self.optimizer_state = {p: {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in s.items()}
                                for p, s in step.optimizer.state.items()}
        self.grads = [(p, None if p.grad is None else p.grad.clone()) for _, p, _ in self.named]
        self.carried = [(t, t.clone()) for t in (step.h, step.c, step.loss_sum)]
        # The random generators too: warm-up and trial steps draw dropout masks. Put back, the next step
        # (a replay, which draws from the generator's state at that moment, or an eager step) draws the
        # masks an eager run would, and each replay advances the generator, so masks stay fresh.
        self.device = step.device
        self.rng = rng_states(step.device)

    def changed_parameters(self) -> list[str]:
        return [name for name, p, saved in self.named if not torch.equal(p.detach(), saved)]

    def updates(self) -> list[torch.Tensor]:
        """How far each parameter moved since the snapshot."""
        return [p.detach() - saved for _, p, saved in self.named]

    @torch.no_grad()
    def restore_keeping_new_state(self, step: GraphedStep) -> None:
        """Put every value back; optimizer state made since the snapshot stays, zeroed as Adam starts
        it, since a captured graph reads those very tensors."""
        self._restore(step, keep_new_state=True)

    @torch.no_grad()
    def restore_all(self, step: GraphedStep) -> None:
        """Put every value back and remove optimizer state made since the snapshot, gradients too:
        the step is as it was before."""
        self._restore(step, keep_new_state=False)
        for p, grad in self.grads:
            p.grad = grad

    def restore_rng(self) -> None:
        set_rng_states(self.rng, self.device)

    def _restore(self, step: GraphedStep, keep_new_state: bool) -> None:
        self.restore_rng()
        for _, p, saved in self.named:
            p.copy_(saved)
        for t, saved in self.carried:
            t.copy_(saved)
        for p, state in list(step.optimizer.state.items()):
            saved = self.optimizer_state.get(p, {})
            for key, value in list(state.items()):
                if key in saved and isinstance(value, torch.Tensor):
                    value.copy_(saved[key])
                elif key in saved:
                    state[key] = saved[key]
                elif keep_new_state and isinstance(value, torch.Tensor):
                    value.zero_()
                else:
                    del state[key]
            if not state:
                del step.optimizer.state[p]


class GraphedStep:
    """One teacher-forced TBPTT step on static buffers, replayed as a CUDA graph when captured.

    `graphs` (a `GraphAPI`) captures the step; None runs it eagerly. The optimizer must be
    capturable for a capture. `amp_dtype` turns on autocast; `scaler` (a GradScaler, for float16)
    only runs eagerly, since its inf check reads a flag on the host.
    """

    def __init__(self, model: RNNLM, optimizer: torch.optim.Optimizer, batch_size: int, seq_len: int,
                 clip: float, amp_dtype: torch.dtype | None = None, graphs: GraphAPI | None = None, scaler=None):
        if graphs is not None and scaler is not None:
            raise ValueError("a GradScaler cannot run inside a CUDA graph: run float16 eagerly")
        self.model, self.optimizer, self.clip, self.amp_dtype, self.scaler = model, optimizer, clip, amp_dtype, scaler
        lm = getattr(model, "module", model)  # the RNNLM, also inside DistributedDataParallel
        self.device = device = lm.linear.weight.device
        self.device_type = device.type
        self.inputs = torch.zeros(batch_size, seq_len, dtype=torch.long, device=device)
        self.targets = torch.zeros(batch_size, seq_len, dtype=torch.long, device=device)
        self.h, self.c = lm.init_state(batch_size, device)  # the static state the step reads and writes
        self.loss_sum = torch.zeros((), device=device)
        # A graph reads and writes the gradients it was captured with, so they must stay allocated:
        # zeroed in place. Eagerly, freeing them is cheaper (backward then writes instead of adds).
        self.free_grads = graphs is None
        self.graph = None
        self._before_capture: _Snapshot | None = None
        if graphs is not None:
            self._capture(graphs)

    def _step(self) -> None:
        with autocast(self.device_type, self.amp_dtype):
            logits, (h, c) = self.model(self.inputs, (self.h, self.c))
            loss = F.cross_entropy(logits, self.targets.reshape(-1))
        update(self.model, self.optimizer, loss, self.clip, self.scaler, free_grads=self.free_grads)
        self.loss_sum += loss.detach()
        with torch.no_grad():  # the detach: values cross the window edge, gradients do not
            self.h.copy_(h)
            self.c.copy_(c)

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
        before = _Snapshot(self)
        try:
            with graphs.side_stream():
                for _ in range(WARMUP_STEPS):
                    self._step()
            self.graph = graphs.capture(self._step, self._buffers)
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
        trial = _Snapshot(self)
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
            if self._learning_rates() != self._captured_lrs:  # a graph replays the rate it was captured with
                raise RuntimeError("the learning rate changed since the step was captured: capture it again")
            self.graph.replay()
        else:
            self._step()

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
