"""python -m fastlm.train: train the PTB language model (or resume a run)."""
from __future__ import annotations

import argparse
from dataclasses import fields

from fastlm.cli import EXIT_INTERRUPTED, ArgumentParser, run_main
from fastlm.config import RESUMABLE_OVERRIDES, TrainConfig, add_flag, describe_recipes, recipe_config
from fastlm.errors import TrainingError
from fastlm.training.trainer import train


def parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="python -m fastlm.train", description=__doc__)
    for spec in fields(TrainConfig):
        add_flag(p, spec.name)
    p.add_argument("--resume", metavar="RUN", help="continue the run in this folder (or checkpoint file); "
                   f"only {', '.join('--' + n.replace('_', '-') for n in sorted(RESUMABLE_OVERRIDES))} may change")
    return p


def main(argv: list[str] | None = None) -> int:
    args = vars(parser().parse_args(argv))
    resume = args.pop("resume", None)
    recipe = args.pop("recipe", None)
    if recipe == "list":
        print(describe_recipes())
        return 0
    if resume is None:
        result = train(recipe_config(recipe, args) if recipe else TrainConfig(**args))
    elif recipe:
        raise TrainingError(f"a resumed run keeps the settings it was started with: drop --recipe {recipe}")
    else:
        result = train(TrainConfig(), resume=resume, overrides=args)
    return EXIT_INTERRUPTED if result.interrupted else 0


if __name__ == "__main__":
    run_main(main)
