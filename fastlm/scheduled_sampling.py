"""Training without (or with less) teacher forcing: scheduled sampling, Bengio et al. 2015.

Inside each TBPTT window the input at step t+1 is the true word with probability P, otherwise the
model's own prediction from step t. No gradient flows through that choice (a word id is not
differentiable); gradients do flow through the recurrence, and the window still ends in one
optimizer step, as in normal training. P = 1 is teacher forcing, P = 0 fully free running.

The schedules decay P over training progress s ∈ [0, 1] (the fraction of planned steps done),
starting from the P given:
    constant          P
    linear            P · (1 − s)
    exponential       P · 0.01^s                  (down to 1% of P at the end)
    inverse-sigmoid   P · 1 / (1 + e^{10(s − ½)}) (the slow–fast–slow decay of the paper)
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from fastlm.errors import UsageError
from fastlm.optimizer import update

SCHEDULES = ("constant", "linear", "exponential", "inverse-sigmoid")
FREE_RUNNING_TOKENS = ("argmax", "sample")


def teacher_forcing_probability(start: float, schedule: str, progress: float) -> float:
    s = min(max(progress, 0.0), 1.0)
    if schedule == "constant":
        return start
    if schedule == "linear":
        return start * (1.0 - s)
    if schedule == "exponential":
        return start * 0.01**s
    if schedule == "inverse-sigmoid":
        return start / (1.0 + math.exp(10.0 * (s - 0.5)))
    raise UsageError(f"unknown teacher-forcing schedule {schedule!r}: choose {', '.join(SCHEDULES)}")


def free_running_step(model, optimizer, inputs, targets, state, clip: float, teacher_forcing: float,
                      token: str = "argmax"):
    """One TBPTT window run step by step, feeding back predictions with probability 1 − P.

    Returns the loss (a device tensor) and the new state.
    """
    state = tuple(s.detach() for s in state)
    batch, steps = inputs.shape
    word = inputs[:, 0]
    step_logits = []
    for t in range(steps):
        logits, state = model(word[:, None], state)  # (B, V): one time step, state carried with its graph
        step_logits.append(logits)
        if t + 1 == steps:
            break
        with torch.no_grad():
            if token == "argmax":
                predicted = logits.argmax(dim=-1)
            else:
                predicted = torch.multinomial(torch.softmax(logits.float(), dim=-1), 1).squeeze(-1)
            use_truth = torch.rand(batch, device=inputs.device) < teacher_forcing
            word = torch.where(use_truth, inputs[:, t + 1], predicted)
    logits = torch.stack(step_logits, dim=1).reshape(batch * steps, -1)
    loss = F.cross_entropy(logits, targets.reshape(-1))
    update(model, optimizer, loss, clip)
    return loss, state
