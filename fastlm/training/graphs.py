"""The one seam between a training step and CUDA graphs.

A CUDA graph replays recorded kernels on fixed addresses: one replay instead of a Python launch per
kernel. The step (`fastlm.training.step`) asks a `GraphAPI` for two things: `side_stream()` for the
warm-up, and `capture(fn, buffers)`, which returns something with `replay()`. Two implement it:

- `CudaGraphs`: torch.cuda.CUDAGraph, what runs on a GPU;
- `SimulatedGraphs` (`fastlm.training.simulated_graphs`): the same protocol on the CPU with a CUDA
  graph's semantics (replay repeats the recorded ops, never the Python; what a real capture refuses,
  it refuses), so that every line of the capture path runs in the tests and fails there as it would
  on a GPU.

`graph_api(device)` picks one; None means this run has no graphs and steps run eagerly.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Protocol

import torch

from fastlm.device import cuda_graphs_available
from fastlm.training.simulated_graphs import Buffers, SimulatedGraphs

WARMUP_STEPS = 3  # eager iterations on a side stream before capture, as torch.cuda.graphs documents


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


def graph_api(device: torch.device) -> GraphAPI | None:
    """CUDA graphs on a CUDA device; on the CPU the simulation when FASTLM_SIMULATE_CUDA_GRAPHS=1
    (the test switch that runs the trainer's GPU path on the CPU), else None: no graphs here."""
    if device.type == "cuda":
        return CudaGraphs(device)
    return SimulatedGraphs() if cuda_graphs_available(device) else None
