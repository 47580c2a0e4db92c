"""Teacher forcing against free running and scheduled sampling, side by side, written up as a
report folder (markdown, JSON, PNG): the same model, seeds and step budget trained each way, all
judged on teacher-forced perplexity, beside a model that only counts words (the unigram) and an
untrained one.

Every sentence of the conclusions is computed from the report's numbers. A difference between the
teacher-forced arm and another is called only when a two-sided t-test over the seeds finds it at
the 5% level: Welch's test for perplexities and steps, a paired test for distances (every arm of a
seed starts from the same weights, so each seed gives one change to compare). With one seed no
difference is called: one run cannot tell a difference from seed-to-seed noise.

The arms train into a runs folder by setting and seed; a finished run there is reused and an
unfinished one resumed, so a long comparison stopped half-way goes on where it stopped, and a P
of the sweep that is also an arm trains once.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

from fastlm.config import TrainConfig
from fastlm.data import EOS, Corpus, batchify, num_windows
from fastlm.device import pick_device
from fastlm.errors import TrainingError
from fastlm.experiments.baselines import closed_form_distance, distance_spread, unigram_loss
from fastlm.experiments.common import corpus_of, fresh_folder
from fastlm.experiments.teacher_forcing_conclusions import conclusion_of
from fastlm.experiments.teacher_forcing_facts import FR, TF, facts_of_runs, sweep_facts
from fastlm.experiments.teacher_forcing_report import plot_curves, write_markdown
from fastlm.experiments.teacher_forcing_runs import TEACHER_FORCED, Arm, arm_config, train_arm
from fastlm.generation.embedding import MATRICES, cosine_distance, neighbors, word_vectors
from fastlm.generation.sampling import generate, to_text
from fastlm.models.lm import RNNLM, load_model
from fastlm.models.lstm import resolve_backend
from fastlm.scoring import evaluate, perplexity
from fastlm.training.rundir import read_metrics

NEIGHBOUR_WORDS = ("company", "year")  # frequent words, fed thousands of times: their neighbours show learning
NEIGHBOURS = 5


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


def compare_teacher_forcing(base: TrainConfig, out_dir: Path, arms: list[Arm], steps: int | None = None,
                            seeds: int = 5, sweep: list[float] = (), sweep_seeds: int = 2,
                            runs_dir: Path | None = None, target_ppl: float | None = None,
                            pairs=(("army", "taxpayer"),), eval_interval: int | None = None,
                            num_samples: int = 3, sample_words: int = 20, eval_tokens: int | None = 20000) -> dict:
    """Train the teacher-forced arm and `arms` for `seeds` seeds (base.seed, base.seed + 1, …) and the
    constant-P arms of `sweep` for the first `sweep_seeds` of them, all for `steps` optimizer steps
    (default: one epoch); write report.md, report.json and a PNG into `out_dir`."""
    for name, value in (("--steps", steps), ("--seeds", seeds), ("--eval-interval", eval_interval),
                        ("--sweep-seeds", sweep_seeds if sweep else None)):
        if value is not None and value < 1:
            raise TrainingError(f"{name} must be at least 1, got {value}")
    corpus = corpus_of(base)
    train_rows = batchify(corpus.train, base.batch_size)
    per_epoch = num_windows(train_rows, base.seq_len)
    steps = steps or per_epoch
    eval_interval = eval_interval or max(1, steps // 25)
    if eval_interval > steps:
        raise TrainingError(f"--eval-interval {eval_interval} leaves no evaluation within --steps {steps}: lower it")
    out_dir = fresh_folder(out_dir)
    unknown = [word for pair in pairs for word in pair if word not in corpus.dictionary]
    if unknown:
        raise TrainingError(f"--pair: {', '.join(repr(w) for w in unknown)} not in the vocabulary of {base.data}: "
                            "pick words of its train.txt")
    runs_dir = runs_dir or out_dir / "runs"
    seed_list = [base.seed + k for k in range(seeds)]
    arms = _distinct(arms)
    sweep_arms = [Arm(p) for p in sweep]
    plan = [(arm.setting(), seed) for arm in arms for seed in seed_list[:arm.seeds or seeds]]
    plan += [(arm, seed) for arm in sweep_arms for seed in seed_list[:sweep_seeds] if (arm, seed) not in plan]

    started = time.perf_counter()
    for arm, seed in plan:
        train_arm(arm_config(base, arm, seed, steps, eval_interval, eval_tokens, runs_dir, per_epoch))

    prompts = _prompts(corpus, num_samples)
    baseline = _baselines(base, corpus, seed_list, pairs, eval_tokens)
    runs = {arm: [] for arm in dict.fromkeys(arm for arm, _ in plan)}
    for arm, seed in plan:
        cfg = arm_config(base, arm, seed, steps, eval_interval, eval_tokens, runs_dir, per_epoch)
        first = seed == base.seed
        runs[arm].append(_summarize(Path(cfg.out), corpus, cfg, baseline["initial"][seed], prompts if first else [],
                                    pairs, sample_words, first))

    fed = _times_fed(train_rows, base.seq_len, steps, corpus, pairs)
    facts = {arm.name: _facts_against_teacher_forcing(runs, arm.setting(), baseline, pairs, fed, steps, seed_list,
                                                      eval_interval, target_ppl) for arm in arms[1:]}
    conclusions = {name: conclusion_of(arm_facts) for name, arm_facts in facts.items()}
    swept = sweep_facts({arm.p: runs[arm][:sweep_seeds] for arm in sweep_arms}, baseline["unigram"])
    study = {"steps": steps, "epochs": steps / per_epoch, "seeds": seed_list, "arms": [arm.name for arm in arms],
             "arm_seeds": {arm.name: [run["seed"] for run in runs[arm.setting()]] for arm in arms},
             "described": {arm.name: arm.described() for arm in arms},
             "eval_interval": eval_interval, "eval_tokens": eval_tokens, "baseline": _public(baseline),
             "sweep": swept, "runs_dir": str(runs_dir),
             "train_seconds": {f"{arm.folder}/seed-{run['seed']}": run["train_seconds"]
                               for arm in runs for run in runs[arm]},
             "wall_seconds": time.perf_counter() - started}
    named_runs = {arm.name: runs[arm] for arm in runs}
    plot_curves(out_dir / "teacher_forcing.png", named_runs, [arm.name for arm in arms], study)
    write_markdown(out_dir / "report.md", base, study, facts, named_runs, len(prompts), conclusions)
    report = {"config": asdict(base), "study": study, "facts": facts, "runs": named_runs, "conclusions": conclusions}
    (out_dir / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    return report


def _distinct(arms: list["Arm"]) -> list["Arm"]:
    """Teacher forcing first, then each setting once, with the most seeds asked for it."""
    kept: dict[Arm, Arm] = {TEACHER_FORCED: TEACHER_FORCED}
    for arm in arms:
        setting = arm.setting()
        if setting in kept and setting != TEACHER_FORCED:
            counts = (kept[setting].seeds, arm.seeds)
            arm = replace(arm, seeds=None if None in counts else max(counts))
        if setting != TEACHER_FORCED:
            kept[setting] = arm
    return list(kept.values())


def _facts_against_teacher_forcing(runs: dict, arm: "Arm", baseline: dict, pairs, fed: dict, steps: int,
                                   seeds: list[int], eval_interval: int, target_ppl: float | None) -> dict:
    """The arm against the teacher-forced runs of its own seeds (the same initial weights)."""
    count = len(runs[arm])
    start = {matrix: distances[:count] for matrix, distances in baseline["start"].items()}
    return facts_of_runs({TF: runs[TEACHER_FORCED][:count], FR: runs[arm]}, start, pairs, fed, steps, seeds[:count],
                         eval_interval, target_ppl, {TF: TF, FR: arm.name})


# -- what the arms are read against, and what one trained model gives ---------------------------------

def _initial_model(cfg: TrainConfig, vocab_size: int) -> RNNLM:
    """The model the trainer starts from for this config: its seed, then the same model."""
    torch.manual_seed(cfg.seed)
    backend = resolve_backend(cfg.backend, pick_device(cfg.device), None, graphed=False)
    return RNNLM.from_config(asdict(cfg), vocab_size, backend).to(pick_device(cfg.device))


def _baselines(base: TrainConfig, corpus: Corpus, seeds: list[int], pairs, eval_tokens: int | None) -> dict:
    """The unigram's perplexities, each seed's untrained model (its perplexities, word vectors and
    the pairs' distances), and the cosine distance of random vectors, closed form and over the
    untrained matrices' rows."""
    vocab = len(corpus.dictionary)
    rows = {split: batchify(getattr(corpus, split), base.eval_batch_size) for split in ("valid", "test")}
    unigram = {split: perplexity(unigram_loss(corpus.train, rows[split], vocab)) for split in rows}
    # The curves' validation sample, as the trainer cuts it: the first columns of the rows.
    columns = min(max(2, eval_tokens // base.eval_batch_size) if eval_tokens else math.inf, rows["valid"].shape[1])
    unigram_sample = perplexity(unigram_loss(corpus.train, rows["valid"][:, :columns], vocab))
    untrained, initial = {"valid": [], "test": []}, {}
    for seed in seeds:
        model = _initial_model(replace(base, seed=seed), vocab)
        initial[seed] = {matrix: word_vectors(model, matrix) for matrix in MATRICES}
        for split in untrained:
            untrained[split].append(perplexity(evaluate(model, _rows(getattr(corpus, split), base, model),
                                                        base.seq_len)))
    first, ids = initial[seeds[0]], corpus.dictionary.word2idx
    random = {matrix: {"dim": first[matrix].shape[1], "closed_form": closed_form_distance(first[matrix].shape[1]),
                       "untrained_rows": distance_spread(first[matrix])} for matrix in MATRICES}
    start = {matrix: [_distances(initial[seed], corpus, pairs)[matrix] for seed in seeds] for matrix in MATRICES}
    neighbours = {word: [corpus.dictionary.idx2word[i] for i, _ in neighbors(first["output"], ids[word], NEIGHBOURS)]
                  for word in NEIGHBOUR_WORDS if word in ids}
    sample = {"rows": base.eval_batch_size, "columns": columns, "targets": base.eval_batch_size * (columns - 1)}
    return {"unigram": unigram, "unigram_sample": unigram_sample, "sample": sample, "untrained": untrained,
            "random": random, "start": start,
            "neighbours_untrained": neighbours, "initial": initial}


def _public(baseline: dict) -> dict:
    return {key: value for key, value in baseline.items() if key != "initial"}  # tensors stay out of the JSON


def _rows(ids: torch.Tensor, cfg: TrainConfig, model: RNNLM) -> torch.Tensor:
    return batchify(ids, cfg.eval_batch_size).to(model.linear.weight.device)


def _distances(vectors: dict, corpus: Corpus, pairs) -> dict:
    ids = corpus.dictionary.word2idx
    return {matrix: {f"{a}/{b}": cosine_distance(vectors[matrix], ids[a], ids[b]) for a, b in pairs}
            for matrix in MATRICES}


def _summarize(run_dir: Path, corpus: Corpus, cfg: TrainConfig, initial: dict, prompts, pairs,
               sample_words: int, first_seed: bool) -> dict:
    records = read_metrics(run_dir)
    model, dictionary, _ = load_model(run_dir, pick_device(cfg.device))
    vectors = {matrix: word_vectors(model, matrix) for matrix in MATRICES}
    words = {word for pair in pairs for word in pair}
    samples = [to_text(p + generate(model, sample_words, prompt=p, strategy="greedy")[0], dictionary).strip()
               .replace("\n", " / ") for p in prompts]
    interim = [r for r in records if r["split"] == "valid" and "tokens" in r]
    score = lambda split, carry: perplexity(evaluate(model, _rows(getattr(corpus, split), cfg, model), cfg.seq_len,
                                                     carry_state=carry))
    ids, distances = dictionary.word2idx, _distances(vectors, corpus, pairs)
    return {
        "seed": cfg.seed,
        "teacher_forcing": cfg.teacher_forcing,
        "schedule": cfg.teacher_forcing_schedule,
        "token": cfg.free_running_token,
        "train": [(r["global_step"], r["loss"]) for r in records if r["split"] == "train"],
        "valid": [(r["global_step"], r["ppl"]) for r in interim],
        "valid_tokens": interim[0]["tokens"],
        "train_seconds": max(r["time"] for r in records if "time" in r),  # steps and validations, as trained
        # The state carried through the whole split, as the model reads text, and reset to zeros at
        # every window, so that no state older than a window is read: a state that drifts over a
        # long stream shows as the difference.
        "valid_ppl": score("valid", True),
        "test_ppl": score("test", True),
        "valid_ppl_reset": score("valid", False),
        "test_ppl_reset": score("test", False),
        "distances": distances["input"],
        "output_distances": distances["output"],
        "typical_distance": {matrix: distance_spread(vectors[matrix]) for matrix in MATRICES},
        # Adam or SGD moves an untied input row only once it has had a gradient, i.e. once the word
        # was fed as an input; a row never fed keeps its initial value exactly.
        "updated": {w: not torch.equal(vectors["input"][ids[w]], initial["input"][ids[w]]) for w in sorted(words)},
        "neighbours": {word: [dictionary.idx2word[i] for i, _ in neighbors(vectors["output"], ids[word], NEIGHBOURS)]
                       for word in NEIGHBOUR_WORDS if word in ids} if first_seed else {},
        "samples": samples,
    }


def _times_fed(rows: torch.Tensor, seq_len: int, steps: int, corpus: Corpus, pairs) -> dict[str, int]:
    """How often each word is an input of the true text in the first `steps` windows (epochs repeat)."""
    per_epoch = num_windows(rows, seq_len)
    epochs, rest = divmod(steps, per_epoch)
    counts = lambda columns: torch.bincount(rows[:, :columns].reshape(-1), minlength=len(corpus.dictionary))
    fed = epochs * counts(per_epoch * seq_len) + counts(rest * seq_len)
    return {w: int(fed[corpus.dictionary.word2idx[w]]) for pair in pairs for w in pair}


