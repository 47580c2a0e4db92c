"""The detach report's words and pictures: report.md's sentences and tables, and its two PNGs,
from the numbers `fastlm.experiments.detach` measured. Every sentence is computed from those
numbers, so a rerun on another machine says what its own numbers show."""
from __future__ import annotations

from pathlib import Path

from fastlm import figures
from fastlm.config import TrainConfig
from fastlm.experiments.autograd_memory import FASTLM_ARM
from fastlm.experiments.common import MB
from fastlm.models.lstm import resolve_backend

GB = 2**30
# A step time is called growing only when the last window's fastest timing beats the first
# window's slowest by more than this factor: one slow timing (a page fault, another process)
# must not read as growth.
TIME_GROWTH = 1.2
# A float32 gradient within this relative error of the float64 one differs by rounding alone.
GRADIENT_MATCH = 1e-4
TIME_RULE = (f"A step time is said to grow only when the last window's fastest timing is more than "
             f"{TIME_GROWTH - 1:.0%} above the first window's slowest; otherwise the report says there is no "
             "clear growth.")


def write(out_dir: Path, report: dict, base: TrainConfig, device) -> None:
    """report.md and its two pictures into `out_dir`."""
    figures.unrolled_graph(out_dir / "unrolled_graph.png", seq_len=3, chunks=2,
                           nodes_with_detach=report["nodes_with_detach"], nodes_without=report["nodes_without"])
    _plot_memory_time_and_loss(out_dir / "detach_memory.png", report, base, device)
    (out_dir / "report.md").write_text("\n".join(_markdown(report, base, device)))


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


# -- projected to an epoch, and what full backpropagation buys ------------------------------------

def projection_lines(p: dict | None, base: TrainConfig) -> list[str]:
    """The epoch projection's table and sentences; with one window there is no slope to project."""
    head = ["## Projected to one epoch", ""]
    if p is None:
        return head + ["With one window there is no per-window growth to extrapolate: pass --chunks 2 or more."]
    n, w = p["windows_measured"], p["epoch_windows"]
    lines = head + [
        f"A linear extrapolation from the {n} measured windows to all {w:,} windows of one epoch (the training "
        f"split in {base.batch_size} rows, windows of {base.seq_len} tokens), not a measurement: the no-detach "
        "arm's bytes and median step times are fitted with a straight line in the window number k, so the bytes "
        "before window k's backward are a + b·k and the epoch's time is the sum of its step times, "
        "Σ_k (a + b·k) = W·a + b·W(W + 1)/2, quadratic in the number of windows W.", "",
        f"| one epoch, {w:,} windows | detach (baseline) | no detach |", "| --- | --- | --- |",
        f"| bytes autograd keeps before window {w:,}'s backward | {_size(p['detach_bytes'])} | "
        f"{_size(p['no_detach_last_window_bytes'])} |",
        f"| growth per window | none | {_mib(p['no_detach_bytes_per_window'])}, "
        f"{_seconds(p['no_detach_seconds_per_window'])} |",
        f"| step time at window {w:,} | {_seconds(p['detach_step_s'])} (mean of the medians) | "
        f"{_seconds(p['no_detach_last_step_s'])} |",
        f"| the epoch's steps, in all | {_duration(p['detach_epoch_s'])} | {_duration(p['no_detach_epoch_s'])} |",
        "", f"- {_fits_sentence(p)}",
        f"- Over the epoch the no-detach arm would take {_ratio(p['no_detach_epoch_s'] / p['detach_epoch_s'])} "
        f"as long as the detach arm ({_duration(p['no_detach_epoch_s'])} against {_duration(p['detach_epoch_s'])}), "
        "because every window's backward runs through all the windows before it."]
    return lines


def _fits_sentence(p: dict) -> str:
    last = (f"Without detach, autograd would hold {_size(p['no_detach_last_window_bytes'])} before the last "
            f"window's backward, against {_size(p['detach_bytes'])} with detach")
    if p["machine_available_bytes"] is None:
        return f"{last}; this machine's memory could not be read."
    total = "" if p["machine_total_bytes"] is None else f"{_size(p['machine_total_bytes'])} in all, "
    machine = f"this machine has {total}{_size(p['machine_available_bytes'])} of it available when the report ran"
    fitting = p["no_detach_windows_that_fit"]
    if fitting is not None and fitting < p["epoch_windows"]:
        return (f"{last}; {machine}: the no-detach arm's graph alone would outgrow that after window {fitting:,} of "
                f"{p['epoch_windows']:,}, and it does not count the model, its gradients or the optimizer's state.")
    return f"{last}; {machine}, so by this count the epoch would fit."


