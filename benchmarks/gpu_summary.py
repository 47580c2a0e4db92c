"""Decide what a gpu_check.sh run shows: one check per step, and the README's figures.

    python -m benchmarks.gpu_summary OUTDIR

Reads what benchmarks/gpu_check.sh left in OUTDIR: each step's exit status (`<step>.status`, 124
when its timeout cut it; no file when it never ran) and log (`<step>.log`), the sweep's report, the
benchmark results and the run folders. Checks:

- every step exited 0 (a failed step names its first failure); registering the checkout with pip
  too, although the others then ran from the checkout;
- the sweep timed the rule's configuration for every kernel and shape, and the benchmarks measured
  every GPU row (a row that skipped, or a sweep whose every candidate failed, exits 0 as well);
- the default run and 300 steps of the small recipe (dropout, SGD) each ran to their end within
  their timeout, trained on CUDA graphs with the fused kernel and validated on a captured graph:
  no eager fallback (a fallback trains well too, and would otherwise pass unnoticed);
- the default run's validation perplexity after epoch 1 is within 5% of the CPU's fp32 figure (in
  a rehearsal: of an eager fp32 run of the same tiny configuration);
- the finished run's parameters are not degenerate: every tensor finite and not constant (the first
  review found a capture that zeroed the model, which trains a unigram model from the output bias).

Writes OUTDIR/summary.json with every figure the README's performance table needs and each check's
outcome; prints one line per check; exits 1 if any failed.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import re
import sys
from pathlib import Path

import torch

# The default run on the CPU, float32 (README, "What to expect"): validation perplexity after its
# first epoch.
CPU_FP32_EPOCH1_VALID_PPL = 141.48
PPL_TOLERANCE = 0.05
# How timeout(1) ends a step: the TERM (124), or the KILL 2 s later for a step that outlived it (137,
# also what the kernel's out-of-memory killer leaves).
CUT = {"124": "cut by its timeout (exit 124)", "137": "killed (exit 137): by its timeout's KILL, or out of memory"}

STEPS = {  # gpu_check.sh's steps before the runs, in its order: the check each one's status decides
    "machine": "machine: the device and the versions read",
    "register": "register: the checkout installed (pip install -e)",
    "kernel_tests": "kernel tests: the fused kernel's tests pass",
    "compile": "compile: every sweep candidate built, the rule's configurations included",
    "tune": "tuning: the sweep timed the rule's configuration for every kernel and shape",
    "benchmarks": "benchmarks: every GPU row of the layer and step benchmarks measured",
}
RUNS = {"run_full": ("the default run", "run-full"), "run_small": ("the small recipe (dropout, SGD)", "run-small")}
# Every row the benchmarks step measures on the GPU path: one missing was skipped or deselected.
GPU_ROWS = {"plain", "fastlm-fp32", "fastlm-graphs-bf16", "fastlm-graphs-bf16-cudnn", "fastlm-eager-bf16-cudnn",
            "matmuls-only-fp32", "triton", "torch", "torch-fp16-B16", "torch-fp16-B24"}


def degenerate_parameters(model_state: dict) -> list[str]:
    problems = []
    for name, tensor in model_state.items():
        values = tensor.float()
        if not torch.isfinite(values).all():
            problems.append(f"{name} has non-finite values")
        elif values.numel() > 1 and values.std().item() < 1e-6:
            problems.append(f"{name} is constant ({values.flatten()[0].item():.3g})")
    return problems


def _read(path: Path) -> str:
    return path.read_text() if path.is_file() else ""


def _first_failure(log: str) -> str:
    """The line that says why a step failed: pytest's first FAILED/ERROR line, else the log's last."""
    lines = [line.strip() for line in log.splitlines() if line.strip()]
    line = next((line for line in lines if line.startswith(("FAILED", "ERROR"))), lines[-1] if lines else "no log")
    return line[:300]


def step_status(outdir: Path, step: str) -> tuple[bool, str]:
    """Whether `step` exited 0, and how it ended."""
    status = _read(outdir / f"{step}.status").strip()
    if not status:
        return False, "did not run (no exit status)"
    if status == "0":
        return True, "exit status 0"
    return False, f"{CUT.get(status, f'exit status {status}')}: {_first_failure(_read(outdir / f'{step}.log'))}"


def _and(status: tuple[bool, str], output: tuple[bool, str]) -> tuple[bool, str]:
    """A step's exit status and what its output shows: both must pass (the first failure is told)."""
    return output if status[0] else status


