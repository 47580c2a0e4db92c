"""From the runs of the teacher-forcing comparison to the facts its conclusion is drawn from:
perplexities (geometric means over seeds), the steps each arm took to reach a target, embedding
distances, and a two-sided t-test at the 5% level for every difference called."""
from __future__ import annotations

import math
import statistics

from fastlm.errors import TrainingError

TF, FR = ARMS = ("teacher-forced", "free-running")
OPTIMIZER_NAMES = {"adam": "Adam", "sgd": "SGD"}
RARE_BELOW = 10  # a word fed fewer times than this in the text trained on is called rare
# Two-sided 5% critical values of Student's t for 1 to 30 degrees of freedom (any statistics
# table); past 30 the value for 30, which errs towards calling no difference.
T_CRITICAL_5 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
                2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
                2.045, 2.042)


# -- from the runs to the facts the conclusion is drawn from -------------------------------------

def _spread(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "sd": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values), "values": list(values)}


def _ppl_spread(values: list[float]) -> dict:
    """Perplexities averaged as their losses are: the geometric mean. One diverging seed (perplexity
    10^5 beside 10^3) would otherwise make the arithmetic mean and its deviation meaningless."""
    return {"mean": geometric_mean(values), "min": min(values), "max": max(values), "values": list(values)}


def geometric_mean(values) -> float:
    return math.exp(statistics.fmean(math.log(v) for v in values))


def _curve_steps(runs: list[dict]) -> list[int]:
    steps = [step for step, _ in runs[0]["valid"]]
    if any([step for step, _ in run["valid"]] != steps for run in runs):
        raise TrainingError("the runs were not evaluated at the same steps: their curves cannot be averaged")
    return steps


def _mean_curve(runs: list[dict]) -> list[tuple[int, float]]:
    _curve_steps(runs)
    steps, means, _, _ = band([run["valid"] for run in runs], geometric_mean)
    return list(zip(steps, means))


def _first_reach(curve: list[tuple[int, float]], target: float) -> int | None:
    # The tolerance: a seed ending exactly at the default target (their geometric mean) reaches it.
    return next((step for step, ppl in curve if ppl <= target * (1 + 1e-12)), None)


def t_test(first: list[float], second: list[float], paired: bool) -> dict | None:
    """Two-sided t-test of first − second at the 5% level: paired, or Welch's; None below two values each.

    `lower` is the arm (TF for `first`, FR for `second`) whose values are significantly lower, or None."""
    if min(len(first), len(second)) < 2:
        return None
    if paired:
        differences = [a - b for a, b in zip(first, second)]
        mean, se2 = statistics.fmean(differences), statistics.variance(differences) / len(differences)
        df = len(differences) - 1
    else:
        v1, v2 = statistics.variance(first) / len(first), statistics.variance(second) / len(second)
        mean, se2 = statistics.fmean(first) - statistics.fmean(second), v1 + v2
        df = len(first) + len(second) - 2  # Welch–Satterthwaite below, when the variances allow it
        if se2 > 0:
            df = se2**2 / (v1**2 / (len(first) - 1) + v2**2 / (len(second) - 1))
    t = mean / math.sqrt(se2) if se2 > 0 else (0.0 if mean == 0 else math.copysign(math.inf, mean))
    df = max(1, int(df))  # fractional Welch degrees of freedom rounded down: the stricter test
    significant = abs(t) > T_CRITICAL_5[min(df, len(T_CRITICAL_5)) - 1]
    return {"t": t, "df": df, "paired": paired, "lower": (TF if t < 0 else FR) if significant else None}