def loss_lines(losses: list[dict], validation: dict, report: dict) -> list[str]:
    """What full backpropagation buys: the per-window training-loss table and its sentences."""
    lines = ["## What full backpropagation buys", "",
             "Each window's training loss is measured before that window's own update, so it is the loss on text "
             "the model has not trained on yet. The difference is no detach − detach: negative where full "
             "backpropagation gives the lower loss.", "",
             "| window | detach: loss | no detach: loss | no detach − detach | relative to the detach loss |",
             "| --- | --- | --- | --- | --- |"]
    lines += [f"| {row['window']} | {row['detach']:.4f} | {row['no_detach']:.4f} | {row['difference']:+.4f} | "
              f"{row['relative']:+.2%} |" for row in losses]
    return lines + ["", *(f"- {sentence}" for sentence in loss_sentences(losses, validation, report))]


def loss_sentences(losses: list[dict], validation: dict, report: dict) -> list[str]:
    """The training losses' agreement and difference, and the validation loss after the last window."""
    same = next((i for i, row in enumerate(losses) if row["difference"] != 0), len(losses))
    sentences = []
    if same:
        why = (" (window 1's gradient has no earlier window to flow into, so the first update is the same in both "
               "arms, and window 2's loss is measured before its own update)" if same == 2 else "")
        sentences.append(f"The two arms' training losses are identical at window{'s 1 to' if same > 1 else ''} "
                         f"{same}{why}.")
    differing = losses[same:]
    if differing:
        largest = max(differing, key=lambda row: abs(row["difference"]))
        mean = sum(row["difference"] for row in differing) / len(differing)
        mean_abs = sum(abs(row["difference"]) for row in differing) / len(differing)
        lower = sum(row["difference"] < 0 for row in differing)
        sentences.append(
            f"From window {differing[0]['window']} to {losses[-1]['window']} they differ by {mean_abs:.4f} on "
            f"average ({mean:+.4f} signed), at most {largest['difference']:+.4f} at window {largest['window']} "
            f"({largest['relative']:+.2%} of the detach arm's loss); no detach has the lower loss in {lower} of "
            f"these {len(differing)} windows.")
    elif len(losses) > 1:
        sentences.append("They never differ over the windows measured.")
    sentences.append(_validation_sentence(validation, report))
    if report["repeats"] > 1:
        sentences.append(f"The training losses were identical in all {report['repeats']} repeats."
                         if report["losses_identical_across_repeats"] else
                         "The training losses differed between repeats (see report.json): the table shows the first "
                         "repeat's.")
    return sentences


def _validation_sentence(validation: dict, report: dict) -> str:
    untrained, detach, no_detach = validation["untrained"], validation["detach"], validation["no-detach"]
    difference = no_detach - detach
    trained_by = untrained - detach
    share = f", {difference / trained_by:+.1%} of that" if trained_by > 0 else ""
    return (f"After the {report['chunks']} windows, the first {report['validation_tokens_scored']:,} predicted "
            f"tokens of the validation split score a loss of {detach:.4f} with detach and {no_detach:.4f} without "
            f"(difference {difference:+.4f}, {difference / detach:+.2%}); the untrained model scores "
            f"{untrained:.4f}, so the {report['chunks']} windows of training with detach lowered it by "
            f"{trained_by:.4f}, and full backpropagation changed the result by {difference:+.4f}{share}.")


def _ratio(times: float) -> str:
    return f"{times:.0f} times" if times >= 10 else f"{times:.2g} times"


def _size(nbytes: float) -> str:
    return f"{nbytes / GB:.1f} GiB" if nbytes >= GB else _mib(nbytes)


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


# -- the report -----------------------------------------------------------------------------------

def command_line(report: dict, base: TrainConfig) -> str:
    """The command that makes this report again, into a new folder: compare's flags that differ from
    their defaults, and the experiment's own."""
    defaults = TrainConfig()
    flags = [f"--{name.replace('_', '-')} {value}" for name, value in vars(base).items()
             if value != getattr(defaults, name)]
    return (f"python -m fastlm.compare detach --chunks {report['chunks']} --repeats {report['repeats']} "
            f"--eval-tokens {report['eval_tokens']} {' '.join(flags)}{' ' * bool(flags)}--out NEW_FOLDER")


