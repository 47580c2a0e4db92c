"""The teacher-forcing comparison written up: the conclusion (every sentence computed from the
facts `teacher_forcing_facts.facts_of_runs` draws from the runs), report.md and the curves' PNG."""
from __future__ import annotations

import statistics
from pathlib import Path

from fastlm import figures
from fastlm.config import TrainConfig
from fastlm.experiments.teacher_forcing_facts import ARMS, FR, OPTIMIZER_NAMES, RARE_BELOW, TF, band, geometric_mean

# -- the conclusion: each sentence follows from the facts ------------------------------------------

def _step_count(count: int) -> str:
    return "step" if count == 1 else f"{count} steps"


def _fmt(spread: dict, digits: int = 2) -> str:
    """mean ± standard deviation; a perplexity spread (no deviation) as geometric mean (lowest–highest)."""
    if len(spread["values"]) == 1:
        return f"{spread['mean']:.{digits}f}"
    if "sd" not in spread:
        return f"{spread['mean']:.{digits}f} ({_range(spread, digits)})"
    return f"{spread['mean']:.{digits}f} ± {spread['sd']:.{digits}f}"


def _range(spread: dict, digits: int = 2) -> str:
    return f"{spread['min']:.{digits}f}–{spread['max']:.{digits}f}"


def _plural(facts: dict) -> str:
    return "s" if len(facts["seeds"]) > 1 else ""


def _test_said(test: dict, of: str) -> str:
    kind = "a paired t-test" if test["paired"] else "Welch's t-test"
    return f"{kind} on the seeds' {of}: t = {test['t']:.3g}, {test['df']} degree{'s' * (test['df'] > 1)} of freedom"


def conclusion_of(facts: dict) -> str:
    sentences = [_perplexity_sentences(facts), _target_sentences(facts)]
    sentences += [_distance_sentences(facts, pair) for pair in facts["pairs"]]
    return " ".join(sentences)


def _perplexity_sentences(facts: dict) -> str:
    valid, test, names, n = facts["valid"], facts["test"], facts["names"], len(facts["seeds"])
    plural = _plural(facts)
    over = f" (geometric mean over {n} seeds, lowest–highest in brackets)" if n > 1 else " (one seed)"
    text = (f"After {facts['steps']} steps the validation perplexity is {_fmt(valid[TF])} for the {names[TF]} "
            f"model{plural} and {_fmt(valid[FR])} for the {names[FR]} one{plural}{over}; test perplexity "
            f"{_fmt(test[TF])} and {_fmt(test[FR])}.")
    verdict = facts["valid_test"]
    if any(facts["diverged"].values()):
        counts = " and ".join(f"{k} of the {n} {names[arm]} seed{'s' * (n > 1)}"
                              for arm, k in facts["diverged"].items() if k)
        return text + (f" {counts[0].upper()}{counts[1:]} ended with a non-finite perplexity (diverged): no test is "
                       "made.")
    if verdict is None:
        return text + (" One seed cannot tell a difference from seed-to-seed noise: run --seeds 3 or more before "
                       "calling either way of training better.")
    test_said = _test_said(verdict, "log-perplexities")
    if verdict["lower"] is None:
        apart = [arm for arm in ARMS if valid[arm]["max"] < valid[FR if arm == TF else TF]["min"]]
        if apart:
            lower, higher = apart[0], FR if apart[0] == TF else TF
            return text + (f" Every {names[lower]} seed is better than every {names[higher]} seed, but with {n} "
                           f"seeds and this spread that is not significant at the 5% level ({test_said}): run more "
                           "seeds to settle it.")
        return text + f" No clear difference at this budget ({test_said}, not significant at the 5% level)."
    better, worse = verdict["lower"], FR if verdict["lower"] == TF else TF
    gap = 100 * (valid[worse]["mean"] - valid[better]["mean"]) / valid[worse]["mean"]
    if f"{gap:.1f}" == "0.0":  # seeds that agree to the last digit: a "difference" too small to print
        return text + " The two are equal to the precision printed: no difference to call."
    text += (f" The {names[better]} models are better, {gap:.1f}% lower ({test_said}, significant at the 5% "
             "level).")
    if better == TF and facts["names"][FR] == FR:
        text += (" A likely reason, which this report does not measure: free running feeds a model its own "
                 "predictions, mostly wrong early in training, so its gradients come from inputs unlike the text "
                 "it is judged on.")
    return text


