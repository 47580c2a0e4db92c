"""The teacher-forcing comparison written up: report.md (its setting, baselines, tables, samples,
conclusions and what it does not show) and the curves' PNG."""
from __future__ import annotations

import itertools
import statistics
from pathlib import Path

from fastlm import figures
from fastlm.config import TrainConfig
from fastlm.experiments.teacher_forcing_conclusions import fmt, sweep_sentence, unigram_sentence
from fastlm.experiments.teacher_forcing_facts import OPTIMIZER_NAMES, TF, geometric_mean
from fastlm.files import write_output

# -- the report's files ----------------------------------------------------------------------------

COLOURS = ("tab:blue", "tab:red", "tab:green", "tab:purple", "tab:orange", "tab:brown", "tab:olive", "tab:cyan")


def plot_curves(path: Path, runs: dict[str, list[dict]], arms: list[str], study: dict) -> None:
    """Left: each seed's validation-sample perplexity over training, one line per seed, a colour per
    arm. Right (with a sweep): the full validation set's perplexity against P, a point per seed.
    The unigram's perplexity is the dashed line on both."""
    fmt, plt = figures.image_format(path), figures.pyplot()
    sweep = study["sweep"]
    fig, axes = plt.subplots(1, 2 if sweep else 1, figsize=(13 if sweep else 7, 4.8), squeeze=False)
    curve_axis = axes[0][0]
    for colour, arm in zip(itertools.cycle(COLOURS), arms):
        for k, run in enumerate(runs[arm]):
            steps, ppl = zip(*run["valid"])
            curve_axis.plot(steps, ppl, color=colour, linewidth=1, alpha=0.8, label=arm if k == 0 else None)
    curve_axis.axhline(study["baseline"]["unigram_sample"], color="grey", linestyle="--",
                       label="unigram (word counts)")
    sample = study["baseline"]["sample"]
    curve_axis.set_title(f"perplexity on the validation sample (the first {sample['columns']:,} tokens of each\n"
                         f"of its {sample['rows']} rows), one line per seed")
    curve_axis.set_xlabel("step")
    curve_axis.set_ylabel("perplexity (teacher-forced)")
    figures.log_axis(curve_axis)
    if sweep:
        ax = axes[0][1]
        for row in sweep:
            ax.scatter([row["p"]] * len(row["valid_ppl"]["values"]), row["valid_ppl"]["values"], color=COLOURS[0], s=18)
        ax.plot([row["p"] for row in sweep], [row["valid_ppl"]["mean"] for row in sweep], color=COLOURS[0],
                label="geometric mean over seeds")
        ax.axhline(study["baseline"]["unigram"]["valid"], color="grey", linestyle="--", label="unigram")
        ax.set_title(f"validation perplexity (whole set) after {study['steps']} steps\nagainst P, constant, "
                     "argmax fed back")
        ax.set_xlabel("P (probability of feeding the true word)")
        ax.set_ylabel("perplexity (teacher-forced)")
        figures.log_axis(ax)
    for ax in axes[0]:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    try:
        write_output(path, lambda file: fig.savefig(file, format=fmt, dpi=120), example="teacher_forcing.png")
    finally:
        plt.close(fig)


