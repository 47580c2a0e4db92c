"""python -m fastlm.evaluate: perplexity of a checkpoint over a whole split, plain or adapting as it reads
(dynamic evaluation, a continuous cache), with --tune choosing their values on the validation split."""
from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import replace

from fastlm.cli import ArgumentParser, run_main
from fastlm.data import UNK, Corpus, batchify_for_eval
from fastlm.device import pick_device
from fastlm.errors import UsageError
from fastlm.files import check_output_path, write_output
from fastlm.models.lm import load_model
from fastlm.models.lstm import BACKENDS
from fastlm.scoring import evaluate, perplexity
from fastlm.scoring.adaptive import adaptive_pass
from fastlm.scoring.cache import CacheSettings
from fastlm.scoring.dynamic import RMS_TOKENS, RULES, DynamicSettings, gradient_rms
from fastlm.scoring.tuning import cache_candidates, dynamic_candidates, table, tune
from fastlm.training.graphs import graph_api

OUT_OF_VOCABULARY_WARNING = 0.01
# Used when a value is neither given nor tuned: what --tune chose for the `small` recipe (README), for
# each method alone and for the two together.
DEFAULT_DYNAMIC = DynamicSettings(lr=2.0, decay=0.002, rule="sgd", seq_len=5)
DEFAULT_CACHE = CacheSettings(size=500, theta=1.0, lam=0.15)
DEFAULT_TOGETHER = DynamicSettings(lr=1.0, decay=0.0, rule="sgd", seq_len=5), CacheSettings(size=500, theta=1.0,
                                                                                            lam=0.1)
CACHE_FLAG_DEFAULT = object()  # `--cache` without N: no value one can type (argparse converts a str const)


def parse(argv: list[str] | None):
    p = ArgumentParser(prog="python -m fastlm.evaluate", description=__doc__)
    p.add_argument("--checkpoint", required=True, help="a run folder or a .pt file in it (checkpoint.pt, best.pt)")
    p.add_argument("--split", choices=("valid", "test"), help="(default: test)")
    p.add_argument("--data", help="data folder (default: the one the run trained on)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: auto)")
    p.add_argument("--batch-size", type=int, help="rows (default: the run's eval batch size)")
    p.add_argument("--backend", choices=BACKENDS, help="LSTM backend (default: the run's)")
    p.add_argument("--out", help="also write the result as JSON to this file")
    a = p.add_argument_group("adapting while reading (each token is scored before the model or the cache learns it)")
    a.add_argument("--dynamic", action="store_true",
                   help="dynamic evaluation (Krause et al. 2018): after each segment, a gradient step on it, "
                        "decaying toward the trained weights; the checkpoint is never written")
    a.add_argument("--dynamic-rule", choices=RULES,
                   help=f"rms: steps in units of each weight's gradient RMS on {RMS_TOKENS:,} training tokens; "
                        f"sgd: plain steps (default: {DEFAULT_DYNAMIC.rule})")
    a.add_argument("--dynamic-lr", type=float,
                   help=f"η, the step size (default: {DEFAULT_DYNAMIC.lr:g}; {DEFAULT_TOGETHER[0].lr:g} with --cache)")
    a.add_argument("--dynamic-decay", type=float,
                   help="λ, the pull back toward the trained weights per step, 0 to 1 "
                        f"(default: {DEFAULT_DYNAMIC.decay:g}; {DEFAULT_TOGETHER[0].decay:g} with --cache)")
    a.add_argument("--dynamic-seq-len", type=int,
                   help=f"tokens per segment, the model adapting after each (default: {DEFAULT_DYNAMIC.seq_len})")
    a.add_argument("--cache", type=int, nargs="?", const=CACHE_FLAG_DEFAULT, metavar="N",
                   help="continuous cache (Grave et al. 2017) over each row's last N positions "
                        f"(N default: {DEFAULT_CACHE.size})")
    a.add_argument("--cache-theta", type=float,
                   help=f"θ, how sharply the cache picks similar states, ≥ 0 (default: {DEFAULT_CACHE.theta:g})")
    a.add_argument("--cache-lambda", type=float,
                   help=f"λ, the cache's weight in the mixture, 0 to below 1 (default: {DEFAULT_CACHE.lam:g}; "
                        f"{DEFAULT_TOGETHER[1].lam:g} with --dynamic)")
    a.add_argument("--tune", action="store_true",
                   help="choose the values of --dynamic and --cache not given, on the validation split (a grid, "
                        "printed with its cost), then score the test split with them: plain, cache, dynamic, both")
    args = p.parse_args(argv)
    for problem in _problems(args):
        p.error(problem)
    return args


