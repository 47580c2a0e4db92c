"""How far apart two words' vectors are, read against what chance alone gives, written up as a
report folder (report.md, report.json).

A cosine distance means little alone: two independent random d-dimensional vectors are at
1 ± 1/√d, and an input row moves only when its word is read, so a rare word's row still carries
its random initialisation. For each checkpoint the report sets each pair's distance, in the input
embedding and in the output layer (whose every row every step updates), beside that random
reference, in closed form and measured on the matrix the run started from (rebuilt from the
checkpoint's config and seed), and beside the typical pair of the trained matrix. It says how far
each word's rows moved from their start and how often the word occurs in train.txt, and lists the
nearest neighbours of a few frequent words, with the similarity a random matrix gives a word's
nearest row beside them, so that what training changed is visible.
"""
from __future__ import annotations

import json
import statistics
from pathlib import Path

import torch
from torch import Tensor

from fastlm.errors import UsageError
from fastlm.experiments.baselines import closed_form_distance, distance_spread
from fastlm.experiments.common import fresh_folder
from fastlm.experiments.trained import Trained, html_escaped, setting
from fastlm.generation.embedding import MATRICES, cosine_distance, neighbors, word_id, word_vectors
from fastlm.models.lm import RNNLM

# Words whose neighbours a reader can judge, all frequent in Penn Treebank: a noun with near
# synonyms (firm, concern), a number word (billion), a reporting verb (says), a weekday, a price
# verb (fell, jumped) and a pronoun. A trained matrix groups them with their kind; a random one cannot.
PROBE_WORDS = ("company", "million", "said", "monday", "rose", "he")
OUTSIDE = 2.0  # a distance more than this many standard deviations from a spread's mean is outside it
# Nearest neighbours count as grouped by training only when their cosine similarity beats the nearest
# row of a random matrix (about 0.3 for 10,000 rows of 128-d) by this much: a hair above is chance.
NEIGHBOUR_MARGIN = 0.1


def initial_model(config: dict, vocab_size: int) -> RNNLM:
    """The untrained model the trainer started from: its seed, then the same construction."""
    with torch.random.fork_rng(devices=[]):  # the caller's random state stays as it was
        torch.manual_seed(config["seed"])
        return RNNLM.from_config(config, vocab_size)


def pair_facts(trained: Tensor, initial: Tensor, a: int, b: int, random: tuple[float, float],
               typical: tuple[float, float]) -> dict:
    """One pair in one matrix, read against the random spread (`distance_spread` of the untrained
    matrix) and the typical pair (of the trained one)."""
    distance = cosine_distance(trained, a, b)
    (random_mean, random_sd), (typical_mean, typical_sd) = random, typical
    return {"dim": trained.shape[1], "distance": distance, "before_training": cosine_distance(initial, a, b),
            "closed_form": closed_form_distance(trained.shape[1]), "random": (random_mean, random_sd),
            "typical": (typical_mean, typical_sd), "z_random": (distance - random_mean) / random_sd,
            "z_typical": (distance - typical_mean) / typical_sd}


def row_change(trained: Tensor, initial: Tensor, word: int) -> dict:
    """How far a word's row moved: its change relative to its initial length, and the cosine of the two."""
    change = float((trained[word] - initial[word]).norm() / initial[word].norm())
    return {"relative_change": change, "cosine_to_initial": 1.0 - cosine_distance(torch.stack(
        [trained[word], initial[word]]), 0, 1), "unchanged": bool(torch.equal(trained[word], initial[word]))}


def checkpoint_facts(trained: Trained, pairs: list[tuple[str, str]], probes: list[str], k: int, spread_pairs: int,
                     seed: int) -> dict:
    """Everything the report says about one checkpoint, its conclusions included."""
    dictionary = trained.dictionary
    untrained = initial_model(trained.config, len(dictionary))
    counts = torch.bincount(trained.corpus.train, minlength=len(dictionary))
    words = list(dict.fromkeys([w for pair in pairs for w in pair] + probes))
    ids = {word: word_id(dictionary, word) for word in words}
    facts: dict = {"file": str(trained.file), "setting": setting(trained), "pairs": {}, "words": {}, "neighbors": {}}
    for matrix in MATRICES:
        after, before = word_vectors(trained.model, matrix), word_vectors(untrained, matrix)
        spreads = distance_spread(before, spread_pairs, seed), distance_spread(after, spread_pairs, seed)
        for a, b in pairs:
            facts["pairs"].setdefault(f"{a}/{b}", {})[matrix] = pair_facts(after, before, ids[a], ids[b], *spreads)
        for word in words:
            facts["words"].setdefault(word, {"train_count": int(counts[ids[word]])})[matrix] = row_change(
                after, before, ids[word])
            facts["neighbors"].setdefault(word, {})[matrix] = {
                "trained": [(dictionary.idx2word[i], s) for i, s in neighbors(after, ids[word], k)],
                "random_nearest": neighbors(before, ids[word], 1)[0][1]}
    facts["conclusions"] = conclusions(facts, probes)
    return facts