def write_markdown(path: Path, base: TrainConfig, study: dict, facts: dict, runs: dict, num_samples: int,
                   conclusions: dict) -> None:
    arms, seeds, baseline = study["arms"], study["seeds"], study["baseline"]
    sample = baseline["sample"]
    n = len(seeds)
    epochs = f"{study['epochs']:.3g} epoch{'s' * (study['epochs'] != 1)}"
    minutes = sum(study["train_seconds"].values()) / 60
    lines = [f"# Teacher forcing, free running and scheduled sampling ({study['steps']} steps = {epochs}, "
             f"{n} seed{'s' * (n > 1)})", "",
             f"Model: embed {base.embed_size}, hidden {base.hidden_size}, {base.num_layers} layer(s); batch "
             f"{base.batch_size}, seq_len {base.seq_len}, {OPTIMIZER_NAMES[base.optimizer]} lr {base.lr}, clip "
             f"{base.clip}; seeds {', '.join(map(str, seeds))}; trained on `{base.data}`'s train.txt for "
             f"{study['steps']} steps ({epochs}). P is the probability that an input is the true previous word; "
             "otherwise the model's own word is fed, and no gradient flows through that choice. Every arm trains "
             "eagerly in fp32, each seed from the same initial weights. The arms:", ""]
    lines += [f"- **{arm}**: {study['described'][arm]}" + _seeds_said(study["arm_seeds"][arm], seeds)
              for arm in arms]
    if study["sweep"]:
        values = ", ".join(f"{row['p']:g}" for row in study["sweep"])
        lines += [f"- **the sweep**: P = {values}, constant, argmax "
                  f"fed back, seeds {', '.join(map(str, study['sweep'][0]['seeds']))} (a P that is also an arm is "
                  "the same runs)."]
    lines += ["", "Every model is judged teacher-forced (the true previous word always fed), on the whole validation "
              "and test sets, read two ways: the (h, c) state carried through the whole split, as the model reads "
              "text and as the verdicts use, and reset to zeros at every window of "
              f"{base.seq_len} words. The curves are on the *validation sample*, which the trainer evaluates every "
              f"{study['eval_interval']} steps: the first {sample['columns']:,} tokens of each of the {sample['rows']} "
              f"rows the validation text is cut into ({sample['targets']:,} targets scored), not the whole set. "
              f"The {len(study['train_seconds'])} runs took {minutes:.0f} min of training in all (steps and "
              f"validations, from their metrics.jsonl, whose clock restarts when a run is resumed); "
              f"this command took {study['wall_seconds'] / 60:.0f} min (runs already in `{study['runs_dir']}` are "
              "reused, not trained again).", "",
              "## Baselines", "",
              "| | validation | test |", "| --- | --- | --- |",
              f"| unigram: every word predicted with its frequency in train.txt | {baseline['unigram']['valid']:.2f} | "
              f"{baseline['unigram']['test']:.2f} |",
              f"| untrained model (geometric mean over the seeds' initial weights) | "
              f"{geometric_mean(baseline['untrained']['valid']):.2f} | "
              f"{geometric_mean(baseline['untrained']['test']):.2f} |",
              "", "A model above the unigram has learnt less than a word count; the untrained model sits near the "
              "vocabulary size.", "", "## Results", "", "Perplexities: geometric mean over the seeds "
              "(lowest–highest); distances: mean ± standard deviation over the seeds.", ""]
    lines += _results_table(arms, facts, runs, baseline)
    lines += ["", "![curves](teacher_forcing.png)", ""]
    if study["sweep"]:
        lines += _sweep_section(study, baseline)
    lines += ["## Per seed", "", "Validation perplexity, state carried / reset every window.", "",
              "| seed | " + " | ".join(arms) + " |", "| --- |" + " --- |" * len(arms)]
    per_seed = lambda arm, k: (f"{runs[arm][k]['valid_ppl']:.2f} / {runs[arm][k]['valid_ppl_reset']:.2f}"  # noqa: E731
                               if k < len(runs[arm]) else "—")
    lines += [f"| {seed} | " + " | ".join(per_seed(arm, k) for arm in arms) + " |" for k, seed in enumerate(seeds)]
    lines += ["", *_neighbour_section(arms, runs, baseline)]
    lines += [f"## Greedy samples (seed {seeds[0]})", "", "Each `<eos>` is shown as ` / `.", ""]
    for k in range(num_samples):
        lines += [f"- {arm}: {runs[arm][0]['samples'][k]!r}" for arm in arms] + [""]
    lines += ["## Conclusions", ""]
    for arm, text in conclusions.items():
        lines += [f"**{arm}** against teacher-forced: {text} {unigram_sentence(facts[arm], baseline)}", ""]
    lines += ["## What this does not show", "",
              f"- One model (hidden {base.hidden_size}), one learning rate and {epochs}: longer training or a "
              "schedule tuned per arm may change the ranking; with more seeds a smaller difference becomes "
              "testable.",
              "- The score is teacher-forced perplexity, the measure of a language model. Scheduled sampling is "
              "argued for what it does to *generation* (the model reading its own words); how well each model "
              "continues its own text is not measured here (see the sampling report for how to measure it).",
              "- Eager fp32 on this machine: the numbers are what one reproduces with the command, not a GPU's.",
              ""]
    path.write_text("\n".join(lines))


def _seeds_said(arm_seeds: list[int], seeds: list[int]) -> str:
    if arm_seeds == seeds:
        return ""
    return (f" Seeds {', '.join(map(str, arm_seeds))} only; it is compared with the teacher-forced runs of those "
            "seeds.")