def _records(run: Path) -> list[dict]:
    records = []
    for line in _read(run / "metrics.jsonl").splitlines():
        with contextlib.suppress(json.JSONDecodeError):  # the last line of a run killed as it wrote
            records.append(json.loads(line))
    return records


def _epoch_ends(records: list[dict]) -> list[dict]:
    return [r for r in records if r["split"] == "valid" and "tokens" not in r]


def _benchmark_rows(outdir: Path) -> list[dict]:
    rows = []
    for path in sorted(outdir.glob("cuda-*.json")) + sorted(outdir.glob("rehearsal-*.json")):
        try:
            rows += json.loads(path.read_text())["results"]
        except (json.JSONDecodeError, KeyError):  # cut while writing: its rows count as missing
            pass
    return rows


def _sweep_check(outdir: Path) -> tuple[bool, str]:
    try:
        rows = json.loads(_read(outdir / "tune_step.json") or '{"rows": []}')["rows"]
    except (json.JSONDecodeError, KeyError):
        return False, "the sweep report (tune_step.json) is unreadable: cut while writing?"
    if not rows:
        return False, "no sweep report (tune_step.json)"
    rules = {r["key"]: r for r in rows if r["rule"]}
    untimed = [f"{key} ({row.get('skipped', 'not timed')})" for key, row in rules.items() if "seconds" not in row]
    if untimed:
        return False, f"the rule's configuration was not timed for {'; '.join(untimed)}"
    return True, f"{sum('seconds' in r for r in rows)} of {len(rows)} candidates timed"


def _rows_check(outdir: Path) -> tuple[bool, str]:
    missing = sorted(GPU_ROWS - {r["provider"] for r in _benchmark_rows(outdir)})
    return not missing, f"missing rows: {', '.join(missing)}" if missing else "every row measured"


def run_checks(outdir: Path, step: str) -> dict[str, tuple[bool, str]]:
    """A training run: ran to its end, within its timeout, trained and validated on captured graphs."""
    name, folder = RUNS[step]
    log = _read(outdir / f"{step}.log").splitlines()
    line = lambda text: next((line for line in log if text in line), None)  # noqa: E731
    ran, status = step_status(outdir, step), _read(outdir / f"{step}.status").strip()
    stopped = line("Stopped at epoch")  # a SIGTERM: the trainer saves mid-epoch and exits 0
    ended = stopped or ("training ended" if line("Training time:") else "no 'Training time' line")
    finished = ran[0] and ended == "training ended"
    fallback, planned = line("CUDA graphs off"), line("LSTM backend triton, CUDA graphs") is not None
    eager_validation = line("CUDA graph capture of validation failed")
    no_log = "no log: it did not run"
    checks = {
        f"{name} ran to its end": (finished, ended if ran[0] else ran[1]),
        f"{name} ended within its timeout": (status != "" and status not in CUT,
                                             CUT.get(status, f"exit status {status}") if status else "did not run"),
        f"{name} trained on CUDA graphs, with the fused kernel": (planned and fallback is None, fallback or (
            "as planned" if planned else "its first line names another path" if log else no_log)),
        f"{name} validated on a captured graph": (bool(log) and eager_validation is None,
                                                  eager_validation or ("yes" if log else no_log)),
    }
    return checks | (_default_run_checks(outdir, finished) if folder == "run-full" else {})


def _reference_ppl(outdir: Path) -> tuple[float | None, str]:
    """The epoch-1 validation perplexity the default run is held to, and where it comes from."""
    if not rehearsal(outdir):
        return CPU_FP32_EPOCH1_VALID_PPL, "the CPU's fp32"
    ends = _epoch_ends(_records(outdir / "run-reference"))
    return (ends[0]["ppl"] if ends else None), "an eager fp32 run of the same tiny configuration"


