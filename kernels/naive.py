"""The LSTM in plain PyTorch: the specification and the oracle for the fused kernel.

Same signature and gate order (i, f, g, o) as `fused_lstm`, batch-first, one layer:

    G_t = x_t W_ihᵀ + b_ih + b_hh + h_{t-1} W_hhᵀ          (B, 4H), split into i f g o
    i, f, o = σ(G_i), σ(G_f), σ(G_o);   g = tanh(G_g)
    c_t = f ⊙ c_{t-1} + i ⊙ g
    h_t = o ⊙ tanh(c_t)

The input projection of all time steps is one matmul before the loop; only `h @ W_hhᵀ` and the
pointwise gates run step by step. Autograd provides the backward pass.
"""
from __future__ import annotations

import torch
from torch import Tensor


def naive_lstm(
    x: Tensor,
    h0: Tensor,
    c0: Tensor,
    weight_ih: Tensor,
    weight_hh: Tensor,
    bias_ih: Tensor,
    bias_hh: Tensor,
) -> tuple[Tensor, Tensor, Tensor]:
    """One LSTM layer.

    Args:
        x: (B, T, E) inputs.
        h0, c0: (B, H) initial state.
        weight_ih: (4H, E); weight_hh: (4H, H); bias_ih, bias_hh: (4H,), in nn.LSTM's layout.

    Returns:
        out (B, T, H): h_t for every step; hN, cN (B, H): the final state.
    """
    x_proj = torch.matmul(x, weight_ih.t()) + (bias_ih + bias_hh)  # (B, T, 4H)
    h, c = h0, c0
    outputs = []
    for t in range(x.shape[1]):
        gates = x_proj[:, t] + torch.matmul(h, weight_hh.t())
        i, f, g, o = gates.chunk(4, dim=1)
        i, f, g, o = torch.sigmoid(i), torch.sigmoid(f), torch.tanh(g), torch.sigmoid(o)
        c = f * c + i * g
        h = o * torch.tanh(c)
        outputs.append(h)
    if outputs:
        out = torch.stack(outputs, dim=1)
    else:
        out = x.new_empty(x.shape[0], 0, h0.shape[1])
    return out, h, c
