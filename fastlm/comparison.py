"""Teacher forcing against free running (or scheduled sampling), side by side, written up as a
report folder (markdown, JSON, PNG): the same model, seeds and step budget trained both ways, both
judged on teacher-forced perplexity."""
from __future__ import annotations

import json
import math
from dataclasses import asdict, replace
from pathlib import Path

from fastlm import plots
from fastlm.config import DEFAULT_DATA, TrainConfig, TrainingError, pick_device
from fastlm.data import EOS, Corpus, batchify, ensure_ptb, num_windows
from fastlm.embedding import cosine_distance, word_vectors
from fastlm.model import load_model
from fastlm.sampling import generate, to_text
from fastlm.trainer import evaluate, perplexity, train

MB = 2**20


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


def _summarize(run_dir: Path, corpus: Corpus, cfg: TrainConfig, prompts, pairs, sample_words: int) -> dict:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    model, dictionary, _ = load_model(run_dir, pick_device(cfg.device))
    rows = lambda ids: batchify(ids, cfg.eval_batch_size).to(model.linear.weight.device)
    vectors = word_vectors(model, "input")
    distances = {f"{a}/{b}": cosine_distance(vectors, dictionary.word2idx[a], dictionary.word2idx[b])
                 for a, b in pairs if a in dictionary and b in dictionary}
    samples = [to_text(p + generate(model, sample_words, prompt=p, strategy="greedy")[0], dictionary).strip()
               .replace("\n", " / ") for p in prompts]
    return {
        "teacher_forcing": cfg.teacher_forcing,
        "schedule": cfg.teacher_forcing_schedule,
        "train": [(r["global_step"], r["loss"]) for r in records if r["split"] == "train"],
        "valid": [(r["global_step"], r["ppl"]) for r in records if r["split"] == "valid" and "tokens" in r],
        "valid_ppl": perplexity(evaluate(model, rows(corpus.valid), cfg.seq_len)),
        "test_ppl": perplexity(evaluate(model, rows(corpus.test), cfg.seq_len)),
        "distances": distances,
        "samples": samples,
    }


def _first_step_at(curve, target: float):
    return next((step for step, ppl in curve if ppl <= target), None)


def _conclusion(tf: dict, fr: dict, target: float, steps: int) -> str:
    better, worse = ("teacher-forced", "free-running") if tf["valid_ppl"] <= fr["valid_ppl"] else \
        ("free-running", "teacher-forced")
    lo, hi = sorted((tf["valid_ppl"], fr["valid_ppl"]))
    reach = lambda r: f"step {r['steps_to_target']}" if r["steps_to_target"] else f"not within {steps} steps"
    text = (f"On teacher-forced validation perplexity the {better} model is better after {steps} steps: "
            f"{lo:.1f} against {hi:.1f} for the {worse} one ({100 * (hi - lo) / hi:.0f}% lower); on test, "
            f"{tf['test_ppl']:.1f} (teacher-forced) and {fr['test_ppl']:.1f} (free-running). "
            f"The teacher-forced model first reached perplexity {target:.1f} on the validation sample at "
            f"{reach(tf)}, the free-running one at {reach(fr)}. ")
    for pair in tf["distances"]:
        d_tf, d_fr = tf["distances"][pair], fr["distances"][pair]
        if f"{d_tf:.3f}" == f"{d_fr:.3f}":
            text += f"The cosine distance of {pair} is {d_tf:.3f} in both models (equal to three digits). "
            continue
        closer = "teacher-forced" if d_tf < d_fr else "free-running"
        text += (f"The cosine distance of {pair} is {d_tf:.3f} in the teacher-forced model and {d_fr:.3f} in the "
                 f"free-running one, so the {closer} model places them closer. ")
    if better == "teacher-forced":
        text += ("Free running feeds the model its own predictions, which are mostly wrong early in training, so "
                 "its gradients come from inputs unlike the text it is judged on; the gap above is that cost at "
                 "this budget.")
    else:
        text += ("Here feeding back its own predictions did not cost the free-running model on teacher-forced "
                 "perplexity; with a budget this short the difference may be within run-to-run noise.")
    return text


