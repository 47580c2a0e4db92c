"""One training step at the default config: the classic tutorial loop against fastlm.

    pytest benchmarks/test_train_step.py --benchmark-only

Providers, in the order they run (the order matters on the CPU, see `allocator` below):

- `plain`: the classic PyTorch tutorial loop (nn.LSTM model, default Adam, clip_grad_norm_,
  `loss.item()` every step), with glibc's allocator as it comes. The baseline.
- `plain+retained-memory` (CPU): the same loop after `retain_freed_memory()`, to show how much of
  fastlm's CPU gain is the allocator alone.
- `fastlm-fp32`: the trainer's step (`TrainStep`, eager: fused Adam, foreach clipping, no sync),
  as `python -m fastlm.train` runs it by default on the CPU.
- `fastlm-bf16`: the same under bf16 autocast (`--amp bf16`): on the CPU the output layer runs on
  AMX where it exists and the LSTM stays fp32; on CUDA the whole step is replayed as one CUDA
  graph (`fastlm-graphs-bf16`, with the fused kernel, as `--backend auto` picks there).
- `fastlm-graphs-bf16-cudnn` (CUDA): the same graphed step with cuDNN's LSTM, and
  `fastlm-eager-bf16-cudnn` that step without the graph, so that the graph's gain and the fused
  kernel's gain are separate rows at one precision.
- `matmuls-only-fp32`: nothing but the step's matrix products at their real shapes, outputs
  allocated once: what the arithmetic alone costs on this machine, the attainable floor.

All run on the same real PTB windows (random tokens if PTB is absent), state carried across steps.
Each row records `allocator`: whether freed memory was being retained when it was measured.

The CUDA rows run wherever the GPU path does (benchmarks/conftest.py): rehearsed on the CPU, at a
tiny width and 4-token windows, with simulated graphs, the kernel interpreted and torch's CPU LSTM
where cuDNN's would be (`cudnn` says which); the plain loop keeps classic.py's widths there (only
its windows are short), and no row's time means anything.

This machine's speed drifts (a shared VM: the same step varies by 20% from one minute to the next),
so besides each provider's own median, every fastlm row times one plain-loop step before each of its
rounds: `speedup_vs_plain_alongside` compares medians taken in the same minute. On the CPU that
plain loop runs with retained memory too (the setting cannot be undone), so that ratio is fastlm's
gain beyond the allocator. The whole gain, allocator included, is
`speedup_vs_plain_as_it_comes_alongside`: before each round the CPU rows also ask the plain loop
running in a process of its own (allocator as it comes, `benchmarks/classic.py`) for one step.
Likewise the floor: besides the run's best 2048³ matmul rate (`median_over_floor`), each round
also times one 2048³ product, and `median_over_floor_alongside` divides by the floor at the median
of those rates, the machine's speed in the same minutes.
"""
from __future__ import annotations

import dataclasses
import itertools
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from benchmarks import classic
from benchmarks.classic import VOCAB, classic_step, load_windows
from benchmarks.conftest import CUDA, DEVICE, GPU_PATH, REHEARSAL, matmul_gflops, matmul_rate, synchronize
from fastlm.config import TrainConfig
from fastlm.device import check_cpu_can_multiply, cpu_bf16_unit, is_retaining_freed_memory, retain_freed_memory
from fastlm.errors import TrainingError
from fastlm.models.lm import RNNLM
from fastlm.training.graphs import graph_api
from fastlm.training.optimizer import make_optimizer
from fastlm.training.step import TrainStep

REPO = Path(__file__).resolve().parents[1]
# The batch stays the default's: the plain loop's carried state has that many rows.
CFG = dataclasses.replace(classic.CFG, embed_size=16, hidden_size=32, seq_len=4) if REHEARSAL else classic.CFG
GROUP = f"train-step B{CFG.batch_size} T{CFG.seq_len} E{CFG.embed_size} H{CFG.hidden_size} V{VOCAB // 1000}k"
ROUNDS, WARMUP = (100, 2) if CUDA else (3, 1) if REHEARSAL else (15, 2)


def step_flops(cfg: TrainConfig = CFG, vocab: int = VOCAB) -> float:
    """Matmul FLOPs of one step: forward 2·m·n·k per product, backward twice that."""
    tokens = cfg.batch_size * cfg.seq_len
    lstm = 2 * tokens * 4 * cfg.hidden_size * (cfg.embed_size + cfg.hidden_size)
    output = 2 * tokens * cfg.hidden_size * vocab
    return 3 * (lstm + output)


def allocator() -> str:
    return "retained" if is_retaining_freed_memory() else "as it comes"


@pytest.fixture(scope="module")
def windows():
    batches, source = load_windows(DEVICE)
    return [(x[:, :CFG.seq_len], y[:, :CFG.seq_len]) for x, y in batches], source  # a rehearsal's are shorter


