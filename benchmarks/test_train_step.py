"""One training step at the default config: the classic tutorial loop against fastlm.

    pytest benchmarks/test_train_step.py --benchmark-only

`plain` is the classic PyTorch tutorial loop: nn.LSTM model, default Adam, clip_grad_norm_,
`loss.item()` every step. `fastlm-eager` is fastlm's step (fused Adam, foreach clipping, no sync);
on CUDA, `fastlm-graphs-bf16` replays the whole step as one CUDA graph under bf16 autocast.
Both run on the same real PTB windows (random tokens if PTB is absent), state carried across steps.
"""
from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.conftest import matmul_gflops
from fastlm.data import Corpus, batchify, tbptt_windows
from fastlm.model import RNNLM
from fastlm.trainer import TrainConfig, train_step

CFG = TrainConfig()
VOCAB = 10000
PTB = Path(__file__).resolve().parents[1] / "data" / "ptb"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def step_flops(cfg: TrainConfig = CFG, vocab: int = VOCAB) -> float:
    """Matmul FLOPs of one step: forward 2·m·n·k per product, backward twice that."""
    tokens = cfg.batch_size * cfg.seq_len
    lstm = 2 * tokens * 4 * cfg.hidden_size * (cfg.embed_size + cfg.hidden_size)
    output = 2 * tokens * cfg.hidden_size * vocab
    return 3 * (lstm + output)


class ClassicRNNLM(nn.Module):
    def __init__(self, vocab_size, embed_size, hidden_size, num_layers):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, embed_size)
        self.lstm = nn.LSTM(embed_size, hidden_size, num_layers, batch_first=True)
        self.linear = nn.Linear(hidden_size, vocab_size)

    def forward(self, x, h):
        out, (h, c) = self.lstm(self.embed(x), h)
        return self.linear(out.reshape(out.size(0) * out.size(1), out.size(2))), (h, c)


@pytest.fixture(scope="module")
def windows():
    if (PTB / "train.txt").is_file():
        ids, source = Corpus(PTB).train, "PTB"
    else:
        ids, source = torch.randint(0, VOCAB, (200_000,)), "random tokens"
    rows = batchify(ids, CFG.batch_size).to(DEVICE)
    return list(itertools.islice(tbptt_windows(rows, CFG.seq_len), 50)), source


def _zero_state():
    shape = (CFG.num_layers, CFG.batch_size, CFG.hidden_size)
    return torch.zeros(shape, device=DEVICE), torch.zeros(shape, device=DEVICE)


def _run(benchmark, step):
    rounds = 10 if DEVICE == "cpu" else 100
    benchmark.pedantic(step, rounds=rounds, warmup_rounds=2, iterations=1)


@pytest.mark.benchmark(group="train-step")
def test_plain_loop(benchmark, record, windows):
    batches, source = windows
    torch.manual_seed(0)
    model = ClassicRNNLM(VOCAB, CFG.embed_size, CFG.hidden_size, CFG.num_layers).to(DEVICE)
    optimizer = torch.optim.Adam(model.parameters(), lr=CFG.lr)
    data, state = itertools.cycle(batches), [_zero_state()]

    def step():
        inputs, targets = next(data)
        states = tuple(s.detach() for s in state[0])
        outputs, state[0] = model(inputs, states)
        loss = F.cross_entropy(outputs, targets.reshape(-1))
        model.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), CFG.clip)
        optimizer.step()
        return loss.item()

    _run(benchmark, step)
    record("train-step B20 T30 E128 H1024 V10k", "plain", benchmark, baseline=True, data=source)


@pytest.mark.benchmark(group="train-step")
def test_fastlm_eager(benchmark, record, windows):
    batches, source = windows
    torch.manual_seed(0)
    model = RNNLM(VOCAB, CFG.embed_size, CFG.hidden_size, CFG.num_layers, backend="auto").to(DEVICE)
    optimizer = torch.optim.Adam(model.parameters(), lr=CFG.lr, fused=True)
    data, state = itertools.cycle(batches), [_zero_state()]

    def step():
        inputs, targets = next(data)
        loss, state[0] = train_step(model, optimizer, inputs, targets, state[0], CFG.clip)
        return loss

    def synced_step():
        loss = step()
        if DEVICE == "cuda":
            torch.cuda.synchronize()
        return loss

    _run(benchmark, synced_step)
    floor_s = step_flops() / (matmul_gflops(DEVICE) * 1e9)
    record("train-step B20 T30 E128 H1024 V10k", "fastlm-eager", benchmark, data=source,
           gflop_per_step=step_flops() / 1e9, floor_s=floor_s, median_over_floor=benchmark.stats.stats.median / floor_s)


@pytest.mark.benchmark(group="train-step")
def test_fastlm_graphs_amp(benchmark, record, windows):
    if DEVICE != "cuda":
        pytest.skip("CUDA graphs and bf16 autocast need a CUDA GPU")
    from fastlm.graphs import GraphedStep

    batches, source = windows
    torch.manual_seed(0)
    model = RNNLM(VOCAB, CFG.embed_size, CFG.hidden_size, CFG.num_layers, backend="auto").to(DEVICE)
    optimizer = torch.optim.Adam(model.parameters(), lr=CFG.lr, fused=True, capturable=True)
    stepper = GraphedStep(model, optimizer, CFG.batch_size, CFG.seq_len, CFG.clip, torch.bfloat16, capture=True)
    data = itertools.cycle(batches)

    def step():
        stepper.step(*next(data))
        torch.cuda.synchronize()

    _run(benchmark, step)
    record("train-step B20 T30 E128 H1024 V10k", "fastlm-graphs-bf16", benchmark, data=source,
           tokens_per_s=CFG.batch_size * CFG.seq_len / benchmark.stats.stats.median)
