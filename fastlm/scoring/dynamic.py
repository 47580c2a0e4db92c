"""Dynamic evaluation (Krause et al., 2018, "Dynamic Evaluation of Neural Sequence Models"): the model
keeps learning from the text it scores, each segment scored first, then learnt from, while its
weights decay back toward the trained ones θ₀:

    sgd:  θ ← θ − η·g + λ·(θ₀ − θ)
    rms:  θ ← θ − η·g / ρ + min(1, λ·ρ / ρ̄)·(θ₀ − θ)

g is the gradient of the segment's mean cross-entropy. For `rms`, ρ is each weight's root-mean-square
gradient on training text (segments of the same shape), ρ̄ its mean over all weights: a step is
measured in units of a weight's usual gradient, and weights that usually move more decay faster,
as the paper's RMS rule does.

The update is a torch optimizer of tensor ops only, so that the trainer's `TrainStep` runs it, captured
in a CUDA graph where graphs are available.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from fastlm.data import tbptt_windows
from fastlm.device import autocast
from fastlm.models.lm import RNNLM, learning_without_dropout

RULES = ("sgd", "rms")
RMS_TOKENS = 20_000  # training tokens the gradient RMS is measured on
RMS_FLOOR = 0.1  # a weight's ρ is at least this fraction of its tensor's mean (see `gradient_rms`)


@dataclass(frozen=True)
class DynamicSettings:
    lr: float  # η
    decay: float  # λ
    rule: str = "sgd"
    seq_len: int = 5  # tokens per segment: the model adapts after each

    def describe(self) -> str:
        return f"dynamic {self.rule}, η {self.lr:g}, λ {self.decay:g}, segments of {self.seq_len}"


class DecayToTrained(torch.optim.Optimizer):
    """The update above. `rms`: ρ per parameter (from `gradient_rms`), or None for the `sgd` rule."""

    def __init__(self, params, lr: float, decay: float, rms: list[Tensor] | None = None):
        params = list(params)
        super().__init__(params, dict(lr=lr, decay=decay))
        mean_rms = None if rms is None else (sum(r.sum() for r in rms) / sum(r.numel() for r in rms))
        for index, p in enumerate(params):
            state = self.state[p]
            state["trained"] = p.detach().clone()
            if rms is not None:
                state["inverse_rms"] = 1 / rms[index]
                state["decay_rate"] = (decay * rms[index] / mean_rms).clamp(max=1)

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            states = [self.state[p] for p in params]
            grads = [p.grad for p in params]
            pull = torch._foreach_sub([s["trained"] for s in states], params)  # θ₀ − θ, before the step
            if "inverse_rms" in states[0]:
                torch._foreach_addcmul_(params, grads, [s["inverse_rms"] for s in states], value=-group["lr"])
                torch._foreach_addcmul_(params, pull, [s["decay_rate"] for s in states])
            else:
                torch._foreach_add_(params, grads, alpha=-group["lr"])
                torch._foreach_add_(params, pull, alpha=group["decay"])


def gradient_rms(model: RNNLM, train: Tensor, seq_len: int, tokens: int = RMS_TOKENS,
                 amp_dtype: torch.dtype | None = None) -> list[Tensor]:
    """ρ for each of `model.parameters()`: the root-mean-square gradient of a segment's mean cross-entropy
    over the first `tokens` tokens of the batchified training data `train` (B, L), state carried.

    A weight the sample never moved (the embedding of a word it lacks) would have ρ = 0 and an
    unbounded step: ρ is floored at `RMS_FLOOR` times its tensor's mean."""
    params = list(model.parameters())
    squares = [torch.zeros_like(p) for p in params]
    windows = max(1, tokens // (train.shape[0] * seq_len))
    state, count = None, 0
    with learning_without_dropout(model):
        for inputs, targets in itertools.islice(tbptt_windows(train, seq_len), windows):
            model.zero_grad(set_to_none=True)
            with autocast(train.device.type, amp_dtype):
                logits, state = model(inputs, state)
                loss = F.cross_entropy(logits, targets.reshape(-1))
            loss.backward()
            state = tuple(s.detach() for s in state)
            torch._foreach_addcmul_(squares, [p.grad for p in params], [p.grad for p in params])
            count += 1
        model.zero_grad(set_to_none=True)
    rms = [(s / count).sqrt() for s in squares]
    return [r.clamp_min(RMS_FLOOR * r.mean().item()) for r in rms]
