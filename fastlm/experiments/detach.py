"""What detaching the hidden state saves, written up as a report folder (markdown, JSON, PNGs).

Both arms train the same model from the same seed on the same first TBPTT windows of the training
split: one detaches the state between windows (the baseline), the other back-propagates through
every earlier window. Measured per window: the bytes autograd keeps, the step time and the training
loss; after the last window, each arm's loss on the start of the validation split. From the
measured per-window growth the no-detach arm is projected to a whole epoch, since running one is
out of reach; `detach_report` writes the sentences, tables and pictures."""
from __future__ import annotations

import json
import os
import statistics
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F

from fastlm.config import TrainConfig
from fastlm.data import batchify, batchify_for_eval, num_windows, tbptt_windows
from fastlm.device import available_bytes, pick_device
from fastlm.errors import TrainingError
from fastlm.experiments import detach_report
from fastlm.experiments.autograd_memory import TINY_SHAPE, count_graph_nodes, run_chunks, user_loops_without_detach
from fastlm.experiments.common import corpus_of, fresh_folder
from fastlm.models.lm import RNNLM
from fastlm.scoring.plain import evaluate

ARMS = (("detach", True), ("no-detach", False))
BYTE_FIELDS = ("graph_bytes", "activation_bytes", "snapshot_bytes", "bytes_after_step")
USER_LOOP_WINDOWS, USER_LOOP_LR = 2, 0.1
DEFAULT_EVAL_TOKENS = 20000


def compare_detach(base: TrainConfig, chunks: int, out_dir: Path, repeats: int = 3,
                   eval_tokens: int = DEFAULT_EVAL_TOKENS) -> dict:
    """Memory, time and loss per window with and without detach, the experiment run `repeats` times
    from the same seed, and the no-detach arm projected to an epoch; writes report.md, report.json
    and two PNGs."""
    for flag, value in (("--chunks", chunks), ("--repeats", repeats), ("--eval-tokens", eval_tokens)):
        if value < 1:
            raise TrainingError(f"{flag} must be at least 1, got {value}")
    out_dir = fresh_folder(out_dir)
    device = pick_device(base.device)
    corpus = corpus_of(base)
    rows = batchify(corpus.train, base.batch_size).to(device)
    windows = list(tbptt_windows(rows, base.seq_len))[:chunks]
    if len(windows) < chunks:
        raise TrainingError(f"the data has only {len(windows)} windows of {base.seq_len}: use fewer --chunks")
    valid = batchify_for_eval(corpus.valid[:eval_tokens], base.eval_batch_size, "valid").to(device)
    runs, validation = _measure(base, len(corpus.dictionary), windows, repeats, valid, device)
    results = {label: _summarise(label_runs) for label, label_runs in runs.items()}
    report = {"config": asdict(base), "chunks": chunks, "repeats": repeats, "eval_tokens": eval_tokens,
              "validation_tokens_scored": valid.shape[0] * (valid.shape[1] - 1), "device": str(device),
              "torch": torch.__version__, "results": results,
              "bytes_identical_across_repeats": _identical(runs, BYTE_FIELDS),
              "losses_identical_across_repeats": _identical(runs, ("loss",)),
              "losses": loss_differences(results["detach"], results["no-detach"]), "validation_loss": validation,
              "projection": project_epoch(results["detach"], results["no-detach"], num_windows(rows, base.seq_len),
                                          *_memory_of(device)),
              "user_loops": {"windows": USER_LOOP_WINDOWS, "lr": USER_LOOP_LR, "shape": TINY_SHAPE,
                             "outcomes": [asdict(o) for o in user_loops_without_detach(USER_LOOP_WINDOWS,
                                                                                       USER_LOOP_LR)]},
              **_tiny_graph_nodes()}
    report["conclusions"] = detach_report.conclusions(results["detach"], results["no-detach"], repeats,
                                                      report["bytes_identical_across_repeats"])
    detach_report.write(out_dir, report, base, device)
    (out_dir / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    return report


def _measure(base: TrainConfig, vocab: int, windows, repeats: int, valid: torch.Tensor,
             device) -> tuple[dict[str, list[list[dict]]], dict[str, float]]:
    """Every arm's measurements, once per repeat (the arms alternate, so that a slow spell of the
    machine hits both), and the validation loss of the untrained model and of each arm's first
    repeat after the last window."""
    def new_model() -> RNNLM:
        torch.manual_seed(base.seed)
        return RNNLM(vocab, base.embed_size, base.hidden_size, base.num_layers, backend=base.backend).to(device)

    warm_up = new_model()
    run_chunks(warm_up, torch.optim.Adam(warm_up.parameters(), fused=True), windows[:1], True, base.clip)  # untimed
    validation = {"untrained": evaluate(new_model(), valid, base.seq_len)}
    runs = {label: [] for label, _ in ARMS}
    for repeat in range(repeats):
        for label, detach in ARMS:
            model = new_model()
            optimizer = torch.optim.Adam(model.parameters(), lr=base.lr, fused=True)
            runs[label].append([asdict(m) for m in run_chunks(model, optimizer, windows, detach, base.clip)])
            if repeat == 0:
                validation[label] = evaluate(model, valid, base.seq_len)
    return runs, validation


def _identical(runs: dict[str, list[list[dict]]], fields: tuple[str, ...]) -> bool:
    values = lambda run: [tuple(window[field] for field in fields) for window in run]
    return all(values(run) == values(label_runs[0]) for label_runs in runs.values() for run in label_runs)


def _summarise(runs: list[list[dict]]) -> list[dict]:
    """Per window: the first repeat's bytes and loss, and the step time's median, min, max and all
    timings over the repeats."""
    summary = []
    for windows in zip(*runs):
        timings = [window["step_s"] for window in windows]
        summary.append({**windows[0], "step_s": statistics.median(timings), "step_s_min": min(timings),
                        "step_s_max": max(timings), "step_s_all": timings})
    return summary


def _memory_of(device: torch.device) -> tuple[int | None, int | None]:
    """This machine's memory for tensors on `device`: (total, available now), None where unknown."""
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
    else:
        try:
            total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError):
            total = None
    return total, available_bytes(device)


