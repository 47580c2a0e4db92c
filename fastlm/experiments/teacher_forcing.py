"""Teacher forcing against free running (or scheduled sampling), side by side, written up as a
report folder (markdown, JSON, PNG): the same model, seeds and step budget trained both ways, both
judged on teacher-forced perplexity.

Every sentence of the conclusion is computed from the report's numbers. A difference between the
two arms is called only when a two-sided t-test over the seeds finds it at the 5% level: Welch's
test for perplexities and steps, a paired test for distances (both arms of a seed start from the
same weights, so each seed gives one change to compare). With one seed no difference is called:
one run cannot tell a difference from seed-to-seed noise.
"""
from __future__ import annotations

import json
import math
import statistics
from dataclasses import asdict, replace
from pathlib import Path

import torch

from fastlm import figures as plots
from fastlm.config import DEFAULT_DATA, TrainConfig
from fastlm.data import EOS, Corpus, batchify, ensure_ptb, num_windows
from fastlm.device import pick_device
from fastlm.errors import TrainingError
from fastlm.generation.embedding import cosine_distance, word_vectors
from fastlm.generation.sampling import generate, to_text
from fastlm.models.lm import RNNLM, load_model
from fastlm.models.lstm import resolve_backend
from fastlm.scoring import evaluate, perplexity
from fastlm.training.trainer import train

MB = 2**20
TF, FR = ARMS = ("teacher-forced", "free-running")
OPTIMIZER_NAMES = {"adam": "Adam", "sgd": "SGD"}
RARE_BELOW = 10  # a word fed fewer times than this in the text trained on is called rare
# Two-sided 5% critical values of Student's t for 1 to 30 degrees of freedom (any statistics
# table); past 30 the value for 30, which errs towards calling no difference.
T_CRITICAL_5 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
                2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
                2.045, 2.042)


def fresh_folder(out_dir: Path) -> Path:
    if out_dir.exists() and any(out_dir.iterdir()):
        raise TrainingError(f"{out_dir} is not empty: pass a new --out folder for this report")
    out_dir.mkdir(parents=True, exist_ok=True)
    return out_dir


def load_corpus(cfg: TrainConfig) -> Corpus:
    if Path(cfg.data) == Path(DEFAULT_DATA):
        ensure_ptb(cfg.data)
    return Corpus(cfg.data, max_vocab=cfg.vocab_size)


def _prompts(corpus: Corpus, count: int) -> list[list[int]]:
    """The first two words of the first lines of the validation text."""
    eos = corpus.dictionary.word2idx[EOS]
    prompts, line = [], []
    for word in corpus.valid.tolist():
        if word == eos:
            if len(line) >= 2:
                prompts.append(line[:2])
            line = []
            if len(prompts) == count:
                break
        else:
            line.append(word)
    return prompts


