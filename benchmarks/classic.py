"""The classic PyTorch tutorial's training loop: the baseline every train-step benchmark compares with.

nn.LSTM model, default Adam, `clip_grad_norm_`, `loss.item()` every step, on the default config's
shapes and real PTB windows (random tokens if PTB is absent).

    python -m benchmarks.classic --serve

runs the loop in a process of its own, one step per "step" line read from stdin, answering each
with the step's seconds. The CPU benchmark steps it between fastlm's rounds: that process keeps
glibc's allocator as it comes, which fastlm's process changes for good (`retain_freed_memory` in
`fastlm/device.py`), and since the two take turns they never compete for the cores.
"""
from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from fastlm.config import TrainConfig
from fastlm.data import Corpus, batchify, tbptt_windows

CFG = TrainConfig()
VOCAB = 10000
PTB = Path(__file__).resolve().parents[1] / "data" / "ptb"


class ClassicRNNLM(nn.Module):
    def __init__(self, vocab_size, embed_size, hidden_size, num_layers):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, embed_size)
        self.lstm = nn.LSTM(embed_size, hidden_size, num_layers, batch_first=True)
        self.linear = nn.Linear(hidden_size, vocab_size)

    def forward(self, x, h):
        out, (h, c) = self.lstm(self.embed(x), h)
        return self.linear(out.reshape(out.size(0) * out.size(1), out.size(2))), (h, c)


def load_windows(device: str, count: int = 50) -> tuple[list, str]:
    """The first `count` training windows of the default config, and where they came from."""
    if (PTB / "train.txt").is_file():
        ids, source = Corpus(PTB).train, "PTB"
    else:
        ids, source = torch.randint(0, VOCAB, (200_000,), generator=torch.Generator().manual_seed(0)), "random tokens"
    rows = batchify(ids, CFG.batch_size).to(device)
    return list(itertools.islice(tbptt_windows(rows, CFG.seq_len), count)), source


def classic_step(batches: list, device: str):
    """One step of the tutorial loop per call, cycling through `batches`, state carried across calls."""
    torch.manual_seed(0)
    model = ClassicRNNLM(VOCAB, CFG.embed_size, CFG.hidden_size, CFG.num_layers).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=CFG.lr)
    shape = (CFG.num_layers, CFG.batch_size, CFG.hidden_size)
    data, state = itertools.cycle(batches), [(torch.zeros(shape, device=device), torch.zeros(shape, device=device))]

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

    return step


def serve() -> int:
    step = classic_step(load_windows("cpu")[0], "cpu")
    print("ready", flush=True)
    for line in sys.stdin:
        if line.strip() != "step":
            break
        start = time.perf_counter()
        step()
        print(time.perf_counter() - start, flush=True)
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m benchmarks.classic", description=__doc__.splitlines()[0])
    parser.add_argument("--serve", action="store_true", help="step the loop on CPU, one step per 'step' line")
    if not parser.parse_args().serve:
        parser.error("nothing to do: pass --serve (the benchmarks import this module)")
    sys.exit(serve())
