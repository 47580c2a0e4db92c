"""python -m fastlm.plot: the training-loss and validation-perplexity curves of run folders, in one PNG.

    python -m fastlm.plot runs/tutorial runs/small --out curves.png
"""
from __future__ import annotations

from pathlib import Path

from fastlm.cli import ArgumentParser, run_main
from fastlm.errors import UsageError
from fastlm.figures import curves
from fastlm.training.rundir import METRICS, read_metrics


def run_curves(run: Path) -> tuple[tuple[list, list], tuple[list, list]]:
    """(steps, training loss) and (steps, validation perplexity at epoch ends) of a run folder."""
    if not (run / METRICS).is_file():
        raise UsageError(f"{run} has no {METRICS} (not a run folder, or a run that has logged nothing yet): "
                         "pass run folders that fastlm.train wrote")
    records = read_metrics(run)
    train = [(r["global_step"], r["loss"]) for r in records if r["split"] == "train"]
    valid = [(r["global_step"], r["ppl"]) for r in records if r["split"] == "valid" and "tokens" not in r]
    return tuple(map(list, zip(*train))) or ([], []), tuple(map(list, zip(*valid))) or ([], [])


def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(prog="python -m fastlm.plot", description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", type=Path, metavar="RUN", help="run folders (each holds a metrics.jsonl)")
    p.add_argument("--out", type=Path, default=Path("curves.png"), help="the PNG to write (default: curves.png)")
    args = p.parse_args(argv)
    train, valid = {}, {}
    for run in args.runs:
        train[str(run)], valid[str(run)] = run_curves(run)
    curves(args.out, [
        {"title": "training loss (mean over each log interval)", "xlabel": "step", "ylabel": "loss", "series": train},
        {"title": "validation perplexity (epoch ends)", "xlabel": "step", "ylabel": "perplexity", "series": valid,
         "log": True},
    ], title=" vs ".join(train))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    run_main(main)
