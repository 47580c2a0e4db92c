"""`LSTM`: a drop-in for `nn.LSTM` whose recurrence can run on three backends.

It *is* an `nn.LSTM` (same parameters, names, shapes, initialisation, gate order i, f, g, o), so
its `state_dict` loads into `nn.LSTM` and back. Only `forward` differs, by backend:

- ``torch``: torch's own LSTM (cuDNN on GPU, oneDNN on CPU);
- ``reference``: `fastlm.kernels.naive_lstm`, readable plain PyTorch, the oracle;
- ``triton``: `fastlm.kernels.fused_lstm`, the fused Triton kernel (CUDA, or the interpreter);
- ``auto``: chosen per run by `resolve_backend`: ``triton`` for a bf16/fp16 step captured as a
  CUDA graph, ``torch`` otherwise (the trainer resolves it; a bare `LSTM` resolves it eagerly).
"""
from __future__ import annotations

import functools
import importlib
import os

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastlm.errors import UsageError

BACKENDS = ("auto", "torch", "reference", "triton")


@functools.lru_cache(maxsize=1)
def _triton_available() -> bool:
    try:
        return importlib.import_module("triton") is not None
    except ImportError:
        return False


def check_backend(backend: str, device: torch.device | str | None = None) -> None:
    """The one check of a backend: a known name; for ``triton``, Triton installed and, on the CPU,
    its interpreter switched on (a compiled Triton kernel runs on CUDA tensors only)."""
    if backend not in BACKENDS:
        raise UsageError(f"unknown LSTM backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    if backend == "triton" and not _triton_available():
        raise UsageError("the triton backend needs Triton, which is not installed: the CUDA builds of torch bring "
                         "it (elsewhere pip install 'triton>=3.3'), or choose --backend torch")
    interpreted = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    if backend == "triton" and device is not None and torch.device(device).type != "cuda" and not interpreted:
        raise UsageError("--backend triton runs the fused kernel on a CUDA GPU: use --device cuda, or on the CPU "
                         "set TRITON_INTERPRET=1 to run it interpreted (slow, for testing), or choose --backend torch")


def resolve_backend(backend: str, device: torch.device | str, amp_dtype: torch.dtype | None = None,
                    graphed: bool = False) -> str:
    """The concrete backend `auto` stands for (other names pass through): the one expected to be
    fastest for that run.

    The fused kernel only where it can win: on CUDA, in bf16/fp16 (its products on tensor cores) and
    replayed as a CUDA graph (one replay instead of 2·T Python launches per layer and step). Torch's
    LSTM (cuDNN) everywhere else: in fp32, where the kernel's IEEE products use no tensor cores;
    eagerly (DDP, fp16 with its scaler, --no-cuda-graphs, scheduled sampling, evaluation), where
    those launches make the kernel launch-bound; and on the CPU.
    """
    if backend != "auto":
        return backend
    fused_wins = (torch.device(device).type == "cuda" and graphed and amp_dtype in (torch.bfloat16, torch.float16)
                  and _triton_available())
    return "triton" if fused_wins else "torch"


def recurrence_dtype(device_type: str, autocast_dtype: torch.dtype) -> torch.dtype:
    """The dtype torch's LSTM kernel runs in under autocast: the one asked for, except on the CPU,
    where oneDNN's bf16 LSTM rounds the cell state and costs perplexity (the fused kernel keeps c in
    fp32; the measurement is in benchmarks/README.md), so the CPU recurrence stays fp32."""
    return torch.float32 if device_type == "cpu" else autocast_dtype


def sequence_dropout(x: Tensor, p: float, training: bool, locked: bool, shard: tuple[int, int] = (0, 1)) -> Tensor:
    """Dropout on (B, T, F) activations: a fresh mask per element, or with `locked` (variational
    dropout) one mask per row shared by all T time steps of the window. Identity in eval.

    `shard` (rank, ranks): under torchrun x holds rows rank·B … (rank+1)·B of a global batch of
    ranks·B rows. The mask is drawn for the whole global batch, from the generator every rank seeds
    alike, and each rank keeps its rows: N ranks drop exactly what one process would. (On the CPU
    the mask is also the one `F.dropout` draws: a contiguous bernoulli tensor in row-major order.)
    """
    if not training or p == 0:
        return x
    rank, ranks = shard
    rows = x.shape[0]
    mask = x.new_empty(rows * ranks, 1 if locked else x.shape[1], x.shape[2]).bernoulli_(1 - p)
    return x * (mask[rank * rows:(rank + 1) * rows] / (1 - p))


class LSTM(nn.LSTM):
    """Multi-layer LSTM, `nn.LSTM`'s parameters and `forward(x, (h0, c0)) -> (out, (hN, cN))`.

    Args:
        input_size (E), hidden_size (H), num_layers (L): as in `nn.LSTM` (always with biases).
        batch_first: x is (B, T, E) if True (the default here), else (T, B, E).
        backend: one of ``auto``, ``torch``, ``reference``, ``triton`` (trusted: `check_backend` checks a name).
        dropout: on the output of each layer but the last, in training (`locked`: one mask per row
            for the whole window).
        weight_drop: DropConnect on W_hh (AWD-LSTM): in training each forward call, that is each
            window, multiplies W_hh by one fresh mask.
        shard: (rank, ranks) under torchrun, for `sequence_dropout`; weight drop needs none, as
            every rank draws the same W_hh mask from the same generator state.

    Shapes: x (B, T, E) → out (B, T, H); h0, c0, hN, cN (L, B, H).
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        batch_first: bool = True,
        backend: str = "auto",
        device=None,
        dtype=None,
        dropout: float = 0.0,
        locked_dropout: bool = False,
        weight_drop: float = 0.0,
    ):
        super().__init__(input_size, hidden_size, num_layers, batch_first=batch_first, device=device, dtype=dtype)
        self.backend = backend
        self.layer_dropout, self.locked_dropout, self.weight_drop = dropout, locked_dropout, weight_drop
        self.shard = (0, 1)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", backend={self.backend!r}"

    def forward(self, x: Tensor, state: tuple[Tensor, Tensor] | None = None):
        batch = self._check_input(x)
        if state is None:
            zeros = x.new_zeros(self.num_layers, batch, self.hidden_size)
            state = (zeros, zeros)
        self._check_state(state, batch, x)
        backend = resolve_backend(self.backend, x.device)
        regularised = self.training and (self.weight_drop or (self.layer_dropout and self.num_layers > 1))
        if backend == "torch" and not regularised:
            device_type = x.device.type
            if torch.is_autocast_enabled(device_type):
                return self._forward_torch_autocast(x, state, torch.get_autocast_dtype(device_type))
            return super().forward(x, state)
        return self._forward_layers(x, state, backend)

    def _forward_torch_autocast(self, x: Tensor, state: tuple[Tensor, Tensor], dtype: torch.dtype):
        # Under autocast nn.LSTM is cast to float16 whatever dtype autocast asks for, and re-flattens
        # its weights on every call. Run torch's LSTM kernel ourselves, in the dtype asked for.
        dtype = recurrence_dtype(x.device.type, dtype)
        with torch.autocast(x.device.type, enabled=False):
            weights = [w.to(dtype) for w in self._flat_weights]
            h0, c0 = (s.to(dtype) for s in state)
            out, h, c = torch._VF.lstm(x.to(dtype), (h0, c0), weights, True, self.num_layers, 0.0, self.training,
                                      False, self.batch_first)
        return out, (h, c)

    def _forward_layers(self, x: Tensor, state: tuple[Tensor, Tensor], backend: str):
        from fastlm.kernels import naive_lstm

        layer_fn = {"triton": _fused_layer, "torch": _torch_layer, "reference": lambda: naive_lstm}[backend]()
        h0, c0 = state
        layer_input = x if self.batch_first else x.transpose(0, 1)
        final_h, final_c = [], []
        for k in range(self.num_layers):
            if k > 0:
                layer_input = sequence_dropout(layer_input, self.layer_dropout, self.training, self.locked_dropout,
                                               self.shard)
            w_ih, w_hh, b_ih, b_hh = (getattr(self, f"{name}_l{k}") for name in ("weight_ih", "weight_hh", "bias_ih",
                                                                                   "bias_hh"))
            if self.training and self.weight_drop:
                w_hh = F.dropout(w_hh, self.weight_drop, training=True)  # DropConnect: one mask per window
            layer_input, h_k, c_k = layer_fn(layer_input, h0[k], c0[k], w_ih, w_hh, b_ih, b_hh)
            final_h.append(h_k)
            final_c.append(c_k)
        out = layer_input if self.batch_first else layer_input.transpose(0, 1)
        return out, (torch.stack(final_h), torch.stack(final_c))

    def _check_input(self, x: Tensor) -> int:
        if not isinstance(x, Tensor) or x.dim() != 3:
            layout = "(batch, seq, input_size)" if self.batch_first else "(seq, batch, input_size)"
            got = f"rank {x.dim()}" if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"LSTM input must be a 3-D tensor {layout}, got {got}")
        if x.shape[-1] != self.input_size:
            raise ValueError(
                f"LSTM input has feature size {x.shape[-1]} but input_size is {self.input_size}: "
                "check the embedding size"
            )
        return x.shape[0] if self.batch_first else x.shape[1]

    def _check_state(self, state, batch: int, x: Tensor) -> None:
        expected = (self.num_layers, batch, self.hidden_size)
        if not (isinstance(state, (tuple, list)) and len(state) == 2):
            raise ValueError("LSTM state must be a pair (h0, c0)")
        for name, s in zip(("h0", "c0"), state):
            if not isinstance(s, Tensor) or tuple(s.shape) != expected:
                got = tuple(s.shape) if isinstance(s, Tensor) else type(s).__name__
                raise ValueError(
                    f"LSTM state {name} must have shape (num_layers, batch, hidden_size) = {expected}, got {got}"
                )
            if s.device != x.device:
                raise ValueError(f"LSTM state {name} is on {s.device} but the input is on {x.device}")


def _torch_layer():
    """Torch's LSTM kernel for one layer (batch-first), in the dtype autocast asks for (fp32 on the
    CPU, as `recurrence_dtype` explains): the per-layer path that dropout between layers and weight
    drop need."""

    def layer(x, h0, c0, weight_ih, weight_hh, bias_ih, bias_hh):
        dtype, device_type = x.dtype, x.device.type
        if torch.is_autocast_enabled(device_type):
            dtype = recurrence_dtype(device_type, torch.get_autocast_dtype(device_type))
        with torch.autocast(device_type, enabled=False):
            weights = [w.to(dtype) for w in (weight_ih, weight_hh, bias_ih, bias_hh)]
            out, h, c = torch._VF.lstm(x.to(dtype), (h0[None].to(dtype), c0[None].to(dtype)), weights, True, 1,
                                      0.0, True, False, True)
        return out, h[0], c[0]

    return layer


def _fused_layer():
    """The fused kernel, with inputs and weights cast to the compute dtype that autocast asks for.

    The cell state is not cast: the kernel keeps c in fp32 and takes and returns it in fp32, so
    the memory carried across windows keeps the small updates a bf16 c would round away.
    """
    from fastlm.kernels import fused_lstm

    def layer(x, h0, c0, weight_ih, weight_hh, bias_ih, bias_hh):
        dtype = x.dtype
        device_type = x.device.type
        if torch.is_autocast_enabled(device_type):
            dtype = torch.get_autocast_dtype(device_type)
        x, h0, weight_ih, weight_hh, bias_ih, bias_hh = (
            t.to(dtype) for t in (x, h0, weight_ih, weight_hh, bias_ih, bias_hh))
        with torch.autocast(device_type, enabled=False):
            return fused_lstm(x, h0, c0.float(), weight_ih, weight_hh, bias_ih, bias_hh)

    return layer