def facts_of_runs(runs, start, pairs, fed, steps, seeds, eval_interval, target_ppl, names) -> dict:
    valid = {arm: [r["valid_ppl"] for r in runs[arm]] for arm in ARMS}
    diverged = {arm: sum(not math.isfinite(v) for v in valid[arm]) for arm in ARMS}
    worse = max(ARMS, key=lambda arm: geometric_mean(valid[arm]))
    curves = {arm: _mean_curve(runs[arm]) for arm in ARMS}
    # By default, the level every seed of the worse arm had reached by its last evaluation: the
    # highest of their last points. None when some seed of it ended no better than it began.
    improved = all(run["valid"][-1][1] < run["valid"][0][1] for run in runs[worse])
    target = target_ppl if target_ppl is not None else max(run["valid"][-1][1] for run in runs[worse])
    reached = {arm: [_first_reach(run["valid"], target) for run in runs[arm]] for arm in ARMS}
    timed = target_ppl is not None or (improved and not any(diverged.values()))
    all_reached = all(step is not None for arm in ARMS for step in reached[arm])
    return {
        "steps": steps, "seeds": seeds, "names": names, "eval_interval": eval_interval,
        "valid_tokens": runs[TF][0]["valid_tokens"],
        "valid": {arm: _ppl_spread(valid[arm]) for arm in ARMS},
        "test": {arm: _ppl_spread([r["test_ppl"] for r in runs[arm]]) for arm in ARMS},
        "valid_reset": {arm: _ppl_spread([r["valid_ppl_reset"] for r in runs[arm]]) for arm in ARMS},
        "test_reset": {arm: _ppl_spread([r["test_ppl_reset"] for r in runs[arm]]) for arm in ARMS},
        "diverged": diverged,
        # On the losses (log-perplexities), the scale a model is trained and judged on.
        "valid_test": None if any(diverged.values()) else
        t_test([math.log(v) for v in valid[TF]], [math.log(v) for v in valid[FR]], paired=False),
        "curves": curves,
        "target": {"ppl": target if timed else None, "given": target_ppl is not None, "worse": worse,
                   "first_last": [(run["valid"][0][1], run["valid"][-1][1]) for run in runs[worse]],
                   "reached": reached if timed else None,
                   "test": t_test(reached[TF], reached[FR], paired=False) if timed and all_reached else None},
        "pairs": {f"{a}/{b}": _pair_facts(runs, start, f"{a}/{b}", fed, (a, b)) for a, b in pairs},
    }


def _pair_facts(runs, start: dict, pair: str, fed: dict, words) -> dict:
    """`start`: each seed's untrained distances per matrix ("input", "output"). The input embedding's
    are tested: it is the matrix the question asks about."""
    after = {arm: [r["distances"][pair] for r in runs[arm]] for arm in ARMS}
    start = {matrix: [distances[pair] for distances in start[matrix]] for matrix in start}
    output = {arm: [r["output_distances"][pair] for r in runs[arm]] for arm in ARMS}
    return {
        "start": _spread(start["input"]), **{arm: _spread(after[arm]) for arm in ARMS},
        "output": {"start": _spread(start["output"]), **{arm: _spread(output[arm]) for arm in ARMS}},
        "change": {arm: _spread([a - b for a, b in zip(after[arm], start["input"])]) for arm in ARMS},
        "test": t_test(after[TF], after[FR], paired=True),
        "fed": {w: fed[w] for w in words},
        "updated": {arm: {w: sum(r["updated"][w] for r in runs[arm]) for w in words} for arm in ARMS},
    }


def sweep_facts(runs_by_p: dict[float, list[dict]], unigram: dict) -> list[dict]:
    """Per P of the sweep (rising): each seed's perplexities, their geometric means, and how many
    seeds end below the unigram's validation perplexity."""
    facts = []
    for p in sorted(runs_by_p):
        runs = runs_by_p[p]
        row = {"p": p, "seeds": [r["seed"] for r in runs]}
        for key in ("valid_ppl", "valid_ppl_reset", "test_ppl", "test_ppl_reset"):
            row[key] = _ppl_spread([r[key] for r in runs])
        row["below_unigram"] = sum(r["valid_ppl"] < unigram["valid"] for r in runs)
        facts.append(row)
    return facts


def band(curves: list[list], mean) -> tuple[list, list, list, list]:
    """Steps, mean, lowest and highest value over the seeds' curves (all logged at the same steps)."""
    steps = [step for step, _ in curves[0]]
    columns = [[curve[k][1] for curve in curves] for k in range(len(steps))]
    return steps, [mean(c) for c in columns], [min(c) for c in columns], [max(c) for c in columns]