def _target_sentences(facts: dict) -> str:
    target, names, every, seeds = facts["target"], facts["names"], facts["eval_interval"], facts["seeds"]
    worse, plural = names[target["worse"]], _plural(facts)
    if target["ppl"] is None:
        ends = "; ".join(f"seed {seed}: {first:.2f} → {last:.2f}" for seed, (first, last) in
                         zip(seeds, target["first_last"]))
        return (f"Not every {worse} model ended below its first validation-sample perplexity (first → last "
                f"evaluation, {ends}), so there is no level they all worked towards whose reaching could be timed "
                "(pass --target-ppl to time one).")
    steps_said = lambda steps: ", ".join(str(step) if step else "not reached" for step in steps)
    if target["given"]:
        text = f"Validation-sample perplexity {target['ppl']:.2f} (--target-ppl) was first reached at step"
    else:
        which = (f"Every {worse} model", "; the highest of their last points") if plural else (f"The {worse} model", "")
        text = (f"{which[0]} had reached a validation-sample perplexity of {target['ppl']:.2f} by its last "
                f"evaluation (step {facts['curves'][target['worse']][-1][0]}{which[1]}); that level was first reached "
                "at step")
    per_seed = "per seed; " if plural else ""
    text += (f" {steps_said(target['reached'][TF])} by the {names[TF]} model{plural} and "
             f"{steps_said(target['reached'][FR])} by the {names[FR]} one{plural} ({per_seed}validation every "
             f"{_step_count(every)} on the first {facts['valid_tokens']} validation tokens, so each step is known "
             f"to within {every}).")
    verdict = target["test"]
    if len(seeds) == 1:
        return text
    if verdict is None:
        return text + " Not every seed reached it, so no difference in speed is called."
    if verdict["lower"] is None:
        return text + (f" The arms are not separated at this resolution ({_test_said(verdict, 'steps')}, not "
                       "significant at the 5% level).")
    return text + (f" The {names[verdict['lower']]} models got there sooner ({_test_said(verdict, 'steps')}, "
                   "significant at the 5% level).")


def _distance_sentences(facts: dict, pair: str) -> str:
    pair_facts, names, n, plural = facts["pairs"][pair], facts["names"], len(facts["seeds"]), _plural(facts)
    change = lambda arm: f"{pair_facts['change'][arm]['mean']:+.3f}"
    text = (f"The cosine distance of {pair} is {_fmt(pair_facts['start'], 3)} before training, "
            f"{_fmt(pair_facts[TF], 3)} after it for the {names[TF]} model{plural} (change {change(TF)}) and "
            f"{_fmt(pair_facts[FR], 3)} for the {names[FR]} one{plural} (change {change(FR)}).")
    for word, times in pair_facts["fed"].items():
        if times == 0:
            text += f" '{word}' does not occur in the text trained on."
        elif times < RARE_BELOW:
            text += f" '{word}' occurs only {times} time{'s' * (times > 1)} in the text trained on."
    for arm in ARMS:
        for word, updated in pair_facts["updated"][arm].items():
            if updated == 0:
                text += (f" The {names[arm]} model{plural} never updated the vector of '{word}': it is still the "
                         "untrained one.")
            elif updated < n:
                text += f" The {names[arm]} models updated the vector of '{word}' in only {updated} of {n} seeds."
    if all(pair_facts[arm]["values"] == pair_facts["start"]["values"] for arm in ARMS):
        return text + " Neither way of training moved this pair: there is nothing to compare."
    verdict = pair_facts["test"]
    if verdict is None:
        return text + " With one seed this difference cannot be told from seed-to-seed noise."
    if verdict["lower"] is None:
        return text + (f" Neither places them clearly closer ({_test_said(verdict, 'distances')}, not significant "
                       "at the 5% level).")
    significant = f"{_test_said(verdict, 'distances')}, significant at the 5% level"
    unmoved = [arm for arm in ARMS if pair_facts[arm]["values"] == pair_facts["start"]["values"]]
    if unmoved:  # a difference, but made by one arm alone: say which
        moved = FR if unmoved[0] == TF else TF
        direction = "closer together" if pair_facts["change"][moved]["mean"] < 0 else "apart"
        return text + (f" Only the {names[moved]} models moved the pair, {direction} ({significant}); the "
                       f"{names[unmoved[0]]} ones left it where it started.")
    closer, farther = verdict["lower"], FR if verdict["lower"] == TF else TF
    return text + f" The {names[closer]} models end with them closer than the {names[farther]} ones do ({significant})."


# -- the report's files ----------------------------------------------------------------------------

