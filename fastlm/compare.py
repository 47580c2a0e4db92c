"""python -m fastlm.compare: experiments side by side, each written up as a report folder.

    python -m fastlm.compare teacher-forcing --steps 500 --out runs/tf
    python -m fastlm.compare detach --chunks 10 --out runs/detach
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
from fastlm.experiments.common import removed_if_left_empty
from fastlm.experiments.detach import compare_detach
from fastlm.experiments.teacher_forcing import compare_teacher_forcing

MODEL_FLAGS = ("data", "vocab_size", "embed_size", "hidden_size", "num_layers", "batch_size", "seq_len", "lr",
               "clip", "backend", "device", "seed", "eval_batch_size")


def check_teacher_forcing_flags(p: ArgumentParser, base: TrainConfig, args: argparse.Namespace) -> None:
    """Compare's own flags, before any training: the second arm's setting under compare's flag names,
    and every seed, not only the first."""
    check_config(replace(base, teacher_forcing=args.free_running, teacher_forcing_schedule=args.schedule),
                 flags={"teacher_forcing": "--free-running", "teacher_forcing_schedule": "--schedule"})
    last = args.seed + args.seeds - 1
    if args.seeds >= 1 and last > MAX_SEED:  # else the first seed's models train, then the next seed fails
        p.error(f"--seeds {args.seeds} from --seed {args.seed} reach seed {last}, above 2**63 - 1: use a --seed of "
                f"at most {MAX_SEED - args.seeds + 1}")


def main(argv: list[str] | None = None) -> int:
    defaults = TrainConfig()
    common = argparse.ArgumentParser(add_help=False)
    for name in MODEL_FLAGS:
        add_flag(common, name, default=getattr(defaults, name))
    common.add_argument("--out", help="report folder (default: runs/compare-<experiment>-<timestamp>)")
    p = ArgumentParser(prog="python -m fastlm.compare", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    experiments = p.add_subparsers(dest="experiment", required=True)
    tf = experiments.add_parser("teacher-forcing", parents=[common], help="teacher forcing vs free running")
    tf.add_argument("--steps", type=int, default=500, help="optimizer steps for each model (default: 500)")
    tf.add_argument("--free-running", type=float, default=0.0,
                    help="teacher-forcing probability of the second model (default: 0, fully free running)")
    tf.add_argument("--schedule", default="constant", help=f"its decay: {', '.join(SCHEDULES)} (default: constant)")
    tf.add_argument("--seeds", type=int, default=3,
                    help="seeds per model, from --seed on: the report calls a difference only when a t-test over "
                         "the seeds finds it at the 5%% level (default: 3)")
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
    detach.add_argument("--chunks", type=int, default=10, help="TBPTT windows to train on (default: 10)")
    detach.add_argument("--repeats", type=int, default=3, help="runs of the whole experiment from the same seed; "
                        "the report gives each window's median step time (default: 3)")
    args = p.parse_args(argv)

    base = TrainConfig(**{name: getattr(args, name) for name in MODEL_FLAGS})
    check_config(base, device=pick_device(base.device))  # the device too: a report folder is made next
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    out = Path(args.out or f"runs/compare-{args.experiment}-{stamp}")
    if args.experiment == "teacher-forcing":
        check_teacher_forcing_flags(tf, base, args)
        pairs = [tuple(pair.split("/")) for pair in (args.pair or ["army/taxpayer"])]
        bad = next((pair for pair in pairs if len(pair) != 2 or not all(pair)), None)
        if bad is not None:
            tf.error(f"--pair {'/'.join(bad)}: give two words joined by one slash, e.g. army/taxpayer")
        if args.eval_tokens is not None and args.eval_tokens < 1:
            tf.error(f"--eval-tokens must be at least 1, got {args.eval_tokens}")
        if args.target_ppl is not None and not 1 < args.target_ppl < math.inf:
            tf.error(f"--target-ppl must be a finite perplexity above 1, got {args.target_ppl}")
        with removed_if_left_empty(out):
            report = compare_teacher_forcing(base, args.steps, out, args.free_running, args.schedule,
                                             args.target_ppl, pairs, seeds=args.seeds,
                                             eval_interval=args.eval_interval, eval_tokens=args.eval_tokens)
        print(report["conclusion"])
    else:
        with removed_if_left_empty(out):
            compare_detach(base, args.chunks, out, args.repeats)
    print(f"report: {out / 'report.md'}")
    return 0


if __name__ == "__main__":
    run_main(main)
