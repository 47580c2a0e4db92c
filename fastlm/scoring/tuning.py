"""Choosing dynamic evaluation's and the cache's hyper-parameters on the validation split, then scoring
the test split once with the values chosen.

The search is a grid: no adaptation and each dynamic-evaluation setting, one pass over validation
each, every pass also scoring every cache setting (`adaptive_pass` shares the forward). The lowest
validation loss picks the values of each method (plain, cache, dynamic, dynamic + cache); test is
then scored with them, two or three passes. A value given on the command line is held fixed.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Callable

from torch import Tensor

from fastlm.models.lm import RNNLM
from fastlm.scoring.adaptive import PassResult, adaptive_pass
from fastlm.scoring.cache import CacheSettings
from fastlm.scoring.dynamic import DynamicSettings
from fastlm.scoring.plain import perplexity
from fastlm.training.progress import duration

# Learning rates in each rule's units (rms: a weight's training-gradient RMS). θ spans the scales of
# hidden states measured here: 1 suited the `small` recipe's 200 units, 0.1 or less the default's 1024.
DYNAMIC_GRID = {
    "sgd": {"lr": (0.5, 1.0, 2.0), "decay": (0.0, 0.002)},
    "rms": {"lr": (1e-4, 2e-4, 4e-4), "decay": (0.0, 0.002)},
}
CACHE_GRID = {"size": (250, 500, 1000), "theta": (0.03, 0.1, 0.3, 1.0), "lam": (0.05, 0.1, 0.15, 0.2)}


def dynamic_candidates(fixed: dict) -> list[DynamicSettings]:
    """The grid's dynamic settings, with the values in `fixed` (DynamicSettings fields) held."""
    rules = [fixed["rule"]] if "rule" in fixed else list(DYNAMIC_GRID)
    found = []
    for rule in rules:
        lrs = [fixed["lr"]] if "lr" in fixed else DYNAMIC_GRID[rule]["lr"]
        decays = [fixed["decay"]] if "decay" in fixed else DYNAMIC_GRID[rule]["decay"]
        found += [DynamicSettings(lr, decay, rule, **{k: v for k, v in fixed.items() if k == "seq_len"})
                  for lr, decay in itertools.product(lrs, decays)]
    return found


def cache_candidates(fixed: dict) -> list[CacheSettings]:
    """The grid's cache settings, with the values in `fixed` (CacheSettings fields) held."""
    values = [[fixed[name]] if name in fixed else CACHE_GRID[name] for name in ("size", "theta", "lam")]
    return [CacheSettings(*combination) for combination in itertools.product(*values)]


@dataclass
class Method:
    """One way of scoring, its values as chosen on validation, and its scores."""
    name: str
    dynamic: DynamicSettings | None
    cache: CacheSettings | None
    valid_loss: float
    test_loss: float | None = None
    test_seconds: float | None = None

    def describe(self) -> str:
        parts = [s.describe() for s in (self.dynamic, self.cache) if s is not None]
        return "; ".join(parts) or "the trained weights"

    def as_json(self) -> dict:
        return {"method": self.name, "dynamic": None if self.dynamic is None else vars(self.dynamic),
                "cache": None if self.cache is None else vars(self.cache),
                "valid_perplexity": perplexity(self.valid_loss), "test_perplexity": perplexity(self.test_loss),
                "test_seconds": self.test_seconds}


@dataclass
class Tuning:
    methods: list[Method]
    grid: list[dict] = field(default_factory=list)  # one row per validation pass
    seconds: float = 0.0


