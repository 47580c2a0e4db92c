"""Sweep the fused step kernels' block configurations on a GPU; keep the fastest per shape.

    python -m benchmarks.tune_step [--out kernels/step_configs.json] [--seconds 50] [--jobs 8] [--compile-only]

For each shape in SHAPES, in bf16 (the dtype `--backend auto` runs the kernel in), and each kernel
(the forward step, the backward step), every configuration of `candidates()` runs a layer's T = 30
steps captured as one CUDA graph, and the graph's replays are timed, so launch cost is not the
difference. Each candidate's result is checked against the rule's configuration first: a fast but
wrong configuration is refused. The fastest per (kernel, shape) goes into the table that
`fused_lstm.step_config` reads. Every candidate is one `benchmarks.compile_check` builds for sm_90
without register spills. Triton compiles the candidates first, in parallel worker processes that
fill its on-disk cache, so that the timed loop starts warm; `--seconds` bounds that loop, and
`--compile-only` stops after the compiles (gpu_check.sh runs them as a step of their own).

It runs on the GPU path (benchmarks/conftest.py): rehearsed on the CPU, at a tiny shape, the rule
and one other candidate per kernel, the kernels interpreted and the graphs simulated.
"""
from __future__ import annotations

import argparse
import functools
import itertools
import json
import multiprocessing
import statistics
import sys
import time
from dataclasses import asdict, astuple
from pathlib import Path

import torch

from benchmarks.conftest import CUDA, DEVICE, GPU_PATH, synchronize
from fastlm.kernels.fused_lstm import (
    TUNED_CONFIGS,
    StepConfig,
    device_name,
    lstm_backward_op,
    lstm_forward,
    lstm_forward_op,
    rule_step_config,
    tuned_key,
)
from fastlm.training.graphs import GraphAPI, graph_api

SHAPES = ((20, 1024), (64, 1024))  # (B, H): the default run and a larger batch, at T = 30, E = 128
SEQ_LEN, EMBED = 30, 128
REHEARSAL_SHAPES, REHEARSAL_LAYER = ((3, 16),), {"seq_len": 2, "embed": 8}
DTYPE = torch.bfloat16
WARPS_AND_STAGES = ((4, 3), (4, 4), (8, 3))
KERNELS = ("fwd", "bwd")
TOLERANCE = 1e-2  # relative, bf16
MARGIN = 0.03  # a candidate replaces the rule only when it is more than 3% faster


