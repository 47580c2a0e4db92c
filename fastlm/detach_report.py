"""What detaching the hidden state saves, written up as a report folder (markdown, JSON, PNGs): the
autograd graph's memory and the step time per window, with and without detaching between windows."""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F

from fastlm import plots
from fastlm.comparison import MB, fresh_folder, load_corpus
from fastlm.config import TrainConfig, TrainingError, pick_device
from fastlm.data import batchify, tbptt_windows
from fastlm.graph_memory import count_graph_nodes, run_chunks
from fastlm.model import RNNLM


def compare_detach(base: TrainConfig, chunks: int, out_dir: Path) -> dict:
    """Memory and time per window with and without detach; writes report.md, report.json and two PNGs."""
    if chunks < 1:
        raise TrainingError(f"--chunks must be at least 1, got {chunks}")
    out_dir = fresh_folder(out_dir)
    device = pick_device(base.device)
    corpus = load_corpus(base)
    rows = batchify(corpus.train, base.batch_size).to(device)
    windows = list(tbptt_windows(rows, base.seq_len))[:chunks]
    if len(windows) < chunks:
        raise TrainingError(f"the data has only {len(windows)} windows of {base.seq_len}: use fewer --chunks")
    results = {}
    warm_up = RNNLM(len(corpus.dictionary), base.embed_size, base.hidden_size, base.num_layers, backend=base.backend)
    warm_up = warm_up.to(device)
    run_chunks(warm_up, torch.optim.Adam(warm_up.parameters(), fused=True), windows[:1], True, base.clip)  # untimed
    for label, detach in (("detach", True), ("no-detach", False)):
        torch.manual_seed(base.seed)
        model = RNNLM(len(corpus.dictionary), base.embed_size, base.hidden_size, base.num_layers,
                      backend=base.backend).to(device)
        optimizer = torch.optim.Adam(model.parameters(), lr=base.lr, fused=True)
        results[label] = [asdict(m) for m in run_chunks(model, optimizer, windows, detach, base.clip)]

    nodes = _tiny_graph_nodes()
    plots.unrolled_graph(out_dir / "unrolled_graph.png", seq_len=3, chunks=2, **nodes)
    per_chunk = lambda key, label, scale=1.0: [m[key] / scale for m in results[label]]
    ks = list(range(1, chunks + 1))
    plots.curves(out_dir / "detach_memory.png", [
        {"title": "bytes autograd keeps for backward", "xlabel": "window", "ylabel": "MiB",
         "series": {"detach": (ks, per_chunk("graph_bytes", "detach", MB)),
                    "no detach": (ks, per_chunk("graph_bytes", "no-detach", MB))}},
        {"title": "step time", "xlabel": "window", "ylabel": "seconds",
         "series": {"detach": (ks, per_chunk("step_s", "detach")), "no detach": (ks, per_chunk("step_s", "no-detach"))}},
    ], f"What detaching saves: B={base.batch_size}, seq_len={base.seq_len}, H={base.hidden_size}, on {device}")

    d, n = results["detach"], results["no-detach"]
    growth = (n[-1]["graph_bytes"] - n[0]["graph_bytes"]) / max(1, chunks - 1)
    cuda = device.type == "cuda"
    lines = [f"# What detaching the hidden state saves ({chunks} windows)", "",
             f"Model: embed {base.embed_size}, hidden {base.hidden_size}; batch {base.batch_size}, seq_len "
             f"{base.seq_len}; device {device}. Bytes are those autograd keeps for backward, counted exactly with "
             "`saved_tensors_hooks` right before each window's backward. Parameters are not counted, except the "
             "weight snapshots a retained graph needs once the optimizer has updated the weights (no detach).", "", "![memory](detach_memory.png)", "",
             "| window | graph MiB, detach | graph MiB, no detach | step s, detach | step s, no detach |"
             + (" CUDA peak MiB, detach | CUDA peak MiB, no detach |" if cuda else ""),
             "| --- | --- | --- | --- | --- |" + (" --- | --- |" if cuda else "")]
    for a, b in zip(d, n):
        row = (f"| {a['chunk']} | {a['graph_bytes'] / MB:.2f} | {b['graph_bytes'] / MB:.2f} | {a['step_s']:.3f} | "
               f"{b['step_s']:.3f} |")
        if cuda:
            row += f" {a['cuda_peak_bytes'] / MB:.1f} | {b['cuda_peak_bytes'] / MB:.1f} |"
        lines.append(row)
    held = sorted({round(m["graph_bytes"] / MB, 2) for m in d})
    held = f"{held[0]:.2f} MiB at every window" if len(held) == 1 else f"{held[0]:.2f} to {held[-1]:.2f} MiB"
    if chunks == 1:
        without = "With one window there is no later window to compare: pass --chunks 2 or more."
    else:
        first, last = n[0]["step_s"], n[-1]["step_s"]
        timing = (f"and the step time grew with it ({first:.3f} s to {last:.3f} s)" if last > 1.2 * first else
                  f"while the step time shows no clear growth ({first:.3f} s to {last:.3f} s, one timing each)")
        without = (f"Without it, window k's loss back-propagates through all k windows, so the graph grows by "
                   f"{growth / MB:.2f} MiB per window (to {n[-1]['graph_bytes'] / MB:.2f} MiB after {chunks}), "
                   f"{timing}.")
    lines += ["", f"With detach the graph holds {held} and is freed by each backward. {without}", "",
              "![graph](unrolled_graph.png)", "",
              f"In the picture, a backward from window 2's loss visits {nodes['nodes_with_detach']} autograd nodes "
              f"with detach and {nodes['nodes_without']} without (a tiny model, seq_len 3).", ""]
    (out_dir / "report.md").write_text("\n".join(lines))
    report = {"config": asdict(base), "chunks": chunks, "device": str(device), "results": results, **nodes}
    (out_dir / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    return report


def _tiny_graph_nodes() -> dict:
    """Autograd nodes behind the second window's loss of a tiny model, with and without detach."""
    torch.manual_seed(0)
    model = RNNLM(10, 4, 4, backend="reference")
    tokens = torch.randint(0, 10, (1, 7))
    counts = {}
    for key, detach in (("nodes_with_detach", True), ("nodes_without", False)):
        _, state = model(tokens[:, 0:3])
        if detach:
            state = tuple(s.detach() for s in state)
        logits, _ = model(tokens[:, 3:6], state)
        counts[key] = count_graph_nodes(F.cross_entropy(logits, tokens[0, 4:7]))
    return counts