def _markdown(report: dict, base: TrainConfig, device) -> list[str]:
    chunks, repeats = report["chunks"], report["repeats"]
    return [f"# What detaching the hidden state saves ({chunks} windows, {repeats} repeats)", "",
            "Made, pictures included, by one command (a new folder each time; a report is never overwritten):", "",
            f"    {command_line(report, base)}", "",
            *_setting(report, base, device), "", "![memory, time and loss](detach_memory.png)", "",
            *_table(report["results"], device.type == "cuda"), "", "## Conclusions", "",
            *(f"- {sentence}" for sentence in report["conclusions"]), "", TIME_RULE, "",
            *projection_lines(report["projection"], base), "",
            *loss_lines(report["losses"], report["validation_loss"], report), "",
            *_what_no_detach_means(report["user_loops"]), "", "## The unrolled graph", "",
            "![graph](unrolled_graph.png)", "",
            f"A backward from window 2's loss visits {report['nodes_with_detach']} autograd nodes with detach and "
            f"{report['nodes_without']} without (a tiny model, seq_len 3). Forward arrows are solid and black, the "
            "gradient's are dashed and red. Each window's loss L_k is the mean of its steps' losses, as "
            "`F.cross_entropy` returns it; h_0, c_0 is the initial state; W^(k) is the weights as window k used "
            "them, after k - 1 optimizer updates.", "", *_not_shown(report, base, device), ""]


def _setting(report: dict, base: TrainConfig, device) -> list[str]:
    chunks, repeats = report["chunks"], report["repeats"]
    tokens = chunks * base.batch_size * base.seq_len
    return [
        "## Setting and baseline", "",
        f"- Model: embed {base.embed_size}, hidden {base.hidden_size}, {base.num_layers} LSTM layer"
        f"{'s' * (base.num_layers > 1)}, backend {resolve_backend(base.backend, device)}, float32; device {device}; "
        f"torch {report['torch']}.",
        f"- Data: the first {chunks} TBPTT windows of the training split of {base.data} ({base.batch_size} rows, "
        f"seq_len {base.seq_len}: {tokens:,} tokens), the same windows in both arms and every repeat. The "
        f"validation loss: the start of the validation split, at most {report['eval_tokens']:,} tokens, in "
        f"{base.eval_batch_size} rows ({report['validation_tokens_scored']:,} tokens predicted).",
        f"- Training: Adam(fused=True), fastlm's default optimizer, lr {base.lr}, gradient clipping at {base.clip}; "
        f"both arms from seed {base.seed}, so from the same initial weights.",
        f"- Repeats: the whole experiment ran {repeats} time{'s' * (repeats > 1)}; step times are the median (min "
        f"to max) of the {repeats} runs, bytes and losses the first run's.",
        "- Baseline: the detach arm is the baseline of the no-detach arm; they differ only in whether the state "
        "is detached between windows. For the validation loss, the untrained model (the same initial weights) "
        "shows how far the windows of training moved it.",
        "- Bytes are those autograd keeps for backward, counted exactly with `saved_tensors_hooks` right before "
        "each window's backward. Parameters are not counted, except the weight snapshots that the no-detach arm's "
        "retained graphs need (see below), shown as their own column. \"No detach\" is fastlm's measured arm: "
        "true BPTT through every earlier window, `retain_graph=True` plus those weight snapshots (its step times "
        "include making them); what a loop that merely leaves out `detach()` does is below."]


def _not_shown(report: dict, base: TrainConfig, device) -> list[str]:
    p, chunks = report["projection"], report["chunks"]
    epoch = f" of the {p['epoch_windows']:,} in an epoch" if p else ""
    largest = max(report["losses"], key=lambda row: abs(row["difference"]))
    return [
        "## What this does not show", "",
        f"- Whether full backpropagation trains a better model: only the first {chunks} windows{epoch} were "
        f"trained, from one seed. A training-loss difference of at most {abs(largest['difference']):.4f} "
        f"({abs(largest['relative']):.2%}) after so few windows says nothing of the loss after an epoch, and "
        "without other seeds there is no yardstick for how much two runs differ anyway.",
        "- The epoch's memory and time: they are extrapolated along a straight line, not measured; the real run "
        "would stop, or swap, once the graph outgrows the memory.",
        "- The process's memory: the bytes are autograd's saved tensors, exactly, not what the allocator holds, "
        "and not the model, its gradients or the optimizer's state"
        + (" (the CUDA peak columns include all of those)." if device.type == "cuda" else
           "; nor a GPU's memory, which this run did not touch."),
        f"- Timings elsewhere: they come from this machine ({device}), and shift with anything else it runs; "
        "another device changes both the constant step time and its growth per window.",
        "- A user's loop without `detach()`: the no-detach arm is true BPTT with weight snapshots; what such loops "
        "do instead is above."]


def _plot_memory_time_and_loss(path: Path, report: dict, base: TrainConfig, device) -> None:
    results, repeats = report["results"], report["repeats"]
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
        {"title": "training loss, no detach − detach", "xlabel": "window", "ylabel": "difference in loss (nats)",
         "series": {"no detach − detach": (ks, [row["difference"] for row in report["losses"]])}},
    ], f"What detaching saves: B={base.batch_size}, seq_len={base.seq_len}, H={base.hidden_size}, on {device}; "
       "no detach = retain_graph=True + weight snapshots")
