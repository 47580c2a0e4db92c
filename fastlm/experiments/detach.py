"""What detaching the hidden state saves, written up as a report folder (markdown, JSON, PNGs): the
autograd graph's memory and the step time per window, with and without detaching between windows,
and what a user's loop that leaves out `detach()` does instead."""
from __future__ import annotations

import json
import statistics
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F

from fastlm import figures
from fastlm.config import TrainConfig
from fastlm.data import batchify, tbptt_windows
from fastlm.device import pick_device
from fastlm.errors import TrainingError
from fastlm.experiments.autograd_memory import (
    FASTLM_ARM,
    TINY_SHAPE,
    count_graph_nodes,
    run_chunks,
    user_loops_without_detach,
)
from fastlm.experiments.common import MB, corpus_of, fresh_folder
from fastlm.models.lm import RNNLM
from fastlm.models.lstm import resolve_backend

ARMS = (("detach", True), ("no-detach", False))
BYTE_FIELDS = ("graph_bytes", "activation_bytes", "snapshot_bytes", "bytes_after_step")
# A step time is called growing only when the last window's fastest timing beats the first
# window's slowest by more than this factor: one slow timing (a page fault, another process)
# must not read as growth.
TIME_GROWTH = 1.2
# A float32 gradient within this relative error of the float64 one differs by rounding alone.
GRADIENT_MATCH = 1e-4
USER_LOOP_WINDOWS, USER_LOOP_LR = 2, 0.1
TIME_RULE = (f"A step time is said to grow only when the last window's fastest timing is more than "
             f"{TIME_GROWTH - 1:.0%} above the first window's slowest; otherwise the report says there is no "
             "clear growth.")


