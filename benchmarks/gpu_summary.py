"""Decide what a gpu_check.sh run shows: assert it trained a sound model, gather the README's figures.

    python -m benchmarks.gpu_summary OUTDIR

Reads what benchmarks/gpu_check.sh left in OUTDIR: the kernel tests' exit status, the block sweep's
table, the benchmark results (cuda-*.json) and the full default run (run-full/). Asserts:

- the kernel tests passed on the compiled kernel;
- the default run, and 300 steps of the small recipe (dropout, SGD), took the GPU's default path:
  CUDA graphs with the fused kernel, no eager fallback (a fallback trains well too, and would
  otherwise pass unnoticed);
- the default run's validation perplexity after epoch 1 is within 5% of the CPU's fp32 figure;
- the run's final parameters are not degenerate: every tensor finite and not constant (the first
  review found a capture that zeroed the model, which trains a unigram model from the output bias).

Writes OUTDIR/summary.json with every figure the README's performance table needs and each
assertion's outcome; prints one line per assertion; exits 1 if any failed.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import torch

# The default run on the CPU, float32 (README, "What to expect"): validation perplexity after its
# first epoch.
CPU_FP32_EPOCH1_VALID_PPL = 141.48
PPL_TOLERANCE = 0.05


def degenerate_parameters(model_state: dict) -> list[str]:
    problems = []
    for name, tensor in model_state.items():
        values = tensor.float()
        if not torch.isfinite(values).all():
            problems.append(f"{name} has non-finite values")
        elif values.numel() > 1 and values.std().item() < 1e-6:
            problems.append(f"{name} is constant ({values.flatten()[0].item():.3g})")
    return problems


def _graphed_check(checks: dict, log_file: Path, run: str) -> str:
    """Whether a run's log shows it graphed with the fused kernel, never falling back; its log."""
    log = log_file.read_text() if log_file.is_file() else ""
    fallback = next((line for line in log.splitlines() if "CUDA graphs off" in line), None)
    planned = "LSTM backend triton, CUDA graphs" in log
    checks[f"{run} is graphed, with the fused kernel"] = (
        planned and fallback is None, fallback or ("as planned" if planned else "its first line names another path"))
    return log


def _records(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def _benchmark_rows(outdir: Path) -> list[dict]:
    rows = []
    for path in sorted(outdir.glob("cuda-*.json")):
        rows += json.loads(path.read_text())["results"]
    return rows


def summarize(outdir: Path) -> dict:
    checks, run = {}, outdir / "run-full"
    status = outdir / "kernel_tests.status"
    checks["kernel tests pass on the compiled kernel"] = (
        status.is_file() and status.read_text().strip() == "0", f"pytest exit status {status.read_text().strip()}"
        if status.is_file() else "no kernel test status")

    records = _records(run)
    epoch_ends = [r for r in records if r["split"] == "valid" and "tokens" not in r]
    first = epoch_ends[0]["ppl"] if epoch_ends else None
    low, high = CPU_FP32_EPOCH1_VALID_PPL * (1 - PPL_TOLERANCE), CPU_FP32_EPOCH1_VALID_PPL * (1 + PPL_TOLERANCE)
    checks["epoch-1 validation perplexity within 5% of the CPU's fp32"] = (
        first is not None and low <= first <= high,
        f"{first} against {CPU_FP32_EPOCH1_VALID_PPL} (allowed {low:.1f}–{high:.1f})" if first else "no epoch ended")

    checkpoint = run / "checkpoint.pt"
    if checkpoint.is_file():
        problems = degenerate_parameters(torch.load(checkpoint, map_location="cpu", weights_only=True)["model"])
        checks["parameters are not degenerate"] = (not problems, "; ".join(problems) or "all finite, none constant")
    else:
        checks["parameters are not degenerate"] = (False, "no checkpoint.pt in run-full")

    log = _graphed_check(checks, outdir / "train_full.txt", "the default run")
    _graphed_check(checks, outdir / "train_small.txt", "the small recipe (dropout, SGD)")
    timing = re.search(r"Training time: ([\d.]+) s for (\d+) steps", log)
    tuned = outdir / "step_configs.json"
    return {
        "checks": {name: {"passed": bool(ok), "detail": detail} for name, (ok, detail) in checks.items()},
        "default_run": {
            "valid_ppl_by_epoch": [r["ppl"] for r in epoch_ends],
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
