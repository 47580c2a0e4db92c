"""One pass over a split that adapts as it reads: dynamic evaluation, a continuous cache, or both.

Scoring stays exact: each token is scored by the model as it was before it learnt from that token,
and by a cache that holds only the tokens before it. One window is

    forward → update the weights (dynamic evaluation: one `TrainStep`, which keeps its forward's
    outputs, computed before its update) → score those outputs: log p_model, then each cache
    setting's mixture → the window enters the cache

Every cache setting asked for is scored in the same pass (the forward is shared), which makes the
tuning grid cheap: its cost is one pass per dynamic-evaluation setting. The weights are put back
after the pass; nothing is written.
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

from fastlm.data import eval_windows
from fastlm.device import autocast
from fastlm.models.lm import RNNLM, learning_without_dropout
from fastlm.scoring.cache import CacheSettings, Memory, cache_log_prob, mixed_log_prob
from fastlm.scoring.dynamic import DecayToTrained, DynamicSettings
from fastlm.training.graphs import GraphAPI
from fastlm.training.step import TrainStep, try_capture


@dataclass
class PassResult:
    losses: dict[CacheSettings | None, float]  # mean cross-entropy per token; None: without a cache
    tokens: int
    seconds: float
    token_losses: dict[CacheSettings | None, Tensor] | None = None  # −log p of each target, (B, L−1)


def adaptive_pass(model: RNNLM, data: Tensor, seq_len: int, *, dynamic: DynamicSettings | None = None,
                  rms: list[Tensor] | None = None, caches: Sequence[CacheSettings] = (),
                  amp_dtype: torch.dtype | None = None, graphs: GraphAPI | None = None, label: str = "",
                  keep_token_losses: bool = False, say: Callable[[str], None] = print) -> PassResult:
    """Score a batchified split (B, L), every token after each row's first, adapting as configured.

    `seq_len`: the window length (with `dynamic`, its segments' `seq_len` is used instead). `rms`:
    `gradient_rms`'s ρ, for the rms rule. The result has the loss without a cache and with each of
    `caches` (and with `keep_token_losses`, each token's). With `graphs`, dynamic evaluation's step is
    captured (and checked, falling back to eager steps with a line saying why)."""
    started = time.perf_counter()
    if dynamic is not None:
        seq_len = dynamic.seq_len
    windows = list(eval_windows(data, seq_len))
    if dynamic is not None and windows[0][0].shape[1] < seq_len:
        raise ValueError(f"segments of {seq_len} tokens are longer than the rows ({data.shape[1] - 1} tokens to "
                         "score): nothing would be learnt")
    optimizer = step = state = None
    scorer = _Scorer(model, data, caches, keep_token_losses)
    with contextlib.ExitStack() as stack:
        stack.enter_context(learning_without_dropout(model) if dynamic is not None else _evaluating(model))
        if dynamic is not None:
            optimizer = DecayToTrained(model.parameters(), dynamic.lr, dynamic.decay,
                                       rms if dynamic.rule == "rms" else None)
            stack.callback(_restore_trained_weights, optimizer)
            step = _adapting_step(model, optimizer, windows[0], amp_dtype, graphs, say)
        for inputs, targets in tqdm(windows, desc=label or "scoring", unit="window", disable=None, leave=False):
            if step is not None and inputs.shape[1] == seq_len:
                step.step(inputs, targets)
                logits, features = step.outputs  # a graph's output memory: scored before the next replay
                scorer.score(logits, features, targets)
                step.detach_state()
                state = step.state
            else:  # a short last window: only scored, nothing follows it
                with torch.no_grad(), autocast(data.device.type, amp_dtype):
                    logits, state, features = model(inputs, state, return_features=True)
                scorer.score(logits, features, targets)
    tokens = sum(t.numel() for _, t in windows)
    losses = {key: total.item() / tokens for key, total in scorer.totals.items()}
    token_losses = {key: torch.cat(parts, 1) for key, parts in scorer.kept.items()} if keep_token_losses else None
    return PassResult(losses, tokens, time.perf_counter() - started, token_losses)


class _Scorer:
    """Sums −log p of each window's targets: the model's alone, and mixed with each cache setting."""

    def __init__(self, model: RNNLM, data: Tensor, caches: Sequence[CacheSettings], keep: bool):
        device = model.linear.weight.device
        self.caches = list(caches)
        self.totals = {key: torch.zeros((), dtype=torch.float64, device=device) for key in [None, *self.caches]}
        self.kept = {key: [] for key in self.totals} if keep else None
        # a row never holds more than its own positions: a larger N reads the whole row before t
        longest = min(max((c.size for c in self.caches), default=0), data.shape[1] - 1)
        self.memory = Memory(data.shape[0], model.lstm.hidden_size, longest, device) if self.caches else None

    @torch.no_grad()
    def score(self, logits: Tensor, features: Tensor, targets: Tensor) -> None:
        B, T = targets.shape
        model_log_prob = -F.cross_entropy(logits.float(), targets.reshape(-1), reduction="none").view(B, T)
        self._add(None, model_log_prob)
        if self.memory is None:
            return
        keys, words = self.memory.with_window(features, targets)
        similarity = features.float() @ keys.transpose(1, 2)  # (B, T, M+T): one product for every setting
        for size, theta in dict.fromkeys((c.size, c.theta) for c in self.caches):
            cached, any_key = cache_log_prob(similarity, words, targets, self.memory.filled, size, theta)
            for c in self.caches:
                if (c.size, c.theta) == (size, theta):
                    self._add(c, mixed_log_prob(model_log_prob, cached, any_key, c.lam))
        self.memory.remember(keys, words)

    def _add(self, key: CacheSettings | None, log_prob: Tensor) -> None:
        self.totals[key] -= log_prob.double().sum()
        if self.kept is not None:
            self.kept[key].append(-log_prob)


def _adapting_step(model: RNNLM, optimizer: DecayToTrained, first_window: tuple[Tensor, Tensor],
                   amp_dtype: torch.dtype | None, graphs: GraphAPI | None, say: Callable[[str], None]) -> TrainStep:
    """The trainer's step with the decaying update and no clipping; captured when `graphs` allows."""
    batch_size, seq_len = first_window[0].shape

    def make(graphs_or_none: GraphAPI | None) -> TrainStep:
        return TrainStep(model, optimizer, batch_size, seq_len, math.inf, amp_dtype, graphs_or_none,
                         keep_outputs=True)

    if graphs is not None:
        step, problem = try_capture(lambda: make(graphs), first_window)
        if step is not None:
            return step
        say(f"CUDA graphs off for dynamic evaluation: {problem}; adapting eagerly")
    return make(None)


@contextlib.contextmanager
def _evaluating(model: RNNLM):
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


@torch.no_grad()
def _restore_trained_weights(optimizer: DecayToTrained) -> None:
    for group in optimizer.param_groups:
        for p in group["params"]:
            p.copy_(optimizer.state[p]["trained"])
            p.grad = None
