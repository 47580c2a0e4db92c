"""Generating text from a trained model: greedy or multinomial, with temperature, top-k and top-p.

The order of the filters is the usual one: divide the logits by the temperature, keep the k most
likely words (exactly k, ties at the k-th broken by torch.topk), then keep the smallest set of
words whose probability mass reaches p (the most likely word at least, however small p).
"""
from __future__ import annotations

import torch
from torch import Tensor

from fastlm.data import EOS, UNK, Dictionary
from fastlm.device import check_seed
from fastlm.errors import UsageError
from fastlm.models.lm import RNNLM

STRATEGIES = ("multinomial", "greedy")


def check_sampling(strategy: str, temperature: float, top_k: int | None, top_p: float | None) -> None:
    if strategy not in STRATEGIES:
        raise UsageError(f"unknown strategy {strategy!r}: choose multinomial or greedy")
    if not temperature > 0:
        raise UsageError(f"temperature must be > 0, got {temperature} (use --strategy greedy for the arg-max)")
    if top_k is not None and top_k < 1:
        raise UsageError(f"top-k must be at least 1, got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise UsageError(f"top-p must be in (0, 1], got {top_p}")


def filter_logits(logits: Tensor, top_k: int | None = None, top_p: float | None = None) -> Tensor:
    """Set to -inf every logit outside the top k and outside the smallest set with mass ≥ top_p.

    Exactly k words survive top-k: words tied with the k-th are kept or dropped as torch.topk
    picks them, so that a flat stretch of logits cannot let more than k words through.
    """
    if top_k is not None and top_k < logits.shape[-1]:
        top = torch.topk(logits, top_k, dim=-1)
        logits = torch.full_like(logits, float("-inf")).scatter(-1, top.indices, top.values)
    if top_p is not None and top_p < 1:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs  # mass of the strictly more likely words
        drop = mass_before >= top_p
        drop[..., 0] = False  # against float32 masses a p like 1e-50 is 0, and would drop every word
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return logits


def next_words(logits: Tensor, strategy: str = "multinomial", temperature: float = 1.0,
               top_k: int | None = None, top_p: float | None = None, generator: torch.Generator | None = None
               ) -> Tensor:
    """One word per row of `logits` (N, V)."""
    if strategy == "greedy":
        return logits.argmax(dim=-1)
    # Shifted so the largest logit is 0, in float64: any temperature > 0, however small, then gives
    # 0 for the best word and finite or -inf for the rest, never inf/inf (and the same as before at 1).
    logits = logits.double()
    scaled = ((logits - logits.amax(dim=-1, keepdim=True)) / temperature).float()
    probs = torch.softmax(filter_logits(scaled, top_k, top_p), dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def encode_prompt(words: list[str], dictionary: Dictionary) -> list[int]:
    """Word ids of a prompt; words outside the vocabulary read as <unk> (an error without one)."""
    unknown = [w for w in words if w not in dictionary]
    if unknown and UNK not in dictionary:
        raise UsageError(f"prompt words not in the vocabulary and no {UNK} to map them to: {', '.join(unknown)}")
    return [dictionary.word2idx.get(w, dictionary.word2idx.get(UNK)) for w in words]


@torch.no_grad()
def generate(model: RNNLM, num_words: int, *, num_samples: int = 1, prompt: list[int] | None = None,
             strategy: str = "multinomial", temperature: float = 1.0, top_k: int | None = None,
             top_p: float | None = None, seed: int | None = None, eos_id: int | None = None) -> list[list[int]]:
    """`num_samples` sequences of `num_words` new word ids, generated together as one batch.

    With a prompt, the prompt is fed first to set the state; without one, the first word of each
    sample is drawn uniformly from the vocabulary. With `eos_id`, a sample ends at its first <eos>.
    """
    check_sampling(strategy, temperature, top_k, top_p)
    if seed is not None:
        check_seed(seed)
    if num_words < 1 or num_samples < 1:
        raise UsageError(f"num-words and num-samples must be at least 1, got {num_words} and {num_samples}")
    model.eval()
    device = model.linear.weight.device
    generator = torch.Generator(device=device)
    generator.manual_seed(seed if seed is not None else int(torch.randint(2**62, ()).item()))
    choose = dict(strategy=strategy, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)

    state = model.init_state(num_samples)
    if prompt:
        logits, state = model(torch.tensor([prompt], device=device).expand(num_samples, -1), state)
        word = next_words(logits.view(num_samples, len(prompt), -1)[:, -1], **choose)
    else:
        word = torch.randint(model.embed.num_embeddings, (num_samples,), device=device, generator=generator)
    words = [word]
    finished = word == eos_id if eos_id is not None else None
    for _ in range(num_words - 1):
        if finished is not None and bool(finished.all()):
            break
        logits, state = model(word[:, None], state)
        word = next_words(logits, **choose)
        words.append(word)
        if finished is not None:
            finished |= word == eos_id
    samples = torch.stack(words, dim=1).tolist()
    if eos_id is not None:
        samples = [s[: s.index(eos_id) + 1] if eos_id in s else s for s in samples]
    return samples


def to_text(ids: list[int], dictionary: Dictionary) -> str:
    """Words joined by spaces, each <eos> a line break."""
    lines, line = [], []
    for i in ids:
        word = dictionary.idx2word[i]
        if word == EOS:
            lines.append(" ".join(line))
            line = []
        else:
            line.append(word)
    if line:
        lines.append(" ".join(line))
    return "\n".join(lines) + ("\n" if ids and dictionary.idx2word[ids[-1]] == EOS else "")
