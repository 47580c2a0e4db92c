"""What detaching the hidden state saves: the autograd graph's memory, measured exactly.

With detach, each window's graph is freed by its backward: memory is flat. Without it, window k's
loss back-propagates through all k windows before it, so every one of their graphs must stay
alive (`retain_graph=True`): memory and step time grow linearly with k.

Bytes are counted with `torch.autograd.graph.saved_tensors_hooks`: every tensor autograd saves for
backward passes through `pack`, and is released when the graph that holds it is freed. Tensors that
share storage are counted once. Parameters the graph merely refers to cost nothing extra and are
not counted. But a graph kept alive for later backward passes (no detach) needs the weights its
window actually used, and the optimizer updates parameters in place after each window: there a
saved parameter is stored as a snapshot (a copy), which is part of the price and is counted.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fastlm.optimizer import update


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
    counting `parameters` unless `snapshot_parameters` (then each saved parameter is copied).
    """

    def __init__(self, parameters=(), snapshot_parameters: bool = False):
        self._params = {p.untyped_storage().data_ptr() for p in parameters}
        self._snapshot = snapshot_parameters
        self._refs: dict[int, list] = {}  # storage key -> [bytes, references]
        self.live_bytes = 0
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)

    def __enter__(self):
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self._hooks.__exit__(*exc)

    def _pack(self, tensor: torch.Tensor) -> _Saved:
        # Hold a detached alias: a saved *output* would otherwise point back at the node that saves
        # it (tensor.grad_fn), a reference cycle that keeps the graph alive after it is dropped.
        tensor = tensor.detach()
        if tensor.untyped_storage().data_ptr() in self._params:
            if not self._snapshot:
                return _Saved(self, None, tensor)
            tensor = tensor.clone()  # a snapshot: the optimizer will update the original in place
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        entry = self._refs.setdefault(key, [storage.nbytes(), 0])
        if entry[1] == 0:
            self.live_bytes += entry[0]
        entry[1] += 1
        return _Saved(self, key, tensor)

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
            del self._refs[key]


@dataclass
class ChunkMeasurement:
    chunk: int
    graph_bytes: int  # held by autograd right before this window's backward
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
            if detach:
                state = tuple(s.detach() for s in state)
            logits, state = model(inputs, state)
            loss = F.cross_entropy(logits, targets.reshape(-1))
            graph_bytes = meter.live_bytes
            # Without detach the next window's backward runs through this graph again: keep it.
            update(model, optimizer, loss, clip, retain_graph=not detach)
            loss_value = loss.item()
            del logits, loss
            peak = None
            if device.type == "cuda":
                torch.cuda.synchronize()
                peak = torch.cuda.max_memory_allocated()
            measurements.append(ChunkMeasurement(k, graph_bytes, meter.live_bytes, time.perf_counter() - start,
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
