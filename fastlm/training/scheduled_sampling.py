"""Training without (or with less) teacher forcing: scheduled sampling, Bengio et al. 2015.

At every step the input is the true word with probability P, otherwise the model's own prediction
from the step before. That holds across window edges too: a window's first input may be the
prediction the previous window ended with, so P = 0 is free running through the whole epoch (only
an epoch's first word is the true one). No gradient flows through that choice (a word id is not
differentiable); gradients do flow through the recurrence, and each window still ends in one
optimizer step, as in normal training. P = 1 is teacher forcing.

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

from fastlm.training.optimizer import update

# P after a fraction s of the planned steps, for each --teacher-forcing-schedule (config.SCHEDULES).
PROBABILITY = {
    "constant": lambda start, s: start,
    "linear": lambda start, s: start * (1.0 - s),
    "exponential": lambda start, s: start * 0.01**s,
    "inverse-sigmoid": lambda start, s: start / (1.0 + math.exp(10.0 * (s - 0.5))),
}


def teacher_forcing_probability(start: float, schedule: str, progress: float) -> float:
    """P at `progress` (the fraction of planned steps done) for a schedule `check_config` accepted."""
    return PROBABILITY[schedule](start, min(max(progress, 0.0), 1.0))


def free_running_step(model, optimizer, inputs, targets, state, clip: float, teacher_forcing: float,
                      token: str = "argmax", fed_back: torch.Tensor | None = None):
    """One TBPTT window, each input the true word with probability P, else the model's prediction.

    `fed_back` is the prediction the previous window ended with (B,), a candidate for this window's
    first input; None at the start of an epoch, where the true word is fed. Returns the loss (a
    device tensor), the new state and the prediction this window ends with.

    Two passes: one step at a time without a graph, to choose the words fed; then the whole window
    at once on those words, as a teacher-forced window runs. The choice carries no gradient, so the
    second pass has exactly the gradient of the step-by-step graph, at about half its cost (one
    fused LSTM call and one output-layer product instead of a graph of T small ones; figures in
    benchmarks/README.md). With dropout
    the two passes draw their own masks: the words fed are the predictions of the model with
    dropout, under other masks than the ones the window is trained with.
    """
    state = tuple(s.detach() for s in state)
    fed, predicted = _words_fed(model, inputs, state, teacher_forcing, token, fed_back)
    logits, state = model(fed, state)
    loss = F.cross_entropy(logits, targets.reshape(-1))
    update(model, optimizer, loss, clip)
    return loss, state, predicted


@torch.no_grad()
def _words_fed(model, inputs, state, teacher_forcing: float, token: str, fed_back: torch.Tensor | None):
    """The window's inputs (B, T) as fed, and the prediction after its last step (B,)."""
    word = inputs[:, 0] if fed_back is None else _mix(inputs[:, 0], fed_back, teacher_forcing)
    fed = [word]
    for t in range(inputs.shape[1]):
        logits, state = model(word[:, None], state)  # (B, V): one time step
        predicted = _predicted_word(logits, token)
        if t + 1 < inputs.shape[1]:
            word = _mix(inputs[:, t + 1], predicted, teacher_forcing)
            fed.append(word)
    return torch.stack(fed, dim=1), predicted


def _predicted_word(logits: torch.Tensor, token: str) -> torch.Tensor:
    if token == "argmax":
        return logits.argmax(dim=-1)
    return torch.multinomial(torch.softmax(logits.float(), dim=-1), 1).squeeze(-1)


def _mix(truth: torch.Tensor, predicted: torch.Tensor, teacher_forcing: float) -> torch.Tensor:
    """Per row, the true word with probability P, else the prediction."""
    use_truth = torch.rand(truth.shape[0], device=truth.device) < teacher_forcing
    return torch.where(use_truth, truth, predicted)