def candidates(batch: int, hidden: int, dtype: torch.dtype = DTYPE) -> list[StepConfig]:
    """The rule's configuration first, then its neighbours: half the rows per program, twice the
    hidden units, twice the reduction chunk, other warp counts and pipeline depths."""
    rule = rule_step_config(batch, hidden, dtype)
    grid = [StepConfig(b, n, k, w, s)
            for b in sorted({max(16, rule.block_b // 2), rule.block_b}) for n in (rule.block_n, 2 * rule.block_n)
            for k in (rule.block_k, 2 * rule.block_k) for w, s in WARPS_AND_STAGES]
    return [rule] + [cfg for cfg in grid if cfg != rule]


def rehearsal_candidates(batch: int, hidden: int) -> list[StepConfig]:
    """A rehearsal's: the rule and one other, enough to run every line of the sweep in the interpreter."""
    return candidates(batch, hidden)[:2]


def layer(batch: int, hidden: int, device, dtype=DTYPE, seq_len: int = SEQ_LEN, embed: int = EMBED):
    """A layer's inputs, a forward's saved tensors and upstream gradients: what either kernel needs."""
    k = hidden**-0.5
    x = torch.randn(batch, seq_len, embed, device=device, dtype=dtype)
    h0 = torch.randn(batch, hidden, device=device, dtype=dtype)
    c0 = torch.randn(batch, hidden, device=device)
    weights = [torch.empty(shape, device=device, dtype=dtype).uniform_(-k, k)
               for shape in ((4 * hidden, embed), (4 * hidden, hidden), (4 * hidden,), (4 * hidden,))]
    inputs = (x, h0, c0, *weights)
    out, c, act = lstm_forward(*inputs, cfg=rule_step_config(batch, hidden, dtype))
    upstream = (torch.randn_like(out), torch.randn_like(h0), torch.randn_like(c0))
    return inputs, (out, c, act), upstream


def run_kernel(kernel: str, cfg: StepConfig, inputs, saved, upstream):
    """One layer's worth of the kernel's steps (and what surrounds them in the launcher), through
    the custom op, as the model runs it (and as a graph, real or simulated, records it)."""
    config = list(astuple(cfg))
    if kernel == "fwd":
        return lstm_forward_op(*inputs, config=config)
    x, h0, c0, w_ih, w_hh, _, _ = inputs
    return lstm_backward_op(*upstream, x, h0, c0, w_ih, w_hh, *saved, config=config)


def _relative_error(got, want) -> float:
    return max(((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()
               for a, b in zip(got, want))


def time_replays(fn, graphs: GraphAPI, replays: int, device) -> float:
    """Seconds per replay of `fn` captured as one graph: the median of five timed batches."""
    device = torch.device(device).type
    with graphs.side_stream():
        fn()
    graph = graphs.capture(fn, dict)  # every tensor fn touches is made inside it or held by the caller
    batches = []
    for _ in range(5):
        synchronize(device)
        start = time.perf_counter()
        for _ in range(replays):
            graph.replay()
        synchronize(device)
        batches.append((time.perf_counter() - start) / replays)
    return statistics.median(batches)


def _warm(items: list[tuple[str, int, int, StepConfig]], device: str = "cuda", **layer_options) -> int:
    """A worker process: run each (kernel, B, H, config) once, so that Triton's cache holds it. A
    configuration that fails here is left for the timed loop to record. Returns how many ran."""
    layers, ran = {}, 0
    for kernel, batch, hidden, cfg in items:
        if (batch, hidden) not in layers:
            layers[batch, hidden] = layer(batch, hidden, device, **layer_options)
        try:
            run_kernel(kernel, cfg, *layers[batch, hidden])
            synchronize(device)
            ran += 1
        except Exception:  # noqa: BLE001 (recorded with its reason by `sweep`)
            pass
    return ran


def compile_in_parallel(jobs: int, shapes=SHAPES, configs=candidates, device: str = "cuda", **layer_options) -> int:
    """Every candidate run once in `jobs` processes, which fills Triton's cache; how many ran."""
    items = [(kernel, b, h, cfg) for b, h in shapes for kernel in KERNELS for cfg in configs(b, h)]
    with multiprocessing.get_context("spawn").Pool(jobs) as pool:
        return sum(pool.map(functools.partial(_warm, device=device, **layer_options),
                            [items[i::jobs] for i in range(jobs)]))


def compile_only(jobs: int, shapes, configs, layer_options: dict) -> int:
    """gpu_check's compile step: every candidate built. The rule's configurations, which fastlm runs
    untuned, must run (others may fail: the sweep passes them over), so they run once more here,
    from the cache, where an error ends the step with its traceback."""
    started = time.perf_counter()
    ran = compile_in_parallel(jobs, shapes, configs, DEVICE, **layer_options)
    count = sum(len(configs(b, h)) for b, h in shapes) * len(KERNELS)
    print(f"{ran} of {count} candidates compiled and ran in {time.perf_counter() - started:.0f} s")
    for batch, hidden in shapes:
        inputs = layer(batch, hidden, DEVICE, **layer_options)
        for kernel in KERNELS:
            run_kernel(kernel, configs(batch, hidden)[0], *inputs)
    synchronize()
    print("the rule's configurations ran")
    return 0


def sweep(device, graphs: GraphAPI, shapes=SHAPES, seconds: float = 50.0, replays: int = 20,
          configs=candidates, seq_len: int = SEQ_LEN, embed: int = EMBED) -> list[dict]:
    """Every (kernel, shape, candidate) timed until `seconds` run out; one row each, refused ones too."""
    deadline = time.perf_counter() + seconds
    rows = []
    for (batch, hidden), kernel in itertools.product(shapes, KERNELS):
        inputs, saved, upstream = layer(batch, hidden, device, seq_len=seq_len, embed=embed)
        options = configs(batch, hidden)
        want = run_kernel(kernel, options[0], inputs, saved, upstream)
        for cfg in options:
            row = {"key": tuned_key(kernel, batch, hidden, DTYPE), "kernel": kernel, "B": batch, "H": hidden,
                   "T": seq_len, "config": asdict(cfg), "rule": cfg == options[0]}
            rows.append(row)
            if time.perf_counter() > deadline and not row["rule"]:  # the rule is always timed: the baseline
                row["skipped"] = "out of time"
                continue
            run = lambda: run_kernel(kernel, cfg, inputs, saved, upstream)  # noqa: E731
            try:
                row["relative_error"] = _relative_error(run(), want)
                if not row["relative_error"] <= TOLERANCE:
                    row["skipped"] = f"wrong result (relative error {row['relative_error']:.1e})"
                    continue
                row["seconds"] = time_replays(run, graphs, replays, device)
            except Exception as err:  # e.g. more shared memory than this GPU has: not a candidate here
                row["skipped"] = f"failed: {type(err).__name__}: {(str(err).splitlines() or [''])[0]}"
    return rows


def fastest(rows: list[dict], gpu: str) -> list[dict]:
    """Per key, the timed row with the least seconds, if it beats the rule's configuration by more
    than MARGIN (less is timing noise: the rule stays), with its gain over the rule."""
    table = []
    for key, group in itertools.groupby(rows, key=lambda r: r["key"]):
        timed = [r for r in group if "seconds" in r]
        rule = next((r for r in timed if r["rule"]), None)
        if rule is None:
            continue
        best = min(timed, key=lambda r: r["seconds"])
        if best["seconds"] * (1 + MARGIN) >= rule["seconds"]:
            best = rule
        table.append({"gpu": gpu, "key": key, "config": best["config"], "seconds": best["seconds"],
                      "rule_seconds": rule["seconds"], "speedup_vs_rule": rule["seconds"] / best["seconds"],
                      "timed": len(timed)})
    return table


def merged(path: Path, table: list[dict], gpu: str) -> list[dict]:
    """The table at `path` with this GPU's entries replaced by `table` (other GPUs' entries kept)."""
    old = json.loads(path.read_text())["configs"] if path.is_file() else []
    return [entry for entry in old if entry.get("gpu") != gpu] + table


def machine() -> dict:
    import triton

    info = {"torch": torch.__version__, "triton": triton.__version__}
    if torch.cuda.is_available():
        info.update(gpu=torch.cuda.get_device_name(), cuda=torch.version.cuda)
    return info


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.tune_step", description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(TUNED_CONFIGS), help="the table step_config reads (default: %(default)s)")
    p.add_argument("--report", help="also write every timed row here (default: no report)")
    p.add_argument("--seconds", type=float, default=50.0, help="time for the timed loop (default: %(default)s)")
    p.add_argument("--jobs", type=int, default=8, help="parallel compile processes, 0 for none (default: %(default)s)")
    p.add_argument("--compile-only", action="store_true",
                   help="stop after the compiles, failing if a rule's configuration does not run (default: sweep too)")
    args = p.parse_args(argv)
    if not GPU_PATH:
        print("error: the sweep times compiled kernels on a CUDA GPU (unset TRITON_INTERPRET), or rehearses on the "
              "CPU with FASTLM_SIMULATE_CUDA_GRAPHS=1 TRITON_INTERPRET=1", file=sys.stderr)
        return 2
    if CUDA:
        shapes, configs, replays, layer_options = SHAPES, candidates, 20, {}
    else:
        shapes, configs, replays, layer_options = REHEARSAL_SHAPES, rehearsal_candidates, 1, REHEARSAL_LAYER
    if args.compile_only:
        return compile_only(max(args.jobs, 1), shapes, configs, layer_options)
    started = time.perf_counter()
    if args.jobs:
        compile_in_parallel(args.jobs, shapes, configs, DEVICE, **layer_options)
    compiled = time.perf_counter() - started
    device = torch.device(DEVICE)
    gpu = device_name(device)
    rows = sweep(device, graph_api(device), shapes, seconds=args.seconds, replays=replays, configs=configs,
                 **layer_options)
    table = fastest(rows, gpu)
    for entry in table:
        print(f"{entry['key']:24} {entry['config']}  {entry['seconds'] * 1e6:8.1f} us  "
              f"{entry['speedup_vs_rule']:.2f}x the rule's ({entry['timed']} timed)")
    note = ("Written by `python -m benchmarks.tune_step`, one entry per GPU model and shape; anything not listed "
            "uses fused_lstm.rule_step_config.")
    out = Path(args.out)
    out.write_text(json.dumps({"note": note, "machine": machine(), "configs": merged(out, table, gpu)},
                              indent=1) + "\n")
    if args.report:
        Path(args.report).write_text(json.dumps({"machine": machine(), "compile_seconds": compiled,
                                                 "rows": rows}, indent=1) + "\n")
    print(f"{sum('seconds' in r for r in rows)} of {len(rows)} candidates timed; compiles took {compiled:.0f} s; "
          f"table written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