def _default_run_checks(outdir: Path, finished: bool) -> dict:
    ends = _epoch_ends(_records(outdir / "run-full"))
    first = ends[0]["ppl"] if ends else None
    reference, source = _reference_ppl(outdir)
    checks = {}
    if first is None or reference is None:
        checks["epoch-1 validation perplexity within 5%"] = (
            False, "no epoch ended" if first is None else f"{first} against no reference: {source} did not validate")
    else:
        low, high = reference * (1 - PPL_TOLERANCE), reference * (1 + PPL_TOLERANCE)
        checks["epoch-1 validation perplexity within 5%"] = (
            low <= first <= high, f"{first:.2f} against {source}'s {reference:.2f} (allowed {low:.2f}–{high:.2f})")
    checkpoint = outdir / "run-full" / "checkpoint.pt"
    if not finished:  # a checkpoint saved mid-epoch is not the trained model
        checks["parameters are not degenerate"] = (False, "the default run did not finish")
    elif checkpoint.is_file():
        problems = degenerate_parameters(torch.load(checkpoint, map_location="cpu", weights_only=True)["model"])
        checks["parameters are not degenerate"] = (not problems, "; ".join(problems) or "all finite, none constant")
    else:
        checks["parameters are not degenerate"] = (False, "no checkpoint.pt in run-full")
    return checks


def rehearsal(outdir: Path) -> bool:
    """Whether gpu_check.sh --rehearse wrote OUTDIR (it says so in its marker file)."""
    return _read(outdir / ".gpu_check").strip() == "rehearsal"


def checks(outdir: Path) -> dict[str, tuple[bool, str]]:
    found = {name: step_status(outdir, step) for step, name in STEPS.items()}
    register = found[STEPS["register"]]
    if not register[0]:
        found[STEPS["register"]] = (False, f"{register[1]}; the other steps ran from the checkout (OUTDIR/checkout)")
    found[STEPS["tune"]] = _and(found[STEPS["tune"]], _sweep_check(outdir))
    found[STEPS["benchmarks"]] = _and(found[STEPS["benchmarks"]], _rows_check(outdir))
    for step in RUNS:
        found.update(run_checks(outdir, step))
    if rehearsal(outdir):
        found["reference: the eager fp32 run finished"] = step_status(outdir, "run_reference")
    return found


def summarize(outdir: Path) -> dict:
    records = _records(outdir / "run-full")
    timing = re.search(r"Training time: ([\d.]+) s for (\d+) steps", _read(outdir / "run_full.log"))
    tuned = outdir / "step_configs.json"
    return {
        "rehearsal": rehearsal(outdir),
        "checks": {name: {"passed": bool(ok), "detail": detail} for name, (ok, detail) in checks(outdir).items()},
        "default_run": {
            "valid_ppl_by_epoch": [r["ppl"] for r in _epoch_ends(records)],
            "test_ppl": {r["weights"]: r["ppl"] for r in records if r["split"] == "test"},
            "training_seconds": float(timing.group(1)) if timing else None,
            "steps": int(timing.group(2)) if timing else None,
            "step_300_loss": next((r["loss"] for r in records if r.get("global_step") == 300 and r["split"] == "train"),
                                  None),
        },
        "benchmarks": [{k: r[k] for k in ("group", "provider", "median_s", "speedup_vs_baseline", "tflops",
                                          "cudnn_kernels", "tokens_per_s") if k in r}
                       for r in _benchmark_rows(outdir)],
        "tuned_step_configs": json.loads(tuned.read_text())["configs"] if tuned.is_file() else None,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_summary", description=__doc__.splitlines()[0])
    p.add_argument("outdir", type=Path, help="the folder gpu_check.sh wrote")
    args = p.parse_args(argv)
    if not args.outdir.is_dir():
        print(f"error: {args.outdir} is not a folder: pass the OUTDIR gpu_check.sh wrote", file=sys.stderr)
        return 2
    summary = summarize(args.outdir)
    (args.outdir / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    for name, check in summary["checks"].items():
        print(f"{'PASS' if check['passed'] else 'FAIL'}  {name}: {check['detail']}")
    print(f"wrote {args.outdir / 'summary.json'}")
    return 0 if all(c["passed"] for c in summary["checks"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
