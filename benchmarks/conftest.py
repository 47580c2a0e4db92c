"""Shared by the benchmarks: machine facts, a results collector, and the summary table at the end.

Each benchmark calls `record(group, provider, benchmark, **extra)` after timing; when the session
ends, every group is printed with its ratio to the group's baseline provider (measured in the same
run) and saved as JSON under benchmarks/results/.
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

RESULTS = Path(__file__).parent / "results"
_rows: list[dict] = []


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
    info = {"host": platform.node(), "cpu": cpu_model(),
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
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    torch.mm(a, b, out=out)
    if device == "cuda":
        torch.cuda.synchronize()
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
    RESULTS.mkdir(exist_ok=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = RESULTS / f"{device}-{stamp}.json"
    out.write_text(json.dumps({"machine": machine(), "time": stamp, "results": _rows}, indent=1) + "\n")
    write(f"saved {out}")