def compare_teacher_forcing(base: TrainConfig, steps: int, out_dir: Path, free_running: float = 0.0,
                            schedule: str = "constant", target_ppl: float | None = None,
                            pairs=(("army", "taxpayer"),), seeds: int = 3, eval_interval: int | None = None,
                            num_samples: int = 3, sample_words: int = 20, eval_tokens: int | None = 20000) -> dict:
    """Train both arms for `seeds` seeds (base.seed, base.seed + 1, …) with the same budget; write
    report.md, report.json and a PNG into `out_dir`."""
    for name, value in (("--steps", steps), ("--seeds", seeds), ("--eval-interval", eval_interval)):
        if value is not None and value < 1:
            raise TrainingError(f"{name} must be at least 1, got {value}")
    eval_interval = eval_interval or max(1, steps // 25)
    if eval_interval > steps:
        raise TrainingError(f"--eval-interval {eval_interval} leaves no evaluation within --steps {steps}: lower it")
    out_dir = fresh_folder(out_dir)
    corpus = load_corpus(base)
    unknown = [word for pair in pairs for word in pair if word not in corpus.dictionary]
    if unknown:
        raise TrainingError(f"--pair: {', '.join(repr(w) for w in unknown)} not in the vocabulary of {base.data}: "
                            "pick words of its train.txt")
    train_rows = batchify(corpus.train, base.batch_size)
    prompts = _prompts(corpus, num_samples)
    seed_list = [base.seed + k for k in range(seeds)]
    runs, start = {arm: [] for arm in ARMS}, []
    for seed in seed_list:
        seeded = replace(base, seed=seed)
        initial = _initial_vectors(seeded, len(corpus.dictionary))
        start.append({f"{a}/{b}": _distance(initial, corpus, a, b) for a, b in pairs})
        for arm, p, sched in ((TF, 1.0, "constant"), (FR, free_running, schedule)):
            # Both arms eager and in fp32: free running goes step by step, without CUDA graphs or
            # autocast, so the teacher-forced arm must not get either (a different precision).
            cfg = replace(seeded, out=str(out_dir / arm / f"seed-{seed}"), max_steps=steps,
                          epochs=math.ceil(steps / num_windows(train_rows, base.seq_len)), teacher_forcing=p,
                          teacher_forcing_schedule=sched, teacher_forcing_steps=steps, eval_interval=eval_interval,
                          eval_tokens=eval_tokens, log_interval=max(1, steps // 20), amp="off", cuda_graphs=False)
            if train(cfg).interrupted:  # a shorter run would be compared as if it had the full budget
                raise KeyboardInterrupt
            runs[arm].append(_summarize(Path(cfg.out), corpus, cfg, initial, prompts if seed == base.seed else [],
                                        pairs, sample_words))

    names = {TF: TF, FR: FR if free_running == 0 else f"P={free_running:g} ({schedule})"}
    facts = _facts(runs, start, pairs, _times_fed(train_rows, base.seq_len, steps, corpus, pairs), steps,
                   seed_list, eval_interval, target_ppl, names)
    conclusion = _conclusion(facts)
    _plot(out_dir / "teacher_forcing.png", runs, facts)
    _write_markdown(out_dir / "report.md", base, facts, runs, len(prompts), conclusion)
    report = {"config": asdict(base), "facts": facts, "runs": runs, "conclusion": conclusion}
    (out_dir / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    return report


# -- what one trained model gives ------------------------------------------------------------------

def _initial_vectors(cfg: TrainConfig, vocab_size: int) -> torch.Tensor:
    """The input embedding the trainer starts from for this config: its seed, then the same model."""
    torch.manual_seed(cfg.seed)
    backend = resolve_backend(cfg.backend, pick_device(cfg.device), None, graphed=False)
    return word_vectors(RNNLM.from_config(asdict(cfg), vocab_size, backend), "input")


def _distance(vectors: torch.Tensor, corpus: Corpus, a: str, b: str) -> float:
    return cosine_distance(vectors, corpus.dictionary.word2idx[a], corpus.dictionary.word2idx[b])


def _summarize(run_dir: Path, corpus: Corpus, cfg: TrainConfig, initial: torch.Tensor, prompts, pairs,
               sample_words: int) -> dict:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    model, dictionary, _ = load_model(run_dir, pick_device(cfg.device))
    rows = lambda ids: batchify(ids, cfg.eval_batch_size).to(model.linear.weight.device)
    vectors = word_vectors(model, "input")
    words = {word for pair in pairs for word in pair}
    samples = [to_text(p + generate(model, sample_words, prompt=p, strategy="greedy")[0], dictionary).strip()
               .replace("\n", " / ") for p in prompts]
    interim = [r for r in records if r["split"] == "valid" and "tokens" in r]
    return {
        "seed": cfg.seed,
        "teacher_forcing": cfg.teacher_forcing,
        "schedule": cfg.teacher_forcing_schedule,
        "train": [(r["global_step"], r["loss"]) for r in records if r["split"] == "train"],
        "valid": [(r["global_step"], r["ppl"]) for r in interim],
        "valid_tokens": interim[0]["tokens"],
        "valid_ppl": perplexity(evaluate(model, rows(corpus.valid), cfg.seq_len)),
        "test_ppl": perplexity(evaluate(model, rows(corpus.test), cfg.seq_len)),
        "distances": {f"{a}/{b}": _distance(vectors, corpus, a, b) for a, b in pairs},
        # Adam or SGD moves an untied input row only once it has had a gradient, i.e. once the word
        # was fed as an input; a row never fed keeps its initial value exactly.
        "updated": {w: not torch.equal(vectors[dictionary.word2idx[w]], initial[dictionary.word2idx[w]])
                    for w in sorted(words)},
        "samples": samples,
    }


def _times_fed(rows: torch.Tensor, seq_len: int, steps: int, corpus: Corpus, pairs) -> dict[str, int]:
    """How often each word is an input of the true text in the first `steps` windows (epochs repeat)."""
    per_epoch = num_windows(rows, seq_len)
    epochs, rest = divmod(steps, per_epoch)
    counts = lambda columns: torch.bincount(rows[:, :columns].reshape(-1), minlength=len(corpus.dictionary))
    fed = epochs * counts(per_epoch * seq_len) + counts(rest * seq_len)
    return {w: int(fed[corpus.dictionary.word2idx[w]]) for pair in pairs for w in pair}


# -- from the runs to the facts the conclusion is drawn from -------------------------------------

def _spread(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "sd": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values), "values": list(values)}


def _ppl_spread(values: list[float]) -> dict:
    """Perplexities averaged as their losses are: the geometric mean. One diverging seed (perplexity
    10^5 beside 10^3) would otherwise make the arithmetic mean and its deviation meaningless."""
    return {"mean": _geometric_mean(values), "min": min(values), "max": max(values), "values": list(values)}


def _geometric_mean(values) -> float:
    return math.exp(statistics.fmean(math.log(v) for v in values))


def _curve_steps(runs: list[dict]) -> list[int]:
    steps = [step for step, _ in runs[0]["valid"]]
    if any([step for step, _ in run["valid"]] != steps for run in runs):
        raise TrainingError("the runs were not evaluated at the same steps: their curves cannot be averaged")
    return steps


def _mean_curve(runs: list[dict]) -> list[tuple[int, float]]:
    _curve_steps(runs)
    steps, means, _, _ = _band([run["valid"] for run in runs], _geometric_mean)
    return list(zip(steps, means))


def _first_reach(curve: list[tuple[int, float]], target: float) -> int | None:
    # The tolerance: a seed ending exactly at the default target (their geometric mean) reaches it.
    return next((step for step, ppl in curve if ppl <= target * (1 + 1e-12)), None)


def _t_test(first: list[float], second: list[float], paired: bool) -> dict | None:
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


def _facts(runs, start, pairs, fed, steps, seeds, eval_interval, target_ppl, names) -> dict:
    valid = {arm: [r["valid_ppl"] for r in runs[arm]] for arm in ARMS}
    diverged = {arm: sum(not math.isfinite(v) for v in valid[arm]) for arm in ARMS}
    worse = max(ARMS, key=lambda arm: _geometric_mean(valid[arm]))
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
        "diverged": diverged,
        # On the losses (log-perplexities), the scale a model is trained and judged on.
        "valid_test": None if any(diverged.values()) else
        _t_test([math.log(v) for v in valid[TF]], [math.log(v) for v in valid[FR]], paired=False),
        "curves": curves,
        "target": {"ppl": target if timed else None, "given": target_ppl is not None, "worse": worse,
                   "first_last": [(run["valid"][0][1], run["valid"][-1][1]) for run in runs[worse]],
                   "reached": reached if timed else None,
                   "test": _t_test(reached[TF], reached[FR], paired=False) if timed and all_reached else None},
        "pairs": {f"{a}/{b}": _pair_facts(runs, [s[f"{a}/{b}"] for s in start], f"{a}/{b}", fed, (a, b))
                  for a, b in pairs},
    }


def _pair_facts(runs, start: list[float], pair: str, fed: dict, words) -> dict:
    after = {arm: [r["distances"][pair] for r in runs[arm]] for arm in ARMS}
    return {
        "start": _spread(start), **{arm: _spread(after[arm]) for arm in ARMS},
        "change": {arm: _spread([a - b for a, b in zip(after[arm], start)]) for arm in ARMS},
        "test": _t_test(after[TF], after[FR], paired=True),
        "fed": {w: fed[w] for w in words},
        "updated": {arm: {w: sum(r["updated"][w] for r in runs[arm]) for w in words} for arm in ARMS},
    }


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


def _conclusion(facts: dict) -> str:
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

def _plot(path: Path, runs: dict, facts: dict) -> None:
    band = lambda arm, key, mean: _band([run[key] for run in runs[arm]], mean)
    n, names = len(facts["seeds"]), facts["names"]
    over = f"geometric mean over {n} seeds; band: lowest to highest" if n > 1 else "one seed"
    plots.curves(path, [
        {"title": f"validation perplexity, teacher-forced\n({over})", "xlabel": "step", "ylabel": "perplexity",
         "log": True, "series": {names[arm]: band(arm, "valid", _geometric_mean) for arm in ARMS}},
        {"title": "training loss, each on its own inputs\n(free running: on its fed-back predictions; not comparable)",
         "xlabel": "step", "ylabel": "cross-entropy",
         "series": {names[arm]: band(arm, "train", statistics.fmean) for arm in ARMS}},
    ], f"Teacher forcing vs {names[FR]}, {facts['steps']} steps")


def _band(curves: list[list], mean) -> tuple[list, list, list, list]:
    """Steps, mean, lowest and highest value over the seeds' curves (all logged at the same steps)."""
    steps = [step for step, _ in curves[0]]
    columns = [[curve[k][1] for curve in curves] for k in range(len(steps))]
    return steps, [mean(c) for c in columns], [min(c) for c in columns], [max(c) for c in columns]


def _write_markdown(path: Path, base: TrainConfig, facts: dict, runs: dict, num_samples: int, conclusion: str) -> None:
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