def _problems(args) -> list[str]:
    problems = []
    if args.batch_size is not None and args.batch_size < 1:
        problems.append(f"--batch-size must be a positive integer, got {args.batch_size}")
    for flag in ("rule", "lr", "decay", "seq_len"):
        if getattr(args, f"dynamic_{flag}") is not None and not args.dynamic:
            problems.append(f"--dynamic-{flag.replace('_', '-')} sets dynamic evaluation: add --dynamic")
    for flag in ("theta", "lambda"):
        if getattr(args, f"cache_{flag}") is not None and args.cache is None:
            problems.append(f"--cache-{flag} sets the cache: add --cache")
    if args.tune and not (args.dynamic or args.cache is not None):
        problems.append("--tune chooses the values of --dynamic and --cache: add one or both")
    if args.tune and args.split is not None:
        problems.append("--tune chooses on the valid split and scores the test split: drop --split")
    checks = [
        (args.dynamic_lr, lambda v: 0 <= v < float("inf"), "--dynamic-lr must be a finite number ≥ 0"),
        (args.dynamic_decay, lambda v: 0 <= v <= 1, "--dynamic-decay must be between 0 and 1"),
        (args.dynamic_seq_len, lambda v: v >= 1, "--dynamic-seq-len must be a positive integer"),
        (None if args.cache is CACHE_FLAG_DEFAULT else args.cache, lambda v: v >= 1,
         "--cache N must be a positive integer"),
        (args.cache_theta, lambda v: 0 <= v < float("inf"), "--cache-theta must be a finite number ≥ 0"),
        (args.cache_lambda, lambda v: 0 <= v < 1, "--cache-lambda must be at least 0 and below 1"),
    ]
    problems += [f"{message}, got {value}" for value, fine, message in checks if value is not None and not fine(value)]
    return problems