def _results_table(arms: list[str], facts: dict, runs: dict, baseline: dict) -> list[str]:
    def spread(key: str, arm: str) -> str:
        values = [r[key] for r in runs[arm]]
        return fmt({"mean": geometric_mean(values), "min": min(values), "max": max(values), "values": values})

    def vs_tf(arm: str) -> str:
        verdict = facts[arm]["valid_test"] if arm in facts else None
        if arm == TF:
            return "—"
        if verdict is None:
            return "no test (a seed diverged or one seed)"
        said = f"t = {verdict['t']:.3g}, {verdict['df']} df"
        return f"{said}: {'significant' if verdict['lower'] else 'not significant'}"

    unigram = baseline["unigram"]["valid"]
    below = lambda arm: f"{sum(r['valid_ppl'] < unigram for r in runs[arm])} of {len(runs[arm])}"
    random = baseline["random"]
    lines = ["| | " + " | ".join(arms) + " |", "| --- |" + " --- |" * len(arms)]
    for label, key in (("validation perplexity, state carried", "valid_ppl"),
                       ("validation perplexity, state reset every window", "valid_ppl_reset"),
                       ("test perplexity, state carried", "test_ppl"),
                       ("test perplexity, state reset every window", "test_ppl_reset")):
        lines.append(f"| {label} | " + " | ".join(spread(key, arm) for arm in arms) + " |")
    lines.append(f"| seeds below the unigram's {unigram:.2f} (validation, carried) | "
                 + " | ".join(below(arm) for arm in arms) + " |")
    lines.append("| against teacher-forced: Welch's t on log validation perplexity, 5% level | "
                 + " | ".join(vs_tf(arm) for arm in arms) + " |")
    for pair in (next(iter(facts.values()))["pairs"] if facts else {}):
        for matrix, key in (("input", "distances"), ("output", "output_distances")):
            d, (mean, sd) = random[matrix]["dim"], random[matrix]["closed_form"]
            start = [start[pair] for start in baseline["start"][matrix]]
            lines.append(f"| cosine distance {pair}, {matrix} {'embedding' if matrix == 'input' else 'layer'} "
                         f"(untrained: {statistics.fmean(start):.4f}; random {d}-d vectors: {mean:.0f} ± {sd:.4f}) | "
                         + " | ".join(_mean_sd([r[key][pair] for r in runs[arm]]) for arm in arms) + " |")
        for word in facts[arms[1]]["pairs"][pair]["fed"] if len(arms) > 1 else ():
            times = facts[arms[1]]["pairs"][pair]["fed"][word]
            lines.append(f"| seeds whose input vector of '{word}' moved (fed {times} times in the true text) | "
                         + " | ".join(f"{sum(r['updated'][word] for r in runs[arm])} of {len(runs[arm])}"
                                      for arm in arms) + " |")
    for matrix in ("input", "output"):
        untrained_mean, untrained_sd = random[matrix]["untrained_rows"]
        typical = lambda arm, k: statistics.fmean(r["typical_distance"][matrix][k] for r in runs[arm])  # noqa: E731
        lines.append(f"| typical pair of words, {matrix}: mean ± sd over 20,000 random pairs, averaged over the "
                     f"seeds (untrained, first seed: {untrained_mean:.3f} ± {untrained_sd:.3f}) | "
                     + " | ".join(f"{typical(arm, 0):.3f} ± {typical(arm, 1):.3f}" for arm in arms) + " |")
    return lines


def _mean_sd(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.4f}" + (f" ± {sd:.4f}" if len(values) > 1 else "")


def _sweep_section(study: dict, baseline: dict) -> list[str]:
    unigram = baseline["unigram"]["valid"]
    lines = ["## The sweep of P", "", "Constant P, argmax fed back; perplexities per seed, state carried (reset).", "",
             "| P | validation | test | below the unigram |", "| --- | --- | --- | --- |"]
    for row in study["sweep"]:
        per_seed = lambda key: ", ".join(f"{v:.2f} ({r:.2f})" for v, r in
                                         zip(row[key]["values"], row[f"{key}_reset"]["values"]))
        lines.append(f"| {row['p']:g} | {per_seed('valid_ppl')} | {per_seed('test_ppl')} | "
                     f"{row['below_unigram']} of {len(row['seeds'])} seeds |")
    lines += ["", sweep_sentence(study["sweep"], unigram), ""]
    return lines


def _neighbour_section(arms: list[str], runs: dict, baseline: dict) -> list[str]:
    untrained = baseline["neighbours_untrained"]
    if not untrained:
        return []
    lines = [f"## Nearest neighbours in the output layer (seed {runs[arms[0]][0]['seed']})", "",
             "The output layer's rows are updated at every step for every word (the softmax's gradient reaches "
             "them all), unlike an input row, which moves only when its word is fed. Cosine similarity, 5 nearest.",
             "", "| word | untrained | " + " | ".join(arms) + " |", "| --- | --- |" + " --- |" * len(arms)]
    for word, near in untrained.items():
        lines.append(f"| {word} | {', '.join(near)} | "
                     + " | ".join(", ".join(runs[arm][0]["neighbours"][word]) for arm in arms) + " |")
    return lines + [""]
