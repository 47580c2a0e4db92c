"""Scoring a model on a split: mean cross-entropy per token, and perplexity.

The whole split is read as one stream per row, the (h, c) state carried from each window into the
next, so every token after the first of each row is predicted once, from all the text before it.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from fastlm.data import eval_windows
from fastlm.device import autocast
from fastlm.models.lm import RNNLM
from fastlm.training import distributed
from fastlm.training.step import EvalForward


def perplexity(loss: float) -> float:
    """exp(mean cross-entropy), inf where that overflows a float."""
    return math.exp(loss) if loss < 700 else math.inf


@torch.no_grad()
def evaluate(model: RNNLM, data: torch.Tensor, seq_len: int, amp_dtype: torch.dtype | None = None,
             forward: EvalForward | None = None, carry_state: bool = True) -> float:
    """Mean cross-entropy per token over a batchified split, the state carried across windows
    (`carry_state=False`: every window starts from zeros, so no state older than one window is read;
    what a state drifting over a long stream costs shows as the difference).

    The full-length windows run through one `EvalForward`: `forward`, one built for `data`'s
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
        forward = EvalForward(model, data.shape[0], seq_len, amp_dtype)
    forward.reset()
    for inputs, targets in full:
        if not carry_state:
            forward.zero_state()
        forward(inputs, targets)
    total, state = forward.total, (forward.h, forward.c)
    for inputs, targets in windows[len(full):]:
        if not carry_state:
            state = model.init_state(data.shape[0], data.device)
        with autocast(data.device.type, amp_dtype):
            logits, state = model(inputs, state)
            total += F.cross_entropy(logits, targets.reshape(-1), reduction="sum")
    model.train(was_training)
    count = torch.tensor(float(sum(t.numel() for _, t in windows)), dtype=torch.float64, device=data.device)
    distributed.sum_(total)  # under torchrun each rank scored its own rows
    distributed.sum_(count)
    return total.item() / max(count.item(), 1.0)