def compare_detach(base: TrainConfig, chunks: int, out_dir: Path, repeats: int = 3) -> dict:
    """Memory and time per window with and without detach, the experiment run `repeats` times
    from the same seed; writes report.md, report.json and two PNGs."""
    if chunks < 1:
        raise TrainingError(f"--chunks must be at least 1, got {chunks}")
    if repeats < 1:
        raise TrainingError(f"--repeats must be at least 1, got {repeats}")
    out_dir = fresh_folder(out_dir)
    device = pick_device(base.device)
    vocab, windows = _first_windows(base, chunks, device)
    runs = _measure(base, vocab, windows, repeats, device)
    results = {label: _summarise(label_runs) for label, label_runs in runs.items()}
    identical = all(_bytes_of(run) == _bytes_of(label_runs[0]) for label_runs in runs.values() for run in label_runs)
    loops = {"windows": USER_LOOP_WINDOWS, "lr": USER_LOOP_LR, "shape": TINY_SHAPE,
             "outcomes": [asdict(o) for o in user_loops_without_detach(USER_LOOP_WINDOWS, USER_LOOP_LR)]}
    nodes = _tiny_graph_nodes()
    figures.unrolled_graph(out_dir / "unrolled_graph.png", seq_len=3, chunks=2, **nodes)
    _plot_memory_and_time(out_dir / "detach_memory.png", results, repeats, base, device)
    report = {"config": asdict(base), "chunks": chunks, "repeats": repeats, "device": str(device),
              "torch": torch.__version__, "bytes_identical_across_repeats": identical, "results": results,
              "conclusions": conclusions(results["detach"], results["no-detach"], repeats, identical),
              "user_loops": loops, **nodes}
    (out_dir / "report.md").write_text("\n".join(_markdown(report, base, device)))
    (out_dir / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    return report


def _first_windows(base: TrainConfig, chunks: int, device) -> tuple[int, list]:
    """The vocabulary size and the training set's first `chunks` TBPTT windows."""
    corpus = corpus_of(base)
    rows = batchify(corpus.train, base.batch_size).to(device)
    windows = list(tbptt_windows(rows, base.seq_len))[:chunks]
    if len(windows) < chunks:
        raise TrainingError(f"the data has only {len(windows)} windows of {base.seq_len}: use fewer --chunks")
    return len(corpus.dictionary), windows


def _measure(base: TrainConfig, vocab: int, windows, repeats: int, device) -> dict[str, list[list[dict]]]:
    """Every arm's measurements, once per repeat; the arms alternate so that a slow spell of the
    machine hits both."""
    new_model = lambda: RNNLM(vocab, base.embed_size, base.hidden_size, base.num_layers,
                              backend=base.backend).to(device)
    warm_up = new_model()
    run_chunks(warm_up, torch.optim.Adam(warm_up.parameters(), fused=True), windows[:1], True, base.clip)  # untimed
    runs = {label: [] for label, _ in ARMS}
    for _ in range(repeats):
        for label, detach in ARMS:
            torch.manual_seed(base.seed)
            model = new_model()
            optimizer = torch.optim.Adam(model.parameters(), lr=base.lr, fused=True)
            runs[label].append([asdict(m) for m in run_chunks(model, optimizer, windows, detach, base.clip)])
    return runs


def _bytes_of(run: list[dict]) -> list[tuple]:
    return [tuple(window[field] for field in BYTE_FIELDS) for window in run]


def _summarise(runs: list[list[dict]]) -> list[dict]:
    """Per window: the first repeat's bytes and loss, and the step time's median, min, max and all
    timings over the repeats."""
    summary = []
    for windows in zip(*runs):
        timings = [window["step_s"] for window in windows]
        summary.append({**windows[0], "step_s": statistics.median(timings), "step_s_min": min(timings),
                        "step_s_max": max(timings), "step_s_all": timings})
    return summary


# -- the conclusions: each sentence follows from the numbers in the table ------------------------

def conclusions(detach: list[dict], no_detach: list[dict], repeats: int, identical: bool = True) -> list[str]:
    """The report's sentences about memory and time, from the per-window summaries."""
    sentences = [_detach_memory(detach), _no_detach_memory(no_detach)]
    if len(no_detach) > 1:
        sentences += [_time_sentence("With detach", detach, repeats), _time_sentence("Without detach", no_detach,
                                                                                    repeats)]
    if repeats > 1:
        sentences.append(f"The byte counts were identical in all {repeats} repeats." if identical else
                         "The byte counts differed between repeats (see report.json): the table shows the first "
                         "repeat's.")
    return sentences


def _detach_memory(rows: list[dict]) -> str:
    where = "the one window" if len(rows) == 1 else f"every one of the {len(rows)} windows"
    held = sorted({row["graph_bytes"] for row in rows})
    amount = f"{_mib(held[0])} at {where}" if len(held) == 1 else f"{_span(held)} over the {len(rows)} windows"
    left = max(row["bytes_after_step"] for row in rows)
    freed = "each backward frees all of it" if left == 0 else f"up to {_mib(left)} is still held after a step"
    return f"With detach, autograd holds {amount} right before the backward, and {freed}."


def _no_detach_memory(rows: list[dict]) -> str:
    first, last = rows[0], rows[-1]
    start = (f"Without detach, window 1 holds {_mib(first['graph_bytes'])} ({_mib(first['activation_bytes'])} of "
             f"activations and {_mib(first['snapshot_bytes'])} of weight snapshots)")
    if len(rows) == 1:
        return f"{start}. With one window there is no later window to compare: pass --chunks 2 or more."
    steps = {field: [b[field] - a[field] for a, b in zip(rows, rows[1:])]
             for field in ("graph_bytes", "activation_bytes", "snapshot_bytes")}
    total = steps["graph_bytes"]
    if all(step == 0 for step in total):
        return f"{start}, and the graph does not grow: it holds the same at all {len(rows)} windows."
    verb = "grows" if all(step > 0 for step in total) else "shrinks" if all(step < 0 for step in total) else "changes"
    return (f"{start}, and the graph {verb} by {_per_window(total)} per window: "
            f"{_per_window(steps['activation_bytes'])} of activations and {_per_window(steps['snapshot_bytes'])} "
            f"of weight snapshots, to {_mib(last['graph_bytes'])} at window {len(rows)}.")


def _time_sentence(arm: str, rows: list[dict], repeats: int) -> str:
    slowest_first, fastest_last, n = rows[0]["step_s_max"], rows[-1]["step_s_min"], len(rows)
    last = f"window {n}'s timing" if repeats == 1 else f"window {n}'s fastest of {repeats} timings"
    first = "window 1's timing" if repeats == 1 else "window 1's slowest"
    medians = ("" if repeats == 1 else
               f" (medians: {_seconds(rows[0]['step_s'])} at window 1, {_seconds(rows[-1]['step_s'])} at window {n})")
    above = fastest_last / slowest_first - 1
    if fastest_last > TIME_GROWTH * slowest_first:
        return (f"{arm}, the step time grows: {last}, {_seconds(fastest_last)}, is {_percent(above)} above {first}, "
                f"{_seconds(slowest_first)}{medians}.")
    if fastest_last > slowest_first:
        how = (f"only {_percent(above)} above {first}, {_seconds(slowest_first)}, not more than the rule's "
               f"{TIME_GROWTH - 1:.0%}")
    else:
        how = f"no higher than {first}, {_seconds(slowest_first)}"
    return f"{arm}, the step time shows no clear growth: {last}, {_seconds(fastest_last)}, is {how}{medians}."


def _mib(nbytes: float) -> str:
    return f"{nbytes / MB:.2f} MiB"


def _span(values: list[int]) -> str:
    """'a to b MiB', in bytes where two decimals of a MiB would print them alike."""
    low, high = min(values), max(values)
    if _mib(low) == _mib(high):
        return f"{low:,} to {high:,} bytes"
    return f"{low / MB:.2f} to {_mib(high)}"


def _per_window(steps: list[int]) -> str:
    if len(set(steps)) > 1:
        return _span(steps)
    return _mib(steps[0]) if _mib(steps[0]) not in (_mib(0), _mib(-0.0)) else f"{steps[0]:,} bytes"


def _percent(fraction: float) -> str:
    """As few decimals as tell it from 0% and from the growth threshold (20.04% is not "20%")."""
    for digits in (0, 1, 2):
        text = f"{fraction:.{digits}%}"
        if text not in (f"{0:.{digits}%}", f"{TIME_GROWTH - 1:.{digits}%}"):
            break
    return text


def _seconds(value: float) -> str:
    return f"{value:.3g} s"


# -- the report ----------------------------------------------------------------------------------

def _markdown(report: dict, base: TrainConfig, device) -> list[str]:
    chunks, repeats = report["chunks"], report["repeats"]
    lines = [f"# What detaching the hidden state saves ({chunks} windows, {repeats} repeats)", "",
             f"Model: embed {base.embed_size}, hidden {base.hidden_size}, LSTM backend "
             f"{resolve_backend(base.backend, device)}; batch "
             f"{base.batch_size}, seq_len {base.seq_len}; device {device}; torch {report['torch']}. Both arms train "
             f"with Adam(fused=True), fastlm's default optimizer, from seed {base.seed}, and the whole experiment ran "
             f"{repeats} times: step times are the median (min to max) of the {repeats} runs. Bytes are those "
             "autograd keeps for backward, counted exactly with `saved_tensors_hooks` right before each window's "
             "backward. Parameters are not counted, except the weight snapshots that the no-detach arm's retained "
             "graphs need (see below), shown as their own column. \"No detach\" is fastlm's measured arm: true "
             "BPTT through every earlier window, `retain_graph=True` plus those weight snapshots (its step times "
             "include making them); what a loop that merely leaves out `detach()` does is below.", "",
             "![memory](detach_memory.png)", "",
             *_table(report["results"], device.type == "cuda"), "", "## Conclusions", "",
             *(f"- {sentence}" for sentence in report["conclusions"]), "", TIME_RULE, "",
             *_what_no_detach_means(report["user_loops"]), "", "## The unrolled graph", "",
             "![graph](unrolled_graph.png)", "",
             f"A backward from window 2's loss visits {report['nodes_with_detach']} autograd nodes with detach and "
             f"{report['nodes_without']} without (a tiny model, seq_len 3). Each window's loss L_k is the mean of "
             "its steps' losses, as `F.cross_entropy` returns it; h_0, c_0 is the initial state; W^(k) is the "
             "weights as window k used them, after k - 1 optimizer updates.", ""]
    return lines


def _table(results: dict, cuda: bool) -> list[str]:
    header = ("| window | detach: graph MiB | no detach: activations MiB | no detach: weight snapshots MiB | "
              "no detach: total MiB | detach: step s | no detach: step s |")
    if cuda:
        header += " CUDA peak MiB, detach | CUDA peak MiB, no detach |"
    lines = [header, "|" + " --- |" * (header.count("|") - 1)]
    for a, b in zip(results["detach"], results["no-detach"]):
        row = (f"| {a['chunk']} | {a['graph_bytes'] / MB:.2f} | {b['activation_bytes'] / MB:.2f} | "
               f"{b['snapshot_bytes'] / MB:.2f} | {b['graph_bytes'] / MB:.2f} | {_timing(a)} | {_timing(b)} |")
        if cuda:
            row += f" {a['cuda_peak_bytes'] / MB:.1f} | {b['cuda_peak_bytes'] / MB:.1f} |"
        lines.append(row)
    return lines


def _timing(row: dict) -> str:
    if row["step_s_min"] == row["step_s_max"]:
        return f"{row['step_s']:.3g}"
    return f"{row['step_s']:.3g} ({row['step_s_min']:.3g} to {row['step_s_max']:.3g})"


def _what_no_detach_means(loops: dict) -> list[str]:
    shape, windows = loops["shape"], loops["windows"]
    lines = ['## What "no detach" measures', "",
             f"A training loop that merely leaves out `detach()` is not what the no-detach arm measures. Three such "
             f"loops were run on a tiny float32 model (torch's LSTM; vocabulary {shape['vocab']}, embed "
             f"{shape['embed']}, hidden {shape['hidden']}, batch {shape['batch']}, seq_len {shape['seq_len']}) for "
             f"{windows} windows with Adam at lr {loops['lr']}, and so was fastlm's arm. \"The true gradient\" is "
             "the last window's gradient back-propagated through all windows, each run with the weights it had "
             "then, computed independently in float64 by torch's own modules.", ""]
    lines += [f"- {_loop_sentence(outcome, windows)}" for outcome in loops["outcomes"]]
    lines += ["", "So the no-detach arm is the cost of true BPTT through all windows so far, not what a user's loop "
              "does: it keeps every window's graph (`retain_graph=True`), and fastlm's saved-tensor hook copies "
              "each weight a window's graph saves, once per window, so that every graph back-propagates with the "
              "weights its window used. Those copies are the weight-snapshot column; the activations column is "
              "what the retained graphs hold besides. Each window's snapshots include a copy of the output layer's "
              "weight, which only that window's own loss needs: it is freed with the loss once the step is done, so "
              "what stays, and what the column grows by, is the copies of the LSTM's weights."]
    return lines


def _loop_sentence(outcome: dict, windows: int) -> str:
    name = outcome["loop"] if outcome["loop"] == FASTLM_ARM else f"`{outcome['loop']}`"
    if outcome["failed_at_window"] is not None:
        return f"{name} stops at window {outcome['failed_at_window']}: \"{_first_sentence(outcome['error'])}\""
    error = outcome["gradient_error"]
    all_windows = "both windows" if windows == 2 else f"all {windows} windows"
    if error < GRADIENT_MATCH:
        return (f"{name} runs through {all_windows}, and its window-{windows} gradient matches the true one to a "
                f"relative error of {error:.1e} (float32 against float64).")
    why = ("" if outcome["step_bumps_version"] is not False else
           ": its optimizer step updates the weights in place without bumping their version counters, so autograd "
           "does not notice that the weights saved by the earlier windows' graphs have changed, and back-propagates "
           "through those windows with the weights as already updated")
    return (f"{name} runs through {all_windows} without an error, but its window-{windows} gradient differs "
            f"from the true one by a relative error of {error:.1e}{why}.")


def _first_sentence(text: str) -> str:
    head, dot, _ = text.partition(". ")
    return head + "." if dot else text


def _plot_memory_and_time(path: Path, results: dict, repeats: int, base: TrainConfig, device) -> None:
    ks = [row["chunk"] for row in results["detach"]]
    mib = lambda label, field: [row[field] / MB for row in results[label]]
    seconds = lambda label: tuple([row[field] for row in results[label]] for field in ("step_s", "step_s_min",
                                                                                         "step_s_max"))
    figures.curves(path, [
        {"title": "bytes autograd keeps for backward", "xlabel": "window", "ylabel": "MiB",
         "series": {"detach": (ks, mib("detach", "graph_bytes")),
                    "no detach: total": (ks, mib("no-detach", "graph_bytes")),
                    "no detach: activations": (ks, mib("no-detach", "activation_bytes")),
                    "no detach: weight snapshots": (ks, mib("no-detach", "snapshot_bytes"))}},
        {"title": f"step time: median and range of {repeats} run{'s' * (repeats > 1)}", "xlabel": "window",
         "ylabel": "seconds", "series": {"detach": (ks, *seconds("detach")), "no detach": (ks, *seconds("no-detach"))}},
    ], f"What detaching saves: B={base.batch_size}, seq_len={base.seq_len}, H={base.hidden_size}, on {device}; "
       "no detach = retain_graph=True + weight snapshots")


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
