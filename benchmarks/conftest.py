"""Shared by the benchmarks: the GPU path, machine facts, a results collector, and the summary table.

Each benchmark calls `record(group, provider, benchmark, **extra)` after timing; when the session
ends, every group is printed with its ratio to the group's baseline provider (measured in the same
run) and saved as JSON under benchmarks/results/ (or the folder named by BENCHMARK_RESULTS).

The GPU path is the rows and shapes meant for a GPU: CUDA graphs, the fused kernel, cuDNN. It runs on
a CUDA device with compiled kernels, or rehearsed on the CPU (`benchmarks/gpu_check.sh --rehearse`,
which sets FASTLM_SIMULATE_CUDA_GRAPHS=1 and TRITON_INTERPRET=1) at tiny shapes: a GPU is lent
rarely and for minutes, so every line it will run has run here first. Rehearsal timings mean nothing.
"""
from __future__ import annotations

import functools
import json
import os
import platform
import time
from pathlib import Path

import pytest
import torch

from fastlm.kernels.fused_lstm import interpreting
from fastlm.training.graphs import graph_api

RESULTS = Path(os.environ.get("BENCHMARK_RESULTS") or Path(__file__).parent / "results")
_rows: list[dict] = []

CUDA = torch.cuda.is_available() and not interpreting()  # an interpreted kernel on a GPU would time Python
REHEARSAL = not CUDA and graph_api(torch.device("cpu")) is not None
GPU_PATH = CUDA or REHEARSAL
DEVICE = "cuda" if CUDA else "cpu"
PATH_NAME = "cuda" if CUDA else "rehearsal" if REHEARSAL else "cpu"  # names the results file


def synchronize(device: str = DEVICE) -> None:
    """Wait for the device's queued work, so that a timing includes it."""
    if device == "cuda":
        torch.cuda.synchronize()


def cpu_model() -> str:
    """The processor's marketing name where Linux tells it, else its architecture."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict:
    info = {"path": PATH_NAME, "host": platform.node(), "cpu": cpu_model(),
            "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(), "torch": torch.__version__}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
        info["cudnn"] = torch.backends.cudnn.version()
    return info


@functools.lru_cache(maxsize=None)
def _matmul_operands(device: str, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    a, b, out = (torch.randn(n, n, device=device) for _ in range(3))
    torch.mm(a, b, out=out)  # first call: library set-up, page faults
    return a, b, out


_rates_seen: dict[str, list[float]] = {}


def matmul_rate(device: str = "cpu", n: int = 2048) -> float:
    """GFLOP/s of one large fp32 matmul into a preallocated output (allocating it would add page
    faults on the CPU): the machine's arithmetic rate at this moment."""
    a, b, out = _matmul_operands(device, n)
    synchronize(device)
    start = time.perf_counter()
    torch.mm(a, b, out=out)
    synchronize(device)
    rate = 2 * n**3 / (time.perf_counter() - start) / 1e9
    _rates_seen.setdefault(device, []).append(rate)
    return rate


def matmul_gflops(device: str = "cpu", repeats: int = 7) -> float:
    """This machine's arithmetic ceiling: the best `matmul_rate` seen in this run so far (at least
    `repeats` of them), so a moment of contention on a shared machine cannot lower it."""
    while len(_rates_seen.get(device, [])) < repeats:
        matmul_rate(device)
    return max(_rates_seen[device])


@pytest.fixture(scope="session")
def record():
    def add(group: str, provider: str, benchmark, baseline: bool = False, **extra):
        stats = benchmark.stats.stats
        _rows.append({"group": group, "provider": provider, "baseline": baseline, "median_s": stats.median,
                      "iqr_s": stats.iqr, "min_s": stats.min, "max_s": stats.max, "rounds": stats.rounds, **extra})

    return add


def pytest_terminal_summary(terminalreporter):
    if not _rows:
        return
    groups: dict[str, list[dict]] = {}
    for row in _rows:
        groups.setdefault(row["group"], []).append(row)
    lines = [f"{'group':44} {'provider':22} {'median':>10} {'spread(IQR)':>11} {'ratio':>7}  notes"]
    for group, rows in groups.items():
        base = next((r for r in rows if r["baseline"]), rows[0])
        for r in rows:
            r["speedup_vs_baseline"] = base["median_s"] / r["median_s"]
            notes = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items()
                              if k not in {"group", "provider", "baseline", "median_s", "iqr_s", "min_s", "max_s",
                                           "rounds", "speedup_vs_baseline"})
            lines.append(f"{group:44} {r['provider']:22} {r['median_s'] * 1e3:8.2f}ms {r['iqr_s'] * 1e3:9.2f}ms "
                         f"{r['speedup_vs_baseline']:6.2f}x  {notes}")
    write = terminalreporter.write_line
    write("")
    write("Summary (ratio = baseline median / provider median, measured side by side in this run)")
    for line in lines:
        write(line)
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = RESULTS / f"{PATH_NAME}-{stamp}.json"
    out.write_text(json.dumps({"machine": machine(), "time": stamp, "results": _rows}, indent=1) + "\n")
    write(f"saved {out}")
