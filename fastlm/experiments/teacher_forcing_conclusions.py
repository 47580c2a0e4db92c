"""The teacher-forcing comparison's conclusions: every sentence computed from the facts
`teacher_forcing_facts` draws from the runs, so a report never says more than its numbers."""
from __future__ import annotations

from fastlm.experiments.teacher_forcing_facts import ARMS, FR, RARE_BELOW, TF


def _step_count(count: int) -> str:
    return "step" if count == 1 else f"{count} steps"


def fmt(spread: dict, digits: int = 2) -> str:
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
    text = (f"After {facts['steps']} steps the validation perplexity is {fmt(valid[TF])} for the {names[TF]} "
            f"model{plural} and {fmt(valid[FR])} for the {names[FR]} one{plural}{over}; test perplexity "
            f"{fmt(test[TF])} and {fmt(test[FR])}.")
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
             f"{steps_said(target['reached'][FR])} by the {names[FR]} one{plural} ({per_seed}the validation sample, "
             f"{facts['valid_tokens']:,} tokens, evaluated every {_step_count(every)}, so each step is known to "
             f"within {every}).")
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
    text = (f"The cosine distance of {pair} is {fmt(pair_facts['start'], 3)} before training, "
            f"{fmt(pair_facts[TF], 3)} after it for the {names[TF]} model{plural} (change {change(TF)}) and "
            f"{fmt(pair_facts[FR], 3)} for the {names[FR]} one{plural} (change {change(FR)}).")
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


def sweep_sentence(sweep: list[dict], unigram: float) -> str:
    """Where feeding the model its own words stops hurting: each P's geometric mean against P = 1's,
    "about the same" meaning within 5% (a margin of ours, about the spread of one arm's seeds)."""
    means = {row["p"]: row["valid_ppl"]["mean"] for row in sweep}
    text = "Validation perplexity (geometric mean over seeds, state carried): " + ", ".join(
        f"P = {p:g}: {mean:.2f}" for p, mean in means.items()) + f"; the unigram: {unigram:.2f}."
    below = [p for p in means if p < 1]
    if 1.0 in means and below:
        worse = [p for p in below if means[p] > means[1.0] * 1.05]
        close = [p for p in below if means[p] <= means[1.0] * 1.05]
        listed = lambda ps: ", ".join(f"{p:g}" for p in ps)  # noqa: E731
        if worse:
            text += f" P = {listed(worse)} end more than 5% above teacher forcing"
            text += f"; P = {listed(close)} within 5% of it." if close else "."
        else:
            text += " Every P ends within 5% of teacher forcing."
    return text


def unigram_sentence(arm_facts: dict, baseline: dict) -> str:
    unigram, names = baseline["unigram"]["valid"], arm_facts["names"]
    said = []
    for arm in ARMS:
        values = arm_facts["valid"][arm]["values"]
        below = sum(v < unigram for v in values)
        side = ("below" if below == len(values) else "above" if below == 0 else
                f"below in {below} of {len(values)} seeds, above in the rest:")
        said.append(f"the {names[arm]} models end {side} the unigram's {unigram:.2f}")
    return f"On validation, {said[0]}; {said[1]}."
