"""python -m fastlm.compare: experiments side by side, each written up as a report folder.

    python -m fastlm.compare teacher-forcing --hidden-size 256 --out runs/tf
    python -m fastlm.compare detach --out runs/detach
    python -m fastlm.compare sampling --checkpoint runs/q2/default/best.pt --out runs/sampling
    python -m fastlm.compare embedding --checkpoint runs/q2/default/best.pt --out runs/embedding
"""
from __future__ import annotations

import argparse
import math
from dataclasses import replace
from datetime import datetime
from pathlib import Path

from fastlm.cli import ArgumentParser, run_main
from fastlm.config import SCHEDULES, TrainConfig, add_flag, check_config
from fastlm.device import MAX_SEED, pick_device
from fastlm.errors import TrainingError
from fastlm.experiments.common import removed_if_left_empty
from fastlm.experiments.detach import compare_detach
from fastlm.experiments.embedding_report import PROBE_WORDS, compare_embedding
from fastlm.experiments.sampling_report import compare_sampling
from fastlm.experiments.teacher_forcing import Arm, compare_teacher_forcing
from fastlm.experiments.trained import load_trained

DEFAULT_ARMS = ("0:constant:argmax:2", "0:constant:sample:2", "1:inverse-sigmoid")
MODEL_FLAGS = ("data", "vocab_size", "embed_size", "hidden_size", "num_layers", "batch_size", "seq_len", "lr",
               "clip", "backend", "device", "seed", "eval_batch_size")


def check_teacher_forcing_flags(p: ArgumentParser, base: TrainConfig, args: argparse.Namespace) -> list[Arm]:
    """Compare's own flags, before any training: every arm's and the sweep's setting under compare's
    flag names, and every seed, not only the first. Returns the arms."""
    try:
        arms = [Arm.parse(spec) for spec in args.arm or DEFAULT_ARMS]
    except TrainingError as err:
        p.error(str(err))
    for arm in [*arms, *(Arm(value) for value in args.sweep)]:
        check_config(replace(base, teacher_forcing=arm.p, teacher_forcing_schedule=arm.schedule,
                             free_running_token=arm.token),
                     flags={"teacher_forcing": "--arm/--sweep P", "teacher_forcing_schedule": "--arm's schedule",
                            "free_running_token": "--arm's token"})
    last = args.seed + args.seeds - 1
    if args.seeds >= 1 and last > MAX_SEED:  # else the first seed's models train, then the next seed fails
        p.error(f"--seeds {args.seeds} from --seed {args.seed} reach seed {last}, above 2**63 - 1: use a --seed of "
                f"at most {MAX_SEED - args.seeds + 1}")
    return arms


def word_pairs(parser: ArgumentParser, given: list[str] | None) -> list[tuple[str, ...]]:
    """The --pair values as word pairs (default army/taxpayer); a malformed one is a one-line usage error."""
    pairs = [tuple(pair.split("/")) for pair in (given or ["army/taxpayer"])]
    bad = next((pair for pair in pairs if len(pair) != 2 or not all(pair)), None)
    if bad is not None:
        parser.error(f"--pair {'/'.join(bad)}: give two words joined by one slash, e.g. army/taxpayer")
    return pairs