class PlainElsewhere:
    """The plain loop in a process of its own (`python -m benchmarks.classic --serve`), with glibc's
    allocator as it comes; each `step()` asks it for one step and waits for its time."""

    def __init__(self):
        self.proc = subprocess.Popen([sys.executable, "-m", "benchmarks.classic", "--serve"], cwd=REPO,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        if self.proc.stdout.readline().strip() != "ready":
            raise RuntimeError("benchmarks.classic --serve did not start")

    def step(self) -> float:
        self.proc.stdin.write("step\n")
        self.proc.stdin.flush()
        return float(self.proc.stdout.readline())

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


@pytest.fixture(scope="module")
def plain_elsewhere():
    """On the CPU, the plain loop as it comes, stepped between fastlm's rounds; None on the GPU path:
    on CUDA the in-process plain loop is already as it comes (the malloc setting is about CPU memory),
    and a rehearsal has nothing to learn from the full-size loop's time."""
    if GPU_PATH:
        yield None
        return
    worker = PlainElsewhere()
    yield worker
    worker.close()


def _run(benchmark, step, alongside=None, elsewhere: PlainElsewhere | None = None) -> dict:
    """Time `step` and return the row's fields: tokens/s, and what was measured right before every
    round, so that ratios hold while the machine's speed drifts: with `alongside` (the plain loop's
    step in this process) one plain step and the machine's matmul rate at that moment; with
    `elsewhere`, also one step of the plain loop in its own process, allocator as it comes."""
    plain_s, rates, elsewhere_s = [], [], []

    def setup():
        if elsewhere is not None:
            elsewhere_s.append(elsewhere.step())
        if alongside is not None:
            start = time.perf_counter()
            alongside()
            plain_s.append(time.perf_counter() - start)
            rates.append(matmul_rate(DEVICE))

    benchmark.pedantic(step, setup=setup, rounds=ROUNDS, warmup_rounds=WARMUP, iterations=1)
    median = benchmark.stats.stats.median
    fields = {"tokens_per_s": CFG.batch_size * CFG.seq_len / median}
    if alongside is not None:
        plain = statistics.median(plain_s[WARMUP:])
        fields.update(plain_alongside_s=plain, speedup_vs_plain_alongside=plain / median,
                      matmul_gflops_alongside=statistics.median(rates[WARMUP:]))
    if elsewhere is not None:
        plain = statistics.median(elsewhere_s[WARMUP:])
        fields.update(plain_as_it_comes_alongside_s=plain, speedup_vs_plain_as_it_comes_alongside=plain / median)
    return fields


def _floor_fields(benchmark, fields: dict) -> dict:
    """The step's matmul FLOPs at the run's best matmul rate (`floor_s`), and at the median rate
    measured alongside this row's rounds (`floor_alongside_s`, the fairer pairing on a drifting VM)."""
    median, flops = benchmark.stats.stats.median, step_flops()
    floor_s = flops / (matmul_gflops(DEVICE) * 1e9)
    floor_alongside_s = flops / (fields["matmul_gflops_alongside"] * 1e9)
    return {"gflop_per_step": flops / 1e9, "matmul_gflops": matmul_gflops(DEVICE), "floor_s": floor_s,
            "median_over_floor": median / floor_s, "floor_alongside_s": floor_alongside_s,
            "median_over_floor_alongside": median / floor_alongside_s}


def _plain_loop(windows):
    return classic_step(windows[0], DEVICE)


@pytest.fixture(scope="module")
def plain_step(windows):
    """The plain loop, stepped between the rounds of every other provider (its own model and state)."""
    return _plain_loop(windows)


@pytest.mark.benchmark(group="train-step")
def test_plain_loop(benchmark, record, windows):
    fields = _run(benchmark, _plain_loop(windows))
    record(GROUP, "plain", benchmark, baseline=True, data=windows[1], allocator=allocator(), **fields)


@pytest.mark.benchmark(group="train-step")
def test_plain_loop_retained_memory(benchmark, record, windows):
    if GPU_PATH:
        pytest.skip("the allocator setting is about CPU tensors")
    retain_freed_memory()
    fields = _run(benchmark, _plain_loop(windows))
    record(GROUP, "plain+retained-memory", benchmark, data=windows[1], allocator=allocator(), **fields)


def _fastlm_step(windows, amp_dtype, capture: bool, backend: str = "torch"):
    batches, _ = windows
    if DEVICE == "cpu":
        retain_freed_memory()  # as the trainer does on the CPU
    torch.manual_seed(0)
    model = RNNLM(VOCAB, CFG.embed_size, CFG.hidden_size, CFG.num_layers, backend=backend).to(DEVICE)
    optimizer = make_optimizer(model, CFG.lr, capturable=capture)
    stepper = TrainStep(model, optimizer, CFG.batch_size, CFG.seq_len, CFG.clip, amp_dtype,
                          graphs=graph_api(torch.device(DEVICE)) if capture else None)
    data = itertools.cycle(batches)

    def step():
        stepper.step(*next(data))
        stepper.detach_state()
        synchronize()

    return step


@pytest.mark.benchmark(group="train-step")
def test_fastlm_fp32(benchmark, record, windows, plain_step, plain_elsewhere):
    fields = _run(benchmark, _fastlm_step(windows, None, capture=False), plain_step, plain_elsewhere)
    record(GROUP, "fastlm-fp32", benchmark, data=windows[1], allocator=allocator(), **fields,
           **_floor_fields(benchmark, fields))


@pytest.mark.benchmark(group="train-step")
def test_fastlm_bf16(benchmark, record, windows, plain_step, plain_elsewhere):
    if not GPU_PATH:  # a rehearsal's tiny step is quick in bf16 on any CPU
        try:
            check_cpu_can_multiply(torch.bfloat16)
        except TrainingError as err:
            pytest.skip(str(err))
    capture = GPU_PATH
    backend = "triton" if capture else "torch"  # what --backend auto picks for this run
    fields = _run(benchmark, _fastlm_step(windows, torch.bfloat16, capture, backend), plain_step, plain_elsewhere)
    name = "fastlm-graphs-bf16" if capture else "fastlm-bf16"
    bf16_unit = cpu_bf16_unit() if DEVICE == "cpu" else None
    record(GROUP, name, benchmark, data=windows[1], allocator=allocator(), bf16_unit=bf16_unit, backend=backend,
           **fields)


@pytest.mark.benchmark(group="train-step")
@pytest.mark.parametrize("graphed", [False, True], ids=["eager", "graphs"])
def test_fastlm_bf16_cudnn(benchmark, record, windows, plain_step, plain_elsewhere, graphed):
    # The bf16 step with cuDNN's LSTM, graphed and eager: against fastlm-graphs-bf16 the graphed row
    # isolates the fused kernel's gain, and the eager row the graph's, at one precision.
    if not GPU_PATH:
        pytest.skip("cuDNN rows are for a GPU (on the CPU fastlm-bf16 is the eager bf16 row)")
    fields = _run(benchmark, _fastlm_step(windows, torch.bfloat16, graphed, "torch"), plain_step, plain_elsewhere)
    record(GROUP, f"fastlm-{'graphs' if graphed else 'eager'}-bf16-cudnn", benchmark, data=windows[1],
           allocator=allocator(), backend="torch", cudnn=CUDA, **fields)


def _matmuls(dtype: torch.dtype):
    """The products of one step at their shapes (input projection, recurrence, output layer, and
    the two gradients of each), into outputs allocated once."""
    B, T, E, H, V, N = CFG.batch_size, CFG.seq_len, CFG.embed_size, CFG.hidden_size, VOCAB, CFG.batch_size * CFG.seq_len
    r = lambda *shape: torch.randn(*shape, device=DEVICE, dtype=dtype)
    x, w_ih, w_hh, hs, w_out, h, dg = r(N, E), r(4 * H, E), r(4 * H, H), r(N, H), r(V, H), r(B, H), r(B, 4 * H)
    gx, g, logits, d_logits, dgs = r(N, 4 * H), r(B, 4 * H), r(N, V), r(N, V), r(N, 4 * H)
    dhs, dw_out, dh, dw_hh, dx, dw_ih = r(N, H), r(V, H), r(B, H), r(4 * H, H), r(N, E), r(4 * H, E)

    def run():
        torch.mm(x, w_ih.t(), out=gx)
        for _ in range(T):
            torch.mm(h, w_hh.t(), out=g)
        torch.mm(hs, w_out.t(), out=logits)
        torch.mm(d_logits, w_out, out=dhs)
        torch.mm(d_logits.t(), hs, out=dw_out)
        for _ in range(T):
            torch.mm(dg, w_hh, out=dh)
        torch.mm(dgs.t(), hs, out=dw_hh)
        torch.mm(dgs, w_ih, out=dx)
        torch.mm(dgs.t(), x, out=dw_ih)
        synchronize()

    return run


@pytest.mark.benchmark(group="train-step")
def test_matmuls_only(benchmark, record, windows, plain_step):
    # fp32, like the default step and the floor's matmul rate, on either device
    fields = _run(benchmark, _matmuls(torch.float32), plain_step)
    record(GROUP, "matmuls-only-fp32", benchmark, data=windows[1], allocator=allocator(), **fields,
           **_floor_fields(benchmark, fields))
