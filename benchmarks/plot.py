"""python -m benchmarks.plot [results/*.json]: a bar chart of medians per group for each saved result."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from fastlm.figures import pyplot

RESULTS = Path(__file__).parent / "results"


def load_result(path: Path) -> dict:
    """A result saved by benchmarks/conftest.py, or ValueError saying why the file is not one."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"{path} cannot be read as JSON ({type(err).__name__}: {err})") from None
    if not isinstance(data, dict) or not {"results", "machine"} <= data.keys():
        raise ValueError(f"{path} is not a saved benchmark result (no 'results' and 'machine')")
    return data


def plot(path: Path) -> Path:
    plt = pyplot()
    data = load_result(path)
    rows = data["results"]
    groups = list(dict.fromkeys(r["group"] for r in rows))
    fig, axes = plt.subplots(len(groups), 1, figsize=(8, 1.2 + 1.1 * len(groups) + 0.3 * len(rows)), squeeze=False)
    for ax, group in zip(axes[:, 0], groups):
        members = [r for r in rows if r["group"] == group]
        ax.barh([r["provider"] for r in members], [r["median_s"] * 1e3 for r in members],
                xerr=[r["iqr_s"] * 1e3 / 2 for r in members])
        for y, r in enumerate(members):
            ax.text(r["median_s"] * 1e3, y, f"  {r['speedup_vs_baseline']:.2f}x", va="center", fontsize=8)
        ax.set_title(group, fontsize=9)
        ax.set_xlabel("median ms (bars: IQR)")
    machine = data["machine"]
    fig.suptitle(f"{machine.get('gpu', machine['cpu'])}, torch {machine['torch']}", fontsize=10)
    fig.tight_layout()
    out = path.with_suffix(".png")
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.plot",
                                     description="Draw a PNG beside each saved benchmark result.")
    parser.add_argument("results", nargs="*", type=Path, help="result JSON files (default: all in benchmarks/results)")
    paths = parser.parse_args(argv).results
    paths = paths or sorted(p for p in RESULTS.glob("*.json") if p.name != "compile_check.json")
    for path in paths:
        try:
            print(f"wrote {plot(path)}")
        except ValueError as err:
            print(f"error: {err}; pass files written by `pytest benchmarks/ --benchmark-only`", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