def _fixed(args) -> tuple[dict, dict]:
    """The values given on the command line, as DynamicSettings and CacheSettings fields."""
    dynamic = {name: getattr(args, f"dynamic_{name}") for name in ("rule", "lr", "decay", "seq_len")}
    cache = {"size": None if args.cache is CACHE_FLAG_DEFAULT else args.cache, "theta": args.cache_theta,
             "lam": args.cache_lambda}
    return ({k: v for k, v in dynamic.items() if v is not None}, {k: v for k, v in cache.items() if v is not None})


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.out:
        check_output_path(args.out, "scores.json")
    split = args.split or "test"
    device = pick_device(args.device)
    model, dictionary, ckpt = load_model(args.checkpoint, device, args.backend)
    cfg = ckpt["config"]
    fixed_dynamic, fixed_cache = _fixed(args)
    default_dynamic, default_cache = (DEFAULT_TOGETHER if args.dynamic and args.cache is not None
                                      else (DEFAULT_DYNAMIC, DEFAULT_CACHE))
    dynamics = ([] if not args.dynamic else dynamic_candidates(fixed_dynamic) if args.tune
                else [replace(default_dynamic, **fixed_dynamic)])
    caches = ([] if args.cache is None else cache_candidates(fixed_cache) if args.tune
              else [replace(default_cache, **fixed_cache)])
    needs_rms = any(d.rule == "rms" for d in dynamics)
    splits = ("valid", "test") if args.tune else (split,)
    corpus = Corpus(args.data or cfg["data"], dictionary, splits=splits + (("train",) if needs_rms else ()))
    batch_size = args.batch_size or cfg["eval_batch_size"]
    data = {s: batchify_for_eval(getattr(corpus, s), batch_size, s, "--batch-size").to(device)
            for s in splits + (("train",) if needs_rms else ())}
    segment = fixed_dynamic.get("seq_len", DEFAULT_DYNAMIC.seq_len)  # every candidate's: the grid holds it
    if dynamics:
        _check_segments_fit(data, segment, batch_size)
    result = {"checkpoint": str(args.checkpoint), "global_step": ckpt["global_step"], "batch_size": batch_size}
    for s in splits:
        _report_out_of_vocabulary(s, corpus)

    if not (dynamics or caches):
        loss = evaluate(model, data[split], cfg["seq_len"])
        scored = data[split].shape[0] * (data[split].shape[1] - 1)  # every token of a row but its first
        print(f"{split} perplexity: {perplexity(loss):.2f} (loss {loss:.4f}, {scored} tokens scored, "
              f"{_unknown_share(split, corpus):.2%} out of vocabulary, after {ckpt['global_step']} training steps, "
              f"{args.checkpoint})")
        result.update(split=split, perplexity=perplexity(loss), loss=loss)
    else:
        rms, rms_seconds = None, 0.0
        if needs_rms:
            started = time.perf_counter()
            rms = gradient_rms(model, data["train"], segment)
            rms_seconds = time.perf_counter() - started
            print(f"gradient RMS for the rms rule: {rms_seconds:.1f} s on {RMS_TOKENS:,} training tokens")
        graphs = graph_api(device)
        if args.tune:
            tuning = tune(model, data["valid"], data["test"], cfg["seq_len"], dynamics=dynamics, caches=caches,
                          rms=rms, graphs=graphs)
            print(table(tuning))
            print(f"tuning took {tuning.seconds:.1f} s on valid, plus {rms_seconds:.1f} s of gradient RMS")
            result.update(methods=[m.as_json() for m in tuning.methods], tuning=tuning.grid,
                          tuning_seconds=tuning.seconds, rms_seconds=rms_seconds)
        else:
            passed = adaptive_pass(model, data[split], cfg["seq_len"], dynamic=dynamics[0] if dynamics else None,
                                   rms=rms, caches=caches, graphs=graphs, label=split)
            _report_adaptive(split, passed, dynamics, caches, ckpt, args.checkpoint)
            loss = passed.losses[caches[0] if caches else None]
            result.update(split=split, dynamic=vars(dynamics[0]) if dynamics else None,
                          cache=vars(caches[0]) if caches else None, perplexity=perplexity(loss), loss=loss,
                          perplexity_without_cache=perplexity(passed.losses[None]) if caches else None,
                          seconds=passed.seconds, rms_seconds=rms_seconds)
    if args.out:
        write_output(args.out, json.dumps(_strict(result), indent=1, allow_nan=False) + "\n", "scores.json")
    return 0


def _strict(value):
    """JSON has no inf or NaN (an infinite perplexity): null."""
    if isinstance(value, dict):
        return {k: _strict(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_strict(v) for v in value]
    return None if isinstance(value, float) and not math.isfinite(value) else value


def _check_segments_fit(data: dict, segment: int, batch_size: int) -> None:
    for split, rows in data.items():
        if rows.shape[1] - 1 < segment:
            raise UsageError(f"--dynamic-seq-len {segment} is longer than the rows of {split}.txt ({rows.shape[1] - 1} "
                             f"tokens to score each in {batch_size} rows): use a smaller --dynamic-seq-len or "
                             "--batch-size")


def _unknown_share(split: str, corpus: Corpus) -> float:
    return corpus.out_of_vocabulary[split] / max(1, getattr(corpus, split).numel())


def _report_out_of_vocabulary(split: str, corpus: Corpus) -> None:
    unknown = _unknown_share(split, corpus)
    if unknown > OUT_OF_VOCABULARY_WARNING:
        print(f"warning: {unknown:.1%} of the {split} words are not in the model's vocabulary and were scored "
              f"as {UNK}, which is easier to predict than the words themselves: this perplexity is not comparable "
              "with one on text the vocabulary covers", file=sys.stderr)


def _report_adaptive(split, passed, dynamics, caches, ckpt, source) -> None:
    settings = "; ".join(s.describe() for s in (*dynamics, *caches))
    loss = passed.losses[caches[0] if caches else None]
    print(f"{split} perplexity: {perplexity(loss):.2f} with {settings} (loss {loss:.4f}, {passed.tokens} tokens "
          f"scored in {passed.seconds:.1f} s, after {ckpt['global_step']} training steps, {source})")
    if caches:
        alone = "with the trained weights" if not dynamics else "with dynamic evaluation alone"
        print(f"the same pass without the cache ({alone}): {perplexity(passed.losses[None]):.2f}")


if __name__ == "__main__":
    run_main(main)
