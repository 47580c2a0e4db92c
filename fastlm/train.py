"""python -m fastlm.train: train the PTB language model (or resume a run)."""
from __future__ import annotations

import argparse

from fastlm.cli import EXIT_INTERRUPTED, run_main
from fastlm.config import TrainConfig
from fastlm.lstm import BACKENDS
from fastlm.scheduled_sampling import SCHEDULES
from fastlm.trainer import train

HELP = {
    "data": "folder with train.txt, valid.txt, test.txt (PTB is downloaded into data/ptb if missing)",
    "embed_size": "word embedding size",
    "hidden_size": "LSTM hidden size",
    "num_layers": "stacked LSTM layers",
    "epochs": "passes over the training data",
    "batch_size": "rows the token stream is cut into",
    "seq_len": "TBPTT window length (tokens between detaches)",
    "lr": "Adam learning rate",
    "clip": "gradient-norm clipping threshold",
    "backend": f"LSTM backend: {', '.join(BACKENDS)}",
    "device": "cpu, cuda, cuda:N or auto",
    "seed": "random seed",
    "out": "run folder (default runs/<timestamp>)",
    "max_steps": "stop after this many optimizer steps in total, counted across resumes",
    "log_interval": "steps between log lines",
    "eval_batch_size": "rows for validation and test",
    "eval_interval": "also validate every N steps (metrics.jsonl), besides each epoch end",
    "eval_tokens": "validate those interim points on the first N validation tokens only",
    "teacher_forcing": "probability of feeding the true word at each step (1: teacher forcing, 0: free running)",
    "teacher_forcing_schedule": f"decay of --teacher-forcing over training: {', '.join(SCHEDULES)}",
    "teacher_forcing_steps": "steps over which the schedule decays (default: the whole run, epochs x steps)",
    "free_running_token": "the model's word fed back when not teacher forcing: argmax or sample",
    "amp": "autocast dtype: off, bf16, fp16 or auto (bf16 on a GPU that has it, off on the CPU)",
}
TYPES = {"max_steps": int, "eval_interval": int, "eval_tokens": int, "teacher_forcing_steps": int, "out": str}



def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m fastlm.train", description=__doc__)
    defaults = TrainConfig()
    for name, text in HELP.items():
        default = getattr(defaults, name)
        # SUPPRESS keeps flags that were not given out of the namespace, so a resume knows what changed.
        p.add_argument(f"--{name.replace('_', '-')}", type=TYPES.get(name, type(default)), default=argparse.SUPPRESS,
                       help=f"{text} (default: {default})")
    p.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                   help="replay each training step as one CUDA graph (default: on for CUDA)")
    p.add_argument("--resume", metavar="RUN", help="continue the run in this folder (or checkpoint file)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = vars(parser().parse_args(argv))
    resume = args.pop("resume", None)
    if resume is None:
        result = train(TrainConfig(**args))
    else:
        result = train(TrainConfig(), resume=resume, overrides=args)
    return EXIT_INTERRUPTED if result.interrupted else 0


if __name__ == "__main__":
    run_main(main)