# -- what full backpropagation buys, and what it would cost over an epoch -------------------------

def loss_differences(detach: list[dict], no_detach: list[dict]) -> list[dict]:
    """Per window, both arms' training loss (measured before the window's own update, so each is
    the loss on text the model has not yet trained on) and no detach − detach, also relative to the
    detach arm's loss."""
    return [{"window": a["chunk"], "detach": a["loss"], "no_detach": b["loss"], "difference": b["loss"] - a["loss"],
             "relative": (b["loss"] - a["loss"]) / a["loss"]} for a, b in zip(detach, no_detach)]


def linear_fit(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least-squares (intercept at x = 0, slope); a straight line through exactly linear data."""
    mean_x, mean_y = statistics.fmean(xs), statistics.fmean(ys)
    slope = (sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys))
             / sum((x - mean_x) ** 2 for x in xs))
    return mean_y - slope * mean_x, slope


def project_epoch(detach: list[dict], no_detach: list[dict], epoch_windows: int, total_bytes: int | None = None,
                  available: int | None = None) -> dict | None:
    """Both arms over all `epoch_windows` windows of an epoch, extrapolated linearly from the measured
    windows: the no-detach arm's bytes and step time grow by a fitted amount per window, so its last
    window holds intercept + slope · W bytes and its epoch takes Σ_k (a + b·k) = W·a + b·W(W + 1)/2
    seconds; the detach arm's bytes are flat and its epoch is W times its mean step time. None with
    fewer than two windows: there is no slope to extrapolate."""
    if len(no_detach) < 2:
        return None
    ks = [row["chunk"] for row in no_detach]
    memory_at_zero, memory_slope = linear_fit(ks, [row["graph_bytes"] for row in no_detach])
    time_at_zero, time_slope = linear_fit(ks, [row["step_s"] for row in no_detach])
    windows = epoch_windows
    fitting = None
    if available is not None and memory_slope > 0:
        fitting = max(0, int((available - memory_at_zero) // memory_slope))
    return {"windows_measured": len(no_detach), "epoch_windows": windows,
            "no_detach_bytes_per_window": memory_slope, "no_detach_bytes_at_window_0": memory_at_zero,
            "no_detach_last_window_bytes": memory_at_zero + memory_slope * windows,
            "no_detach_seconds_per_window": time_slope, "no_detach_seconds_at_window_0": time_at_zero,
            "no_detach_last_step_s": time_at_zero + time_slope * windows,
            "no_detach_epoch_s": windows * time_at_zero + time_slope * windows * (windows + 1) / 2,
            "detach_bytes": max(row["graph_bytes"] for row in detach),
            "detach_step_s": statistics.fmean(row["step_s"] for row in detach),
            "detach_epoch_s": windows * statistics.fmean(row["step_s"] for row in detach),
            "machine_total_bytes": total_bytes, "machine_available_bytes": available,
            "no_detach_windows_that_fit": fitting}


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
