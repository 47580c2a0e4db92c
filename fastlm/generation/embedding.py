"""Word vectors of a trained model: cosine distances, nearest neighbours and analogies.

Two matrices hold word vectors: the input embedding (`embed.weight`, V × E) and the output layer
(`linear.weight`, V × H), whose row w is the direction the last hidden state must point to predict
w. All arithmetic here is float64.
"""
from __future__ import annotations

import difflib

import torch
from torch import Tensor

from fastlm.data import Dictionary
from fastlm.errors import UsageError
from fastlm.models.lm import RNNLM

MATRICES = ("input", "output")


def word_vectors(model: RNNLM, matrix: str = "input") -> Tensor:
    if matrix not in MATRICES:
        raise UsageError(f"unknown matrix {matrix!r}: choose input or output")
    weight = model.embed.weight if matrix == "input" else model.linear.weight
    return weight.detach().to("cpu", torch.float64)


def word_id(dictionary: Dictionary, word: str) -> int:
    """The id of `word`, or a ValueError naming the closest words of the vocabulary."""
    if word in dictionary:
        return dictionary.word2idx[word]
    close = difflib.get_close_matches(word, dictionary.idx2word, n=5, cutoff=0.6)
    hint = f"closest: {', '.join(close)}" if close else "no close match"
    raise UsageError(f"{word!r} is not in the vocabulary ({hint})")


def unit_rows(vectors: Tensor) -> Tensor:
    return vectors / vectors.norm(dim=-1, keepdim=True).clamp_min(1e-300)


def cosine_distance(vectors: Tensor, a: int, b: int) -> float:
    """1 − cosine similarity of two rows."""
    return 1.0 - float(unit_rows(vectors[a]) @ unit_rows(vectors[b]))


def nearest(vectors: Tensor, query: Tensor, k: int, exclude: set[int]) -> list[tuple[int, float]]:
    """The k rows most cosine-similar to `query`, skipping `exclude`: (id, similarity), best first."""
    if k < 1:
        raise UsageError(f"k must be at least 1, got {k}")
    similarity = unit_rows(vectors) @ unit_rows(query)
    similarity[list(exclude)] = float("-inf")
    k = min(k, vectors.shape[0] - len(exclude))
    values, ids = torch.topk(similarity, k)
    return list(zip(ids.tolist(), values.tolist()))


def neighbors(vectors: Tensor, word: int, k: int = 10) -> list[tuple[int, float]]:
    return nearest(vectors, vectors[word], k, {word})


def analogy(vectors: Tensor, a: int, b: int, c: int, k: int = 5) -> list[tuple[int, float]]:
    """Words d with b − a + c ≈ d ("a is to b as c is to d") by 3CosAdd, the three query words excluded.

    3CosAdd (Mikolov et al. 2013; Levy & Goldberg 2014; gensim's most_similar): the query is
    b̂ − â + ĉ of the unit vectors, and the similarity reported is the cosine to it. Unnormalised,
    the longest of a, b, c (often a frequent word) would set the query's direction by itself.
    """
    unit = unit_rows(vectors[[a, b, c]])
    return nearest(vectors, unit[1] - unit[0] + unit[2], k, {a, b, c})