def compare_teacher_forcing(base: TrainConfig, steps: int, out_dir: Path, free_running: float = 0.0,
                            schedule: str = "constant", target_ppl: float | None = None,
                            pairs=(("army", "taxpayer"),), num_samples: int = 3, sample_words: int = 20,
                            eval_tokens: int | None = 20000) -> dict:
    """Train both models with the same seed and budget; write report.md, report.json and a PNG."""
    if steps < 1:
        raise TrainingError(f"--steps must be at least 1, got {steps}")
    out_dir = fresh_folder(out_dir)
    corpus = load_corpus(base)
    unknown = [word for pair in pairs for word in pair if word not in corpus.dictionary]
    if unknown:
        raise TrainingError(f"--pair: {', '.join(repr(w) for w in unknown)} not in the vocabulary of {base.data}: "
                            "pick words of its train.txt")
    steps_per_epoch = num_windows(batchify(corpus.train, base.batch_size), base.seq_len)
    prompts = _prompts(corpus, num_samples)
    runs = {}
    for label, p, sched in (("teacher-forced", 1.0, "constant"), ("free-running", free_running, schedule)):
        cfg = replace(base, out=str(out_dir / label), epochs=math.ceil(steps / max(1, steps_per_epoch)),
                      max_steps=steps, teacher_forcing=p, teacher_forcing_schedule=sched, teacher_forcing_steps=steps,
                      eval_interval=max(1, steps // 10), eval_tokens=eval_tokens, log_interval=max(1, steps // 20))
        train(cfg)
        runs[label] = _summarize(out_dir / label, corpus, cfg, prompts, pairs, sample_words)
    tf, fr = runs["teacher-forced"], runs["free-running"]
    target = target_ppl or max(min(p for _, p in tf["valid"]), min(p for _, p in fr["valid"]))
    for run in runs.values():
        run["steps_to_target"] = _first_step_at(run["valid"], target)
    conclusion = _conclusion(tf, fr, target, steps)

    fr_label = f"free-running (P={free_running:g}, {schedule})"
    plots.curves(out_dir / "teacher_forcing.png", [
        {"title": "training loss", "xlabel": "step", "ylabel": "cross-entropy",
         "series": {"teacher-forced": zip(*tf["train"]), fr_label: zip(*fr["train"])}},
        {"title": "validation perplexity (teacher-forced)", "xlabel": "step", "ylabel": "perplexity", "log": True,
         "series": {"teacher-forced": zip(*tf["valid"]), fr_label: zip(*fr["valid"])}},
    ], f"Teacher forcing vs free running, {steps} steps, seed {base.seed}")

    lines = [f"# Teacher forcing vs free running ({steps} steps, seed {base.seed})", "",
             f"Model: embed {base.embed_size}, hidden {base.hidden_size}, {base.num_layers} layer(s); batch "
             f"{base.batch_size}, seq_len {base.seq_len}, Adam lr {base.lr}. Data: `{base.data}`. Perplexities are "
             "teacher-forced (the true previous word is always fed) for both models.", "",
             "![curves](teacher_forcing.png)", "", "Greedy samples below show each `<eos>` as ` / `.", "",
             "| | teacher-forced | " + fr_label + " |", "| --- | --- | --- |",
             f"| validation perplexity | {tf['valid_ppl']:.2f} | {fr['valid_ppl']:.2f} |",
             f"| test perplexity | {tf['test_ppl']:.2f} | {fr['test_ppl']:.2f} |",
             f"| first step at validation-sample perplexity ≤ {target:.1f} | {tf['steps_to_target'] or 'not reached'} "
             f"| {fr['steps_to_target'] or 'not reached'} |"]
    lines += [f"| cosine distance {pair} | {tf['distances'][pair]:.4f} | {fr['distances'][pair]:.4f} |"
              for pair in tf["distances"]]
    lines += ["", "## Greedy samples", ""]
    for k, _ in enumerate(prompts):
        lines += [f"- teacher-forced: {tf['samples'][k]!r}", f"- free-running: {fr['samples'][k]!r}", ""]
    lines += ["## Conclusion", "", conclusion, ""]
    (out_dir / "report.md").write_text("\n".join(lines))
    report = {"config": asdict(base), "steps": steps, "target_ppl": target, "runs": runs, "conclusion": conclusion}
    (out_dir / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    return report
