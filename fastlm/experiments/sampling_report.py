"""How the ways of sampling a trained model differ, written up as a report folder (report.md, report.json).

Every strategy (greedy; multinomial at T = 1; a lower temperature; top-k; top-p) continues the same
prompts, real sentence openings from the validation text, and each prompt's true continuation is
the reference; words drawn from their training-text counts, with no model at all, are a baseline.
Each set of continuations is measured alike: distinct-1 and distinct-2, 3-gram repetition, the <unk>
and <eos> shares, and the perplexity the model assigns to it, teacher-forced from the state its
prompt leaves. That perplexity separates the strategies most plainly: greedy text is what the
model finds likeliest, far below real text, while a word drawn at T = 1 is on average as surprising
to the model as its predictive entropy, which for a calibrated model is its perplexity on real text.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from fastlm.data import EOS, UNK, Dictionary, batchify
from fastlm.device import check_seed
from fastlm.errors import UsageError
from fastlm.experiments.baselines import unigram_loss
from fastlm.experiments.common import fresh_folder
from fastlm.experiments.trained import Trained, html_escaped, setting
from fastlm.generation.sampling import check_sampling, next_words, to_text
from fastlm.models.lm import RNNLM
from fastlm.scoring.plain import evaluate, perplexity

UNIGRAM = "word counts only (no model)"
REAL = "real text (true continuations)"
REPEAT_N = 3  # repetition is counted on 3-grams: a repeated word is often fine ("the"), a repeated 3-gram rarely


@dataclass(frozen=True)
class Strategy:
    name: str
    strategy: str = "multinomial"
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None


def strategies(temperature: float, top_k: int, top_p: float) -> list[Strategy]:
    """The strategies compared, the two plain ones first (the conclusions name them)."""
    return [Strategy("greedy", "greedy"), Strategy("multinomial T=1"),
            Strategy(f"temperature {temperature:g}", temperature=temperature), Strategy(f"top-k {top_k}", top_k=top_k),
            Strategy(f"top-p {top_p:g}", top_p=top_p)]


# -- what is measured on a set of continuations ----------------------------------------------------

def _ngrams(sample: list[int], n: int) -> list[tuple[int, ...]]:
    return [tuple(sample[i:i + n]) for i in range(len(sample) - n + 1)]


def distinct(samples: list[list[int]], n: int) -> float:
    """Distinct n-grams over all n-grams, pooled over the samples (no n-gram crosses two samples)."""
    grams = [gram for sample in samples for gram in _ngrams(sample, n)]
    return len(set(grams)) / len(grams) if grams else math.nan


def repetition(samples: list[list[int]], n: int = REPEAT_N) -> float:
    """The fraction of n-grams equal to an n-gram earlier in the same sample, pooled over the samples."""
    repeated = total = 0
    for sample in samples:
        seen: set[tuple[int, ...]] = set()
        for gram in _ngrams(sample, n):
            repeated += gram in seen
            total += 1
            seen.add(gram)
    return repeated / total if total else math.nan


def share(samples: list[list[int]], word: int | None) -> float:
    words = [w for sample in samples for w in sample]
    return sum(w == word for w in words) / len(words) if words else math.nan


@torch.no_grad()
def continuation_scores(model: RNNLM, prompts: Tensor, continuations: Tensor) -> tuple[Tensor, Tensor]:
    """For each word of each continuation, −log p(word | prompt, earlier words) and the entropy of
    that prediction, both (N, W) float64: teacher-forced from the zero state, where `generate` starts."""
    model.eval()
    count, prompt_words = prompts.shape
    device = model.linear.weight.device
    inputs = torch.cat([prompts, continuations[:, :-1]], dim=1).to(device)
    logits, _ = model(inputs, model.init_state(count))
    log_probs = F.log_softmax(logits.view(count, inputs.shape[1], -1)[:, prompt_words - 1:].double(), dim=-1).cpu()
    losses = -log_probs.gather(-1, continuations[..., None].cpu()).squeeze(-1)
    entropies = -(log_probs.exp() * log_probs).sum(dim=-1)
    return losses, entropies


def measure(samples: list[list[int]], losses: Tensor, entropies: Tensor, dictionary: Dictionary) -> dict:
    """The row of one set of continuations. `surprise_gap`: the mean of loss − entropy per word, with its
    standard error over the continuations; it is 0 in expectation for words drawn from the model itself,
    and on real text it is 0 only if the model is calibrated (as sure as it is right)."""
    per_sample = losses.mean(dim=1)
    gaps = (losses - entropies).mean(dim=1)
    gap_se = float(gaps.std() / math.sqrt(gaps.numel())) if gaps.numel() > 1 else math.nan
    return {"distinct_1": distinct(samples, 1), "distinct_2": distinct(samples, 2),
            f"repetition_{REPEAT_N}": repetition(samples),
            "unk_share": share(samples, dictionary.word2idx.get(UNK)),
            "eos_share": share(samples, dictionary.word2idx.get(EOS)),
            "model_ppl": perplexity(float(losses.mean())), "model_ppl_lowest": perplexity(float(per_sample.min())),
            "model_ppl_highest": perplexity(float(per_sample.max())),
            "expected_ppl": perplexity(float(entropies.mean())), "surprise_gap": (float(gaps.mean()), gap_se)}


# -- the prompts, the continuations ----------------------------------------------------------------

def prompts_and_references(text: Tensor, eos: int, count: int, prompt_words: int, words: int) -> tuple[Tensor, Tensor]:
    """`count` sentence openings spread evenly over `text`: the first `prompt_words` words of each, and the
    `words` that truly follow them."""
    starts = torch.cat([torch.zeros(1, dtype=torch.long), (text == eos).nonzero().squeeze(-1) + 1])
    starts = starts[starts + prompt_words + words <= text.numel()]
    if starts.numel() < count:
        raise UsageError(f"the validation text has {starts.numel()} sentence openings with {prompt_words} + {words} "
                         f"words after them, fewer than --samples {count}: ask for fewer or shorter samples")
    chosen = starts[torch.linspace(0, starts.numel() - 1, count).round().long()]
    rows = torch.stack([text[start:start + prompt_words + words] for start in chosen.tolist()])
    return rows[:, :prompt_words], rows[:, prompt_words:]


@torch.no_grad()
def continue_prompts(model: RNNLM, prompts: Tensor, words: int, strategy: Strategy, seed: int) -> list[list[int]]:
    """One continuation of `words` words per prompt, all prompts as one batch from one generator seeded
    with `seed`, step by step as `generate` does for copies of one prompt (it takes a single prompt)."""
    model.eval()
    device = model.linear.weight.device
    generator = torch.Generator(device=device).manual_seed(seed)
    choose = dict(strategy=strategy.strategy, temperature=strategy.temperature, top_k=strategy.top_k,
                  top_p=strategy.top_p, generator=generator)
    count, prompt_words = prompts.shape
    logits, state = model(prompts.to(device), model.init_state(count))
    word = next_words(logits.view(count, prompt_words, -1)[:, -1], **choose)
    chosen = [word]
    for _ in range(words - 1):
        logits, state = model(word[:, None], state)
        word = next_words(logits, **choose)
        chosen.append(word)
    return torch.stack(chosen, dim=1).tolist()


def unigram_samples(train: Tensor, vocab_size: int, count: int, words: int, seed: int) -> list[list[int]]:
    """Words drawn independently from their frequencies in the training text."""
    counts = torch.bincount(train, minlength=vocab_size).double()
    generator = torch.Generator().manual_seed(seed)
    draws = torch.multinomial(counts / counts.sum(), count * words, replacement=True, generator=generator)
    return draws.view(count, words).tolist()


# -- the report ----------------------------------------------------------------------------------

def compare_sampling(trained: Trained, out_dir: Path, *, samples: int = 40, words: int = 50, prompt_words: int = 10,
                     seed: int = 1, temperature: float = 0.7, top_k: int = 40, top_p: float = 0.9, show: int = 3,
                     note: str | None = None) -> dict:
    """Continue `samples` validation openings with each strategy; writes report.md and report.json."""
    if samples < 1 or prompt_words < 1 or words < REPEAT_N:
        raise UsageError(f"--samples and --prompt-words must be at least 1 and --words at least {REPEAT_N}, got "
                         f"{samples}, {prompt_words} and {words}")
    compared = strategies(temperature, top_k, top_p)
    for strategy in compared:
        check_sampling(strategy.strategy, strategy.temperature, strategy.top_k, strategy.top_p)
    check_seed(seed)
    model, dictionary, corpus = trained.model, trained.dictionary, trained.corpus
    prompts, references = prompts_and_references(corpus.valid, dictionary.word2idx[EOS], samples, prompt_words, words)
    out_dir = fresh_folder(out_dir)

    continuations = {strategy.name: continue_prompts(model, prompts, words, strategy, seed) for strategy in compared}
    continuations[UNIGRAM] = unigram_samples(corpus.train, len(dictionary), samples, words, seed)
    continuations[REAL] = references.tolist()
    rows = {name: measure(texts, *continuation_scores(model, prompts, torch.tensor(texts)), dictionary)
            for name, texts in continuations.items()}
    eval_rows = trained.config["eval_batch_size"]
    valid = batchify(corpus.valid, eval_rows).to(model.linear.weight.device)
    reference = {"valid_ppl": perplexity(evaluate(model, valid, trained.config["seq_len"])),
                 "unigram_valid_ppl": perplexity(unigram_loss(corpus.train, valid, len(dictionary)))}
    report = {"setting": setting(trained), "note": note, "config": trained.config,
              "parameters": {"samples": samples, "words": words, "prompt_words": prompt_words, "seed": seed,
                             "strategies": [asdict(strategy) for strategy in compared]},
              "rows": rows, "reference": reference,
              "conclusions": conclusions(rows, reference, prompt_words, compared),
              "texts": [{"prompt": _line(prompt, dictionary),
                         **{name: _line(texts[i], dictionary) for name, texts in continuations.items()}}
                        for i, prompt in enumerate(prompts.tolist())]}
    (out_dir / "report.md").write_text(html_escaped("\n".join(_markdown(report, show)) + "\n"))
    (out_dir / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    return report


def _line(ids: list[int], dictionary: Dictionary) -> str:
    return to_text(ids, dictionary).strip().replace("\n", " / ")


def _percent(fraction: float) -> str:
    return f"{100 * fraction:.1f}%"


def _relative(value: float, reference: float) -> str:
    change = value / reference - 1
    if abs(change) < 0.005:
        return "equal to"
    return f"{abs(change):.0%} {'above' if change > 0 else 'below'}"


def _gap(row: dict) -> str:
    gap, se = row["surprise_gap"]
    return f"loss − entropy {gap:+.3f} ± {se:.3f} nats per word, mean ± standard error over the continuations"


def _calibration(real: dict) -> str:
    """Whether the model's loss on real text is what its entropy predicts, as it is by construction on
    its own T = 1 text: only then do the two perplexities differ just as far as the entropies along them."""
    gap, se = real["surprise_gap"]
    if not abs(gap) > 2 * se:
        return ("within two standard errors the model is as sure as it is right on real text (calibrated), as it "
                "is by construction on its own T = 1 text: the two perplexities differ only as far as the entropies "
                "along the two texts do.")
    sure = "more sure than it is right (overconfident)" if gap > 0 else "less sure than it is right (underconfident)"
    return (f"the model is {sure} on real text by more than two standard errors, which it cannot be on its own "
            "T = 1 text: besides the entropies along the two texts, that gap separates their perplexities.")


def conclusions(rows: dict[str, dict], reference: dict, prompt_words: int, compared: list[Strategy]) -> list[str]:
    """Every sentence from the numbers: greedy against real text, T = 1 against the model's entropy,
    which strategy comes closest to real text on each measure, and the no-model baseline."""
    greedy, t1, real, counts = rows[compared[0].name], rows[compared[1].name], rows[REAL], rows[UNIGRAM]
    rep = f"repetition_{REPEAT_N}"
    more = "more" if greedy[rep] > real[rep] else "no more"
    sentences = [
        f"Greedy decoding repeats itself {more} than real text: {_percent(greedy[rep])} of its {REPEAT_N}-grams repeat "
        f"an earlier one of the same continuation, against {_percent(real[rep])} in the true continuations; its "
        f"distinct-2 is {greedy['distinct_2']:.3f} against {real['distinct_2']:.3f}.",
        f"The model's perplexity on its own greedy continuations is {greedy['model_ppl']:.2f}, against "
        f"{real['model_ppl']:.2f} on the true continuations of the same prompts: greedy picks the likeliest word at "
        "every step, so its text is "
        + ("far likelier to the model than real text." if greedy["model_ppl"] < real["model_ppl"] / 2 else
           "likelier to the model than real text." if greedy["model_ppl"] < real["model_ppl"] else
           "no likelier to the model than real text, an unexpected result."),
        f"Drawn at T = 1, its continuations score {t1['model_ppl']:.2f}, "
        f"{_relative(t1['model_ppl'], real['model_ppl'])} the true continuations' {real['model_ppl']:.2f}. A word "
        "drawn from the model's distribution is on average as surprising to it as that distribution's entropy: exp "
        f"of the mean entropy along these continuations is {t1['expected_ppl']:.2f} ({_gap(t1)}). On the true "
        f"continuations the model expects {real['expected_ppl']:.2f} and gets {real['model_ppl']:.2f} "
        f"({_gap(real)}), so {_calibration(real)}",
        _closest(rows, [s.name for s in compared]),
        f"Words drawn from training-text counts alone have distinct-2 {counts['distinct_2']:.3f} (real text: "
        f"{real['distinct_2']:.3f}) yet a model perplexity of {counts['model_ppl']:.0f}: variety alone is not "
        "text, and the model's perplexity tells such word salad apart where distinct-n cannot.",
        f"<unk> makes up {_percent(real['unk_share'])} of the true continuations, {_percent(t1['unk_share'])} of the "
        f"T = 1 ones and {_percent(greedy['unk_share'])} of the greedy ones; <eos> {_percent(real['eos_share'])}, "
        f"{_percent(t1['eos_share'])} and {_percent(greedy['eos_share'])}.",
        f"For scale: on the whole validation text, its state carried from the start, the model's perplexity is "
        f"{reference['valid_ppl']:.2f}, and word counts alone (a unigram model) give "
        f"{reference['unigram_valid_ppl']:.2f}. The true continuations score {real['model_ppl']:.2f}, "
        + (f"higher, since each is read from a zero state after only {prompt_words} words of context."
           if real["model_ppl"] > reference["valid_ppl"] else
           "no higher despite the short context: these openings are easier than the average text."),
    ]
    return sentences


def _closest(rows: dict[str, dict], names: list[str]) -> str:
    """Which strategy is nearest the real text on distinct-2, on repetition, and on the model's perplexity
    (a ratio, since perplexities multiply)."""
    real = rows[REAL]
    measures = (("distinct-2", "distinct_2", lambda a, b: abs(a - b), "{:.3f}"),
                (f"{REPEAT_N}-gram repetition", f"repetition_{REPEAT_N}", lambda a, b: abs(a - b), "{:.1%}"),
                ("the model's perplexity", "model_ppl", lambda a, b: abs(math.log(a / b)), "{:.2f}"))
    parts, winners = [], set()
    for label, key, gap, shown in measures:
        best = min(names, key=lambda name: gap(rows[name][key], real[key]))
        winners.add(best)
        parts.append(f"on {label}, {best} ({shown.format(rows[best][key])} against {shown.format(real[key])})")
    tail = f": {winners.pop()} on all three." if len(winners) == 1 else "."
    return "Closest to the true continuations " + "; ".join(parts) + tail


def _markdown(report: dict, show: int) -> list[str]:
    p, rows = report["parameters"], report["rows"]
    rep = f"repetition_{REPEAT_N}"
    lines = [f"# Sampling a trained model: {p['samples']} continuations of {p['words']} words per strategy", "",
             "## Setting", "", report["setting"], *([report["note"]] if report["note"] else []), "",
             f"Prompts: {p['samples']} sentence openings spread evenly over the validation text (valid.txt), the first "
             f"{p['prompt_words']} words of each, fed from a zero state; the reference is the {p['words']} words that "
             f"truly follow. Every strategy continues every prompt once, all prompts as one batch drawn with one "
             f"generator seeded {p['seed']} (the same seed for every strategy), for exactly {p['words']} words: none "
             "stops at <eos>, which counts as a word. "
             f"\"{UNIGRAM}\": {p['words']} words drawn independently from train.txt's word counts per prompt (seed "
             f"{p['seed']}). The model's perplexity of a continuation is exp of the mean of −log p(word | prompt, "
             "earlier words) over its words, from the untempered, unfiltered model, teacher-forced from the state "
             "the prompt leaves; \"expected\" is exp of the mean entropy of those predictions, the perplexity the "
             "model would get if the words were drawn from it; loss − entropy is their difference per word, its mean "
             "and standard error over the continuations (0 in expectation for words drawn from the model at T = 1; "
             "on real text, 0 for a calibrated model).", "",
             f"Distinct-n: distinct n-grams over all n-grams of a row's {p['samples']} continuations (n-grams do not "
             f"cross continuations). {REPEAT_N}-gram repetition: the fraction of {REPEAT_N}-grams equal to one earlier "
             "in the same continuation. Shares: the fraction of words that are <unk> or <eos>.", "",
             "| strategy | distinct-1 | distinct-2 | 3-gram repetition | <unk> | <eos> | model's perplexity "
             "(per continuation: lowest–highest) | expected | loss − entropy, nats/word (± s.e.) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, row in rows.items():
        lines.append(f"| {name} | {row['distinct_1']:.3f} | {row['distinct_2']:.3f} | {_percent(row[rep])} | "
                     f"{_percent(row['unk_share'])} | {_percent(row['eos_share'])} | {row['model_ppl']:.2f} "
                     f"({row['model_ppl_lowest']:.2f}–{row['model_ppl_highest']:.2f}) | {row['expected_ppl']:.2f} | "
                     f"{row['surprise_gap'][0]:+.3f} ± {row['surprise_gap'][1]:.3f} |")
    reference = report["reference"]
    lines += ["", f"Baselines: the model's perplexity on the whole validation text, state carried: "
              f"{reference['valid_ppl']:.2f}; a unigram model (train.txt's word counts) on it: "
              f"{reference['unigram_valid_ppl']:.2f}.", "", "## Conclusions", "",
              *(f"- {sentence}" for sentence in report["conclusions"]), "", "## Side by side", ""]
    for texts in report["texts"][:show]:
        lines += [f"Prompt: *{texts['prompt']}*", ""]
        lines += [f"- **{name}**: {text}" for name, text in texts.items() if name != "prompt"]
        lines.append("")
    lines += ["Every continuation is in report.json.", "", "## What this does not show", "",
              "- Whether any text is good: no person read it; the measures only compare it with real text.",
              "- The spread over seeds: one seed, one draw per prompt. The lowest–highest column shows how much "
              f"single continuations vary; distinct-n also depends on how many words are pooled ({p['samples']} × "
              f"{p['words']} here), so compare rows only at equal sizes.",
              f"- Long-range behaviour: {p['words']} words from {p['prompt_words']} words of context, a zero "
              "starting state; the model's perplexity with the state carried through the text is the baseline line.",
              "- Other temperatures or thresholds: one of each; the test split, which is kept for the final score."]
    return lines