def _probabilities(text: str) -> list[float]:
    if text.strip().lower() == "none":
        return []
    try:
        return [float(value) for value in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give probabilities joined by commas, e.g. 0,0.5,1, or none")


def main(argv: list[str] | None = None) -> int:
    defaults = TrainConfig()
    common = argparse.ArgumentParser(add_help=False)
    for name in MODEL_FLAGS:
        add_flag(common, name, default=getattr(defaults, name))
    common.add_argument("--out", help="report folder (default: runs/compare-<experiment>-<timestamp>)")
    p = ArgumentParser(prog="python -m fastlm.compare", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    experiments = p.add_subparsers(dest="experiment", required=True)
    tf = experiments.add_parser(
        "teacher-forcing", parents=[common], help="teacher forcing vs free running and scheduled sampling",
        description="Train the teacher-forced model and each --arm for --seeds seeds, and the constant P of --sweep "
                    "for --sweep-seeds of them; report all against the unigram and the untrained model. The "
                    "defaults train 20 runs of one epoch each (about 1 h 40 min at --hidden-size 256 on a 2-core CPU).")
    tf.add_argument("--steps", type=int, help="optimizer steps for each model (default: one epoch)")
    tf.add_argument("--arm", action="append", metavar="P[:SCHEDULE[:TOKEN[:SEEDS]]]",
                    help="a way of training besides teacher forcing: P the probability of feeding the true word, "
                         f"its decay ({', '.join(SCHEDULES)}), the word fed otherwise (argmax or sample) and how "
                         f"many of the seeds it trains (default: all); repeatable (default: {' '.join(DEFAULT_ARMS)}: "
                         "free running and the same with sampled words fed back, each on 2 seeds, and scheduled "
                         "sampling)")
    tf.add_argument("--sweep", type=_probabilities, default=[0.0, 0.25, 0.5, 0.75, 1.0], metavar="P,P,...",
                    help="constant P values also trained, argmax fed back, or none (default: 0,0.25,0.5,0.75,1)")
    tf.add_argument("--sweep-seeds", type=int, default=2, help="seeds of the sweep, the first of --seeds "
                    "(default: 2)")
    tf.add_argument("--runs", help="folder the models train in; a finished run there is reused and an unfinished "
                    "one resumed, so a stopped comparison goes on: pass the stopped one's OUT/runs with a new "
                    "--out (default: the report folder's runs/)")
    tf.add_argument("--seeds", type=int, default=5,
                    help="seeds per arm, from --seed on: the report calls a difference only when a t-test over "
                         "the seeds finds it at the 5%% level (default: 5)")
    tf.add_argument("--target-ppl", type=float, help="report the step each seed first reaches this perplexity on "
                    "the validation sample (default: the level every seed of the worse arm had reached by its last "
                    "evaluation)")
    tf.add_argument("--eval-interval", type=int,
                    help="steps between validation-sample evaluations, the resolution of those steps "
                         "(default: --steps / 25)")
    tf.add_argument("--pair", action="append", metavar="WORD/WORD",
                    help="word pairs whose cosine distance to compare (default: army/taxpayer)")
    tf.add_argument("--eval-tokens", type=int, default=20000,
                    help="validation tokens for the curve's points (default: 20000)")
    detach = experiments.add_parser("detach", parents=[common], help="graph memory with and without detach")
    detach.add_argument("--chunks", type=int, default=30, help="TBPTT windows to train on, the first of the "
                        "training split; the no-detach arm's step time grows with each (default: 30)")
    detach.add_argument("--repeats", type=int, default=3, help="runs of the whole experiment from the same seed; "
                        "the report gives each window's median step time (default: 3)")
    detach.add_argument("--eval-tokens", type=int, default=20000,
                        help="validation tokens each arm is scored on after the last window (default: 20000)")
    add_trained_model_reports(experiments)
    args = p.parse_args(argv)
    if args.experiment in ("sampling", "embedding"):
        return trained_model_report(experiments.choices[args.experiment], args)

    base = TrainConfig(**{name: getattr(args, name) for name in MODEL_FLAGS})
    check_config(base, device=pick_device(base.device))  # the device too: a report folder is made next
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    out = Path(args.out or f"runs/compare-{args.experiment}-{stamp}")
    if args.experiment == "teacher-forcing":
        arms = check_teacher_forcing_flags(tf, base, args)
        pairs = word_pairs(tf, args.pair)
        if args.eval_tokens is not None and args.eval_tokens < 1:
            tf.error(f"--eval-tokens must be at least 1, got {args.eval_tokens}")
        if args.target_ppl is not None and not 1 < args.target_ppl < math.inf:
            tf.error(f"--target-ppl must be a finite perplexity above 1, got {args.target_ppl}")
        with removed_if_left_empty(out):
            report = compare_teacher_forcing(base, out, arms, args.steps, seeds=args.seeds, sweep=args.sweep,
                                             sweep_seeds=args.sweep_seeds,
                                             runs_dir=Path(args.runs) if args.runs else None,
                                             target_ppl=args.target_ppl, pairs=pairs,
                                             eval_interval=args.eval_interval, eval_tokens=args.eval_tokens)
        for arm, conclusion in report["conclusions"].items():
            print(f"{arm}: {conclusion}")
    else:
        with removed_if_left_empty(out):
            compare_detach(base, args.chunks, out, args.repeats, args.eval_tokens)
    print(f"report: {out / 'report.md'}")
    return 0


def add_trained_model_reports(experiments) -> None:
    """The reports on an already trained checkpoint: no training flags, a checkpoint instead."""
    reads = argparse.ArgumentParser(add_help=False)
    reads.add_argument("--data", help="the corpus folder (default: the one the checkpoint was trained on)")
    reads.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default: cpu)")
    reads.add_argument("--note", help="a sentence added to the report's setting (e.g. what else these weights are)")
    reads.add_argument("--out", help="report folder (default: runs/compare-<experiment>-<timestamp>)")
    sampling = experiments.add_parser("sampling", parents=[reads], help="greedy, multinomial, temperature, top-k, "
                                      "top-p samples measured against real text")
    sampling.add_argument("--checkpoint", required=True, help="a run folder (its checkpoint.pt) or a .pt file")
    sampling.add_argument("--samples", type=int, default=40, help="validation openings to continue (default: 40)")
    sampling.add_argument("--words", type=int, default=50, help="words per continuation (default: 50)")
    sampling.add_argument("--prompt-words", type=int, default=10, help="words of each opening fed first (default: 10)")
    sampling.add_argument("--seed", type=int, default=1, help="seed of every strategy's draws (default: 1)")
    sampling.add_argument("--temperature", type=float, default=0.7, help="the tempered strategy's T (default: 0.7)")
    sampling.add_argument("--top-k", type=int, default=40, help="the top-k strategy's k (default: 40)")
    sampling.add_argument("--top-p", type=float, default=0.9, help="the top-p strategy's p (default: 0.9)")
    sampling.add_argument("--show", type=int, default=3, help="prompts shown side by side in report.md (default: 3)")
    embedding = experiments.add_parser("embedding", parents=[reads], help="word-pair distances against their random "
                                       "reference, rows moved, neighbours")
    embedding.add_argument("--checkpoint", action="append", required=True,
                           help="a run folder (its checkpoint.pt) or a .pt file; repeat for several")
    embedding.add_argument("--pair", action="append", metavar="WORD/WORD",
                           help="word pairs whose distance to report (default: army/taxpayer)")
    embedding.add_argument("--word", action="append", help="frequent words whose neighbours to list (default: "
                           f"{', '.join(PROBE_WORDS)})")
    embedding.add_argument("-k", type=int, default=8, help="neighbours per word (default: 8)")
    embedding.add_argument("--spread-pairs", type=int, default=20000,
                           help="random row pairs the reference spreads are measured on (default: 20000)")
    embedding.add_argument("--seed", type=int, default=0, help="seed of those random pairs (default: 0)")


def trained_model_report(parser: ArgumentParser, args: argparse.Namespace) -> int:
    out = Path(args.out or f"runs/compare-{args.experiment}-{datetime.now().strftime('%Y%m%d-%H%M%S')}")
    device = pick_device(args.device)
    if args.experiment == "sampling":
        with removed_if_left_empty(out):
            report = compare_sampling(load_trained(args.checkpoint, args.data, device), out, samples=args.samples,
                                      words=args.words, prompt_words=args.prompt_words, seed=args.seed,
                                      temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                                      show=args.show, note=args.note)
    else:
        pairs = word_pairs(parser, args.pair)
        checkpoints = [load_trained(path, args.data, device) for path in args.checkpoint]
        with removed_if_left_empty(out):
            report = compare_embedding(checkpoints, out, pairs, args.word or PROBE_WORDS, k=args.k,
                                       spread_pairs=args.spread_pairs, seed=args.seed, note=args.note)
    sections = [report] if args.experiment == "sampling" else report["checkpoints"]
    for sentence in (sentence for section in sections for sentence in section["conclusions"]):
        print(sentence)
    print(f"report: {out / 'report.md'}")
    return 0


if __name__ == "__main__":
    run_main(main)