# -- the report ----------------------------------------------------------------------------------

def compare_embedding(checkpoints: list[Trained], out_dir: Path, pairs: list[tuple[str, str]],
                      probes: tuple[str, ...] | list[str] = PROBE_WORDS, k: int = 8, spread_pairs: int = 20000,
                      seed: int = 0, note: str | None = None) -> dict:
    """The distances, row changes and neighbours of each checkpoint; writes report.md and report.json."""
    probes = list(probes)
    if k < 1 or spread_pairs < 2:
        raise UsageError(f"-k must be at least 1 and --spread-pairs at least 2, got {k} and {spread_pairs}")
    for trained in checkpoints:  # an unknown word stops before the report folder is made
        for word in [w for pair in pairs for w in pair] + probes:
            word_id(trained.dictionary, word)
    out_dir = fresh_folder(out_dir)
    report = {"note": note, "parameters": {"pairs": ["/".join(p) for p in pairs], "probes": probes, "k": k,
                                           "spread_pairs": spread_pairs, "seed": seed},
              "checkpoints": [checkpoint_facts(t, pairs, probes, k, spread_pairs, seed) for t in checkpoints]}
    (out_dir / "report.md").write_text(html_escaped("\n".join(_markdown(report)) + "\n"))
    (out_dir / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    return report


def conclusions(facts: dict, probes: list[str]) -> list[str]:
    sentences = []
    for pair, by_matrix in facts["pairs"].items():
        for matrix, f in by_matrix.items():
            sentences.append(_pair_sentence(pair, matrix, f))
    first = next(iter(facts["pairs"].values()), {})
    for matrix, f in first.items():
        if f["typical"][0] < f["random"][0] - OUTSIDE * f["random"][1]:
            sentences.append(
                f"The trained {_name(matrix)}'s rows share a common direction: a typical pair is at "
                f"{f['typical'][0]:.4f}, not near 1, so a pair's closeness there is read against the typical pair, "
                "not against chance; rare words, whose rows are mostly that direction, are all near each other.")
    for word, f in facts["words"].items():
        sentences.append(_word_sentence(word, f))
    for matrix in MATRICES:
        found = [facts["neighbors"][w][matrix] for w in probes]
        if found:
            nearest = statistics.fmean(n["trained"][0][1] for n in found)
            chance = statistics.fmean(n["random_nearest"] for n in found)
            sentences.append(
                f"In the {_name(matrix)}, the nearest neighbour of {', '.join(repr(w) for w in probes)} has a cosine "
                f"similarity of {nearest:.3f} on average, against {chance:.3f} for the nearest row of the "
                f"untrained matrix (the most chance gives a word's nearest neighbour): "
                + (f"more than {NEIGHBOUR_MARGIN:g} above it, so training has grouped these words."
                   if nearest > chance + NEIGHBOUR_MARGIN else
                   f"not more than {NEIGHBOUR_MARGIN:g} above it, so these rows show no grouping beyond chance."))
    return sentences


def _name(matrix: str) -> str:
    return "input embedding" if matrix == "input" else "output layer"


def _pair_sentence(pair: str, matrix: str, f: dict) -> str:
    random_mean, random_sd = f["random"]
    typical_mean, typical_sd = f["typical"]
    inside = ("inside the random spread" if abs(f["z_random"]) <= OUTSIDE else
              f"outside the random spread (more than {OUTSIDE:g} standard deviations)")
    relation = "closer than" if f["z_typical"] < 0 else "farther than"
    if abs(f["z_typical"]) <= OUTSIDE:
        relation = f"within {OUTSIDE:g} standard deviations of"
    return (f"In the {_name(matrix)} ({f['dim']}-d), {pair} is at {f['distance']:.4f} (before training "
            f"{f['before_training']:.4f}). Random pairs of the untrained matrix are at {random_mean:.4f} ± "
            f"{random_sd:.4f} (closed form 1 ± {f['closed_form'][1]:.4f}): the pair is {f['z_random']:+.2f} standard "
            f"deviations from that mean, {inside}. A typical pair of the trained matrix is at {typical_mean:.4f} ± "
            f"{typical_sd:.4f}; the pair is {relation} it ({f['z_typical']:+.2f} standard deviations).")


def _word_sentence(word: str, f: dict) -> str:
    moved = []
    for matrix in MATRICES:
        change = f[matrix]
        moved.append(f"its {_name(matrix)} row is exactly the initial one" if change["unchanged"] else
                     f"its {_name(matrix)} row moved by {change['relative_change']:.0%} of its initial length "
                     f"(cosine {change['cosine_to_initial']:.3f} to it)")
    return f"{word!r} occurs {f['train_count']:,} times in train.txt; " + "; ".join(moved) + "."


def _markdown(report: dict) -> list[str]:
    p = report["parameters"]
    lines = ["# The distance of two words' vectors, against chance", "",
             f"Pairs: {', '.join(p['pairs'])}. Cosine distance is 1 − cosine similarity, in float64. Random "
             f"reference: the mean ± standard deviation over {p['spread_pairs']:,} random pairs of distinct rows "
             f"(seed {p['seed']}) of the untrained matrix, rebuilt from the checkpoint's config and seed as the "
             "trainer built it, beside the closed form 1 ± 1/√d for independent isotropic vectors; the typical pair: "
             "the same over the trained matrix. z: (distance − mean) / standard deviation. Output-layer rows are the "
             "weights only (no bias). Neighbours: the words of highest cosine similarity, the word itself excluded.",
             *(["", report["note"]] if report["note"] else [])]
    for facts in report["checkpoints"]:
        lines += ["", f"## {facts['file']}", "", facts["setting"], "", "### Distances", "",
                  "| pair | matrix | distance | before training | random: closed form | random: untrained matrix | "
                  "z vs random | typical trained pair | z vs typical |", "|" + " --- |" * 9]
        for pair, by_matrix in facts["pairs"].items():
            for matrix, f in by_matrix.items():
                lines.append(f"| {pair} | {matrix} ({f['dim']}-d) | {f['distance']:.4f} | {f['before_training']:.4f} | "
                             f"1 ± {f['closed_form'][1]:.4f} | {f['random'][0]:.4f} ± {f['random'][1]:.4f} | "
                             f"{f['z_random']:+.2f} | {f['typical'][0]:.4f} ± {f['typical'][1]:.4f} | "
                             f"{f['z_typical']:+.2f} |")
        lines += ["", "### How far each word's rows moved from their initial values", "",
                  "| word | occurrences in train.txt | input: change / initial length | input: cosine to initial | "
                  "output: change / initial length | output: cosine to initial |", "|" + " --- |" * 6]
        for word, f in facts["words"].items():
            lines.append(f"| {word} | {f['train_count']:,} | " + " | ".join(
                f"{f[m]['relative_change']:.3f} | {f[m]['cosine_to_initial']:.3f}" for m in MATRICES) + " |")
        for matrix in MATRICES:
            lines += ["", f"### Nearest neighbours, {_name(matrix)}", "",
                      f"| word | {p['k']} nearest (cosine similarity) | nearest in the untrained matrix |",
                      "| --- | --- | --- |"]
            for word, by_matrix in facts["neighbors"].items():
                found = by_matrix[matrix]
                shown = ", ".join(f"{w} ({s:.2f})" for w, s in found["trained"])
                lines.append(f"| {word} | {shown} | {found['random_nearest']:.2f} |")
        lines += ["", "### Conclusions", "", *(f"- {sentence}" for sentence in facts["conclusions"])]
    lines += ["", "## What this does not show", "",
              "- The spread over training seeds: each checkpoint is one run. The random references are spreads over "
              "word pairs of one matrix, not over runs (the teacher-forcing report repeats the pair over seeds).",
              f"- Their own sampling error: {p['spread_pairs']:,} pairs give the mean to about "
              f"sd/√{p['spread_pairs']:,}.",
              "- Whether the neighbours are right: they are listed for reading, not scored against a word-similarity "
              "benchmark; cosine similarity ignores the vectors' lengths and the output layer's bias."]
    return lines