def plot_curves(path: Path, runs: dict, facts: dict) -> None:
    arm_band = lambda arm, key, mean: band([run[key] for run in runs[arm]], mean)  # noqa: E731
    n, names = len(facts["seeds"]), facts["names"]
    over = f"geometric mean over {n} seeds; band: lowest to highest" if n > 1 else "one seed"
    figures.curves(path, [
        {"title": f"validation perplexity, teacher-forced\n({over})", "xlabel": "step", "ylabel": "perplexity",
         "log": True, "series": {names[arm]: arm_band(arm, "valid", geometric_mean) for arm in ARMS}},
        {"title": "training loss, each on its own inputs\n(free running: on its fed-back predictions; not comparable)",
         "xlabel": "step", "ylabel": "cross-entropy",
         "series": {names[arm]: arm_band(arm, "train", statistics.fmean) for arm in ARMS}},
    ], f"Teacher forcing vs {names[FR]}, {facts['steps']} steps")


def write_markdown(path: Path, base: TrainConfig, facts: dict, runs: dict, num_samples: int, conclusion: str) -> None:
    steps, seeds, target, names = facts["steps"], facts["seeds"], facts["target"], facts["names"]
    n = len(seeds)
    reach = lambda arm: ("—" if target["reached"] is None else
                         ", ".join(str(step) if step else "not reached" for step in target["reached"][arm]))
    lines = [f"# Teacher forcing vs {names[FR]} ({steps} steps, {n} seed{_plural(facts)})", "",
             f"Model: embed {base.embed_size}, hidden {base.hidden_size}, {base.num_layers} layer(s); batch "
             f"{base.batch_size}, seq_len {base.seq_len}, {OPTIMIZER_NAMES[base.optimizer]} lr {base.lr}; seeds "
             f"{', '.join(map(str, seeds))}. Data: `{base.data}`. Both arms train eagerly in fp32, each seed from the "
             "same initial weights. Perplexities are teacher-forced (the true previous word is always fed) for "
             f"both; the {names[FR]} arm feeds back the model's own prediction with probability 1 − P, across "
             "window edges too." + (" Perplexities are geometric means over the seeds (lowest–highest in brackets), "
                                    "distances mean ± standard deviation." if n > 1 else ""),
             "", "![curves](teacher_forcing.png)", "",
             "Each training loss is measured on the inputs that model was fed, so the right panel compares "
             "different quantities: the free-running loss is on its own fed-back predictions. Compare the models "
             "on the left panel and the table.", "",
             f"| | {names[TF]} | {names[FR]} |", "| --- | --- | --- |",
             f"| validation perplexity | {_fmt(facts['valid'][TF])} | {_fmt(facts['valid'][FR])} |",
             f"| test perplexity | {_fmt(facts['test'][TF])} | {_fmt(facts['test'][FR])} |",
             f"| first step at validation-sample perplexity ≤ "
             f"{'—' if target['ppl'] is None else format(target['ppl'], '.2f')}, per seed (evaluated every "
             f"{_step_count(facts['eval_interval'])}) | {reach(TF)} | {reach(FR)} |"]
    for pair, d in facts["pairs"].items():
        lines.append(f"| cosine distance {pair} (before training: {_fmt(d['start'], 4)}) | {_fmt(d[TF], 4)} | "
                     f"{_fmt(d[FR], 4)} |")
        lines += [f"| vector of '{w}' updated ({d['fed'][w]} times in the true text trained on) | "
                  f"{d['updated'][TF][w]} of {n} seeds | {d['updated'][FR][w]} of {n} seeds |" for w in d["fed"]]
    lines += ["", "Per seed:", "", f"| seed | valid, {names[TF]} | valid, {names[FR]} | test, {names[TF]} | "
              f"test, {names[FR]} |", "| --- | --- | --- | --- | --- |"]
    lines += [f"| {tf['seed']} | {tf['valid_ppl']:.2f} | {fr['valid_ppl']:.2f} | {tf['test_ppl']:.2f} | "
              f"{fr['test_ppl']:.2f} |" for tf, fr in zip(runs[TF], runs[FR])]
    lines += ["", f"## Greedy samples (seed {seeds[0]})", "", "Each `<eos>` is shown as ` / `.", ""]
    for k in range(num_samples):
        lines += [f"- {names[TF]}: {runs[TF][0]['samples'][k]!r}", f"- {names[FR]}: {runs[FR][0]['samples'][k]!r}", ""]
    lines += ["## Conclusion", "", conclusion, ""]
    path.write_text("\n".join(lines))
