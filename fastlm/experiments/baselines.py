"""What the reports' numbers are read against: a model that only counts words, an untrained model,
and the cosine distance of two words whose vectors carry nothing but their random initialisation.

A perplexity means little alone. Counting word frequencies in the training text (a unigram model)
already gives about 690 on PTB's validation text, and an untrained model gives about the vocabulary
size, 10,000: a trained model worse than the unigram has learnt less than a word count. A cosine
distance means little alone too: two independent random d-dimensional vectors are at 1 ± 1/√d.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from fastlm.generation.embedding import unit_rows


def unigram_loss(train: Tensor, rows: Tensor, vocab_size: int) -> float:
    """Mean cross-entropy per token of batchified `rows` (R, N) under the word frequencies counted in
    `train`, the targets those `scoring.evaluate` scores a model on: every token after a row's first.
    A word `train` never holds gets probability 0, so an infinite loss: with a vocabulary built from
    train.txt that cannot happen."""
    counts = torch.bincount(train.reshape(-1).cpu(), minlength=vocab_size).double()
    log_probs = (counts / counts.sum()).log()
    return float(-log_probs[rows.cpu()[:, 1:].reshape(-1)].mean())


def closed_form_distance(dim: int) -> tuple[float, float]:
    """Mean and standard deviation of the cosine distance of two independent isotropic random vectors
    in `dim` dimensions: their cosine has mean 0 and variance exactly 1/dim (the cosine of a random
    unit vector with a fixed one is one coordinate of a uniform point on the sphere, and the dim
    squared coordinates, alike, sum to 1), so the distance is 1 ± 1/√dim."""
    return 1.0, 1.0 / math.sqrt(dim)


def distance_spread(vectors: Tensor, pairs: int = 20000, seed: int = 0) -> tuple[float, float]:
    """Mean and standard deviation of the cosine distance over `pairs` random pairs of distinct rows.

    On an untrained matrix this is the random reference a trained distance is read against: torch
    draws an embedding's coordinates from N(0, 1) and an output layer's from a uniform around 0,
    independent and symmetric about 0, and for any such vectors the cosine has mean 0 and variance
    exactly 1/dim (cross terms vanish by symmetry), so it estimates `closed_form_distance`."""
    generator = torch.Generator().manual_seed(seed)
    first = torch.randint(0, vectors.shape[0], (pairs,), generator=generator)
    shift = torch.randint(1, vectors.shape[0], (pairs,), generator=generator)  # never the same row
    second = (first + shift) % vectors.shape[0]
    unit = unit_rows(vectors.to(torch.float64))
    distances = 1.0 - (unit[first] * unit[second]).sum(dim=-1)
    return float(distances.mean()), float(distances.std())
