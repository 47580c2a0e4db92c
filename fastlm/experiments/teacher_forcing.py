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
from dataclasses import asdict, replace
from pathlib import Path

import torch

from fastlm.config import TrainConfig
from fastlm.data import EOS, Corpus, batchify, num_windows
from fastlm.device import pick_device
from fastlm.errors import TrainingError
from fastlm.experiments.common import corpus_of, fresh_folder
from fastlm.experiments.teacher_forcing_facts import ARMS, FR, TF, facts_of_runs
from fastlm.experiments.teacher_forcing_report import conclusion_of, plot_curves, write_markdown
from fastlm.generation.embedding import cosine_distance, word_vectors
from fastlm.generation.sampling import generate, to_text
from fastlm.models.lm import RNNLM, load_model
from fastlm.models.lstm import resolve_backend
from fastlm.scoring import evaluate, perplexity
from fastlm.training.rundir import read_metrics
from fastlm.training.trainer import train


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
    corpus = corpus_of(base)
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
    facts = facts_of_runs(runs, start, pairs, _times_fed(train_rows, base.seq_len, steps, corpus, pairs), steps,
                   seed_list, eval_interval, target_ppl, names)
    conclusion = conclusion_of(facts)
    plot_curves(out_dir / "teacher_forcing.png", runs, facts)
    write_markdown(out_dir / "report.md", base, facts, runs, len(prompts), conclusion)
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
    records = read_metrics(run_dir)
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


