"""python -m fastlm.plot: the training-loss and validation-perplexity curves of run folders, in one picture.

    python -m fastlm.plot runs/tutorial runs/small --out curves.png
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import NoReturn

from fastlm.cli import ArgumentParser, run_main
from fastlm.errors import UsageError, first_line
from fastlm.figures import curves, image_format
from fastlm.files import check_output_path
from fastlm.training.rundir import METRICS, read_metrics


def run_curves(run: Path) -> tuple[tuple[list, list], tuple[list, list]]:
    """(steps, training loss) and (steps, validation perplexity at epoch ends) of a run folder."""
    path = run / METRICS
    if not path.is_file():
        raise UsageError(f"{run} has no {METRICS} (not a run folder, or a run that has logged nothing yet): "
                         "pass run folders that fastlm.train wrote")
    try:
        records = read_metrics(run)
    except (OSError, ValueError) as err:  # ValueError: bytes that are not UTF-8, for a reader decoding it whole
        raise UsageError(f"{path} cannot be read ({first_line(err)}): pass run folders that fastlm.train wrote"
                         ) from None
    if not records:
        raise UsageError(f"{path} holds no records (no line of it is a JSON object): pass run folders that "
                         "fastlm.train wrote")
    train = [_point(r, "loss", path) for r in records if _split(r, path) == "train"]
    valid = [_point(r, "ppl", path) for r in records if _split(r, path) == "valid" and "tokens" not in r]
    return tuple(map(list, zip(*train))) or ([], []), tuple(map(list, zip(*valid))) or ([], [])


def _split(record, path: Path) -> str:
    if not isinstance(record, dict) or not isinstance(record.get("split"), str):
        _refuse(record, "no split", path)
    return record["split"]


def _point(record: dict, key: str, path: Path) -> tuple[float, float]:
    x, y = record.get("global_step"), record.get(key)
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (x, y)):
        _refuse(record, f"no numeric global_step and {key}", path)
    return x, y


def _refuse(record, lacking: str, path: Path) -> NoReturn:
    shown = json.dumps(record)
    shown = shown if len(shown) <= 60 else shown[:57] + "..."
    raise UsageError(f"{path} has a record plot cannot draw ({lacking}): {shown}; pass run folders that fastlm.train "
                     "wrote")


def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(prog="python -m fastlm.plot", description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", type=Path, metavar="RUN", help="run folders (each holds a metrics.jsonl)")
    p.add_argument("--out", type=Path, default=Path("curves.png"),
                   help="the picture to write, in the format of its suffix: png, pdf, svg... (default: curves.png)")
    args = p.parse_args(argv)
    image_format(args.out)
    check_output_path(args.out, example="curves.png")
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