def tune(model: RNNLM, valid: Tensor, test: Tensor, seq_len: int, *, dynamics: list[DynamicSettings],
         caches: list[CacheSettings], rms: list[Tensor] | None, say: Callable[[str], None] = print,
         **pass_options) -> Tuning:
    """Search `dynamics` (and no dynamic evaluation) × `caches` (and no cache) on `valid`, then score
    `test` with each method's choice. `pass_options` go to `adaptive_pass` (graphs, amp_dtype)."""
    said = set()

    def say_once(line: str) -> None:  # a graph fallback would otherwise be told once per pass
        if line not in said:
            said.add(line)
            say(line)

    pass_options["say"] = say_once
    passes = [None, *dynamics]
    say(f"tuning on the validation split: {len(passes)} pass(es), each scoring {len(caches)} cache setting(s) "
        f"as well as none")
    tuning, results = Tuning([]), {}
    for done, settings in enumerate(passes, 1):
        result = adaptive_pass(model, valid, seq_len, dynamic=settings, rms=rms, caches=caches,
                               label=f"valid: {settings.describe() if settings else 'plain'}", **pass_options)
        results[settings] = result
        best_cache = min(caches, key=result.losses.__getitem__, default=None)
        row = {"dynamic": None if settings is None else vars(settings),
               "perplexity": perplexity(result.losses[None]),
               "best_cache": None if best_cache is None else vars(best_cache),
               "perplexity_with_best_cache": None if best_cache is None else perplexity(result.losses[best_cache]),
               "seconds": result.seconds}
        tuning.grid.append(row)
        tuning.seconds += result.seconds
        with_cache = f", with {best_cache.describe()}: {row['perplexity_with_best_cache']:.2f}" if best_cache else ""
        # a dynamic pass's time foretells the others' (the first, plain one is shorter)
        to_come = len(passes) - done
        left = f"; about {duration(result.seconds * to_come)} left" if settings and to_come else ""
        say(f"  {settings.describe() if settings else 'no dynamic evaluation':45} valid perplexity "
            f"{row['perplexity']:.2f}{with_cache} ({result.seconds:.1f} s{left})")
    tuning.methods = _choose(results, caches)
    _score_test(model, test, seq_len, tuning.methods, rms, pass_options)
    return tuning


def _choose(results: dict[DynamicSettings | None, PassResult], caches: list[CacheSettings]) -> list[Method]:
    plain = results[None].losses[None]
    methods = [Method("plain", None, None, plain)]
    if caches:
        best = min(caches, key=results[None].losses.__getitem__)
        methods.append(Method("cache", None, best, results[None].losses[best]))
    adapted = [s for s in results if s is not None]
    if adapted:
        best = min(adapted, key=lambda s: results[s].losses[None])
        methods.append(Method("dynamic", best, None, results[best].losses[None]))
    if adapted and caches:
        loss, d, c = min((results[d].losses[c], i, j) for i, d in enumerate(adapted) for j, c in enumerate(caches))
        methods.append(Method("dynamic + cache", adapted[d], caches[c], loss))
    return methods


def _score_test(model: RNNLM, test: Tensor, seq_len: int, methods: list[Method], rms, pass_options: dict) -> None:
    """Score each method on test; methods sharing a dynamic setting share a pass."""
    for dynamic in dict.fromkeys(m.dynamic for m in methods):
        sharing = [m for m in methods if m.dynamic == dynamic]
        caches = [m.cache for m in sharing if m.cache is not None]
        label = f"test: {dynamic.describe() if dynamic else 'plain'}"
        result = adaptive_pass(model, test, seq_len, dynamic=dynamic, rms=rms, caches=caches, label=label,
                               **pass_options)
        for m in sharing:
            m.test_loss, m.test_seconds = result.losses[m.cache], result.seconds


def table(tuning: Tuning) -> str:
    """The methods as a Markdown table: values chosen on validation, perplexities, test time."""
    lines = ["| method | chosen on validation | valid perplexity | test perplexity | test time |",
             "| --- | --- | --- | --- | --- |"]
    for m in tuning.methods:
        lines.append(f"| {m.name} | {m.describe()} | {perplexity(m.valid_loss):.2f} | "
                     f"{perplexity(m.test_loss):.2f} | {m.test_seconds:.1f} s |")
    return "\n".join(lines)
