"""CUDA graphs simulated on the CPU, with a CUDA graph's semantics: the tests' stand-in for a GPU.

Capture records the dispatched aten ops (the fused kernel is a torch custom op, so it is one of them)
and leaves memory as a capture that runs nothing does: what it wrote is put back, what it allocated
is NaN. Replay re-runs the record on the tensors it was captured with, never the Python: a side
effect is not repeated, a Python number changed since capture is not seen, random ops draw afresh
from the generator. A capture refuses what a real one refuses (host reads and copies, Python data
copied in, shapes that depend on values, a Triton kernel launched outside a custom op), and replay
refuses to run when a buffer was rebound since capture (a real graph would go on reading the old
memory). For tests, never for speed.
"""
from __future__ import annotations

import contextlib
import math
import sys
from dataclasses import dataclass
from typing import Callable

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves, tree_map

Buffers = Callable[[], dict[str, torch.Tensor]]  # name → every tensor a replay reads or writes


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

    def capture(self, fn: Callable[[], None], buffers: Buffers) -> SimulatedGraph:
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
