"""The continuous cache (Grave et al., 2017, "Improving Neural Language Models with a Continuous Cache").

Letters: B rows, T the window's positions, M the memory's length, N a cache size (N ≤ M), H the
hidden size (what the output layer reads), V the vocabulary.

Each row remembers the hidden states it produced and the word that followed each. At position t, with
state h_t, the cache is a distribution over the words that followed the N most recent states:

    p_cache(w) = Σ_i softmax_i(θ · h_t·h_i) · [x_{i+1} = w]     (i over the N positions before t)
    p(w)       = (1 − λ) · p_model(w) + λ · p_cache(w)

A window's T queries meet the memory's M keys and the window's own T keys (each masked to the N
before its position) in one batched product; no Python loop runs per token. With an empty cache (a
row's first token) p is p_model.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class CacheSettings:
    size: int  # N: how many of the row's last positions the cache holds
    theta: float  # θ: how sharply similarity picks among them (0: all equally)
    lam: float  # λ: the cache's weight in the mixture (0: the model alone)

    def describe(self) -> str:
        return f"cache {self.size}, θ {self.theta:g}, λ {self.lam:g}"


class Memory:
    """Each row's last `length` (hidden state, next word) pairs, oldest first; `filled` of them real."""

    def __init__(self, batch_size: int, hidden_size: int, length: int, device: torch.device):
        self.keys = torch.zeros(batch_size, length, hidden_size, device=device)
        self.words = torch.zeros(batch_size, length, dtype=torch.long, device=device)
        self.filled = 0

    def with_window(self, features: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        """Keys (B, M+T, H) and their next words (B, M+T): the memory, then the window's own."""
        return torch.cat([self.keys, features.float()], 1), torch.cat([self.words, targets], 1)

    def remember(self, keys: Tensor, words: Tensor) -> None:
        """Keep the last M of `with_window`'s pairs (the window now read)."""
        length = self.keys.shape[1]
        self.keys, self.words = keys[:, -length:], words[:, -length:]
        self.filled = min(length, self.filled + keys.shape[1] - length)


def _log_weights(similarity: Tensor, memory_filled: int, size: int, theta: float) -> tuple[Tensor, Tensor]:
    """log softmax_i(θ · h_t·h_i) over the keys position t may read, (B, T, M+T), and whether it may
    read any (T,). `similarity` is (B, T, M+T): query t against every key; query t sits at key M + t."""
    T, keys = similarity.shape[1], similarity.shape[2]
    M = keys - T
    t = torch.arange(T, device=similarity.device).unsqueeze(1)
    i = torch.arange(keys, device=similarity.device).unsqueeze(0)
    readable = (i < M + t) & (i >= M + t - size) & (i >= M - memory_filled)  # before t, the last N, real
    scores = (theta * similarity).masked_fill(~readable, -math.inf)
    any_key = readable.any(1)
    log_weights = torch.log_softmax(scores, -1).masked_fill(~any_key[None, :, None], -math.inf)  # no NaN rows
    return log_weights, any_key


def cache_log_prob(similarity: Tensor, key_words: Tensor, targets: Tensor, memory_filled: int, size: int,
                   theta: float) -> tuple[Tensor, Tensor]:
    """log p_cache(target_t), (B, T) (−inf where the cache holds no such word), and whether position t
    has a cache at all, (T,)."""
    log_weights, any_key = _log_weights(similarity, memory_filled, size, theta)
    same_word = key_words.unsqueeze(1) == targets.unsqueeze(2)  # (B, T, M+T)
    return torch.logsumexp(log_weights.masked_fill(~same_word, -math.inf), -1), any_key


def cache_distribution(similarity: Tensor, key_words: Tensor, memory_filled: int, size: int, theta: float,
                       vocab_size: int) -> Tensor:
    """p_cache over the vocabulary, (B, T, V): what `cache_log_prob` reads one entry of (for study and tests)."""
    log_weights, _ = _log_weights(similarity, memory_filled, size, theta)
    B, T, _ = log_weights.shape
    index = key_words.unsqueeze(1).expand(B, T, -1)
    return torch.zeros(B, T, vocab_size, device=similarity.device).scatter_add_(2, index, log_weights.exp())


def mixed_log_prob(model_log_prob: Tensor, cache_log_prob: Tensor, any_key: Tensor, lam: float) -> Tensor:
    """log((1 − λ)·p_model + λ·p_cache), elementwise; the model's alone where the cache is empty.
    λ = 0 returns `model_log_prob` itself, to the last bit."""
    if lam == 0:
        return model_log_prob
    mixed = torch.logaddexp(model_log_prob + math.log1p(-lam), cache_log_prob + math.log(lam))
    return torch.where(any_key, mixed, model_log_prob)
