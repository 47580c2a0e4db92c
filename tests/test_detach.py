"""The Q2.1 report on what detach saves: its sentences and its projection to an epoch from constructed
numbers, its picture, and the report end to end on the small corpus."""
import json

import pytest

from fastlm.cli import run_main
from fastlm.compare import main as compare_main
from fastlm.config import TrainConfig
from fastlm.experiments.autograd_memory import FASTLM_ARM, USER_LOOPS
from fastlm.experiments.detach import loss_differences, project_epoch
from fastlm.experiments.detach_report import conclusions, loss_sentences, projection_lines

MiB = 2**20
TINY = ["--embed-size", "16", "--hidden-size", "32", "--batch-size", "4", "--seq-len", "5", "--lr", "0.01",
        "--device", "cpu"]


def _rows(activations, snapshots, timings, after=None):
    """Per-window summaries as the report makes them: bytes in MiB, timings as (min, median, max)."""
    rows = []
    for k, (act, snap, (low, median, high)) in enumerate(zip(activations, snapshots, timings), 1):
        rows.append({"chunk": k, "graph_bytes": int((act + snap) * MiB), "activation_bytes": int(act * MiB),
                     "snapshot_bytes": int(snap * MiB), "bytes_after_step": 0 if after is None else after[k - 1],
                     "step_s": median, "step_s_min": low, "step_s_max": high})
    return rows


FLAT = [(0.10, 0.11, 0.12)] * 3


def test_growth_is_split_into_activations_and_snapshots_and_time_growth_is_claimed_by_the_rule():
    detach = _rows([40, 40, 40], [0, 0, 0], FLAT)
    no_detach = _rows([40, 80, 120], [20, 38, 56], [(0.10, 0.11, 0.12), (0.2, 0.21, 0.22), (0.30, 0.31, 0.33)])
    text = conclusions(detach, no_detach, repeats=3)
    assert text[0] == ("With detach, autograd holds 40.00 MiB at every one of the 3 windows right before the "
                       "backward, and each backward frees all of it.")
    assert text[1] == ("Without detach, window 1 holds 60.00 MiB (40.00 MiB of activations and 20.00 MiB of weight "
                       "snapshots), and the graph grows by 58.00 MiB per window: 40.00 MiB of activations and 18.00 "
                       "MiB of weight snapshots, to 176.00 MiB at window 3.")
    assert text[2].startswith("With detach, the step time shows no clear growth: window 3's fastest of 3 timings, "
                              "0.1 s, is no higher than window 1's slowest, 0.12 s")
    assert text[3] == ("Without detach, the step time grows: window 3's fastest of 3 timings, 0.3 s, is 150% above "
                       "window 1's slowest, 0.12 s (medians: 0.11 s at window 1, 0.31 s at window 3).")
    assert text[4] == "The byte counts were identical in all 3 repeats."


@pytest.mark.parametrize("fastest_last, expected", [
    (0.144, "is only 20.00% above window 1's slowest, 0.12 s, not more than the rule's 20%"),  # the tie
    (0.1441, "the step time grows: window 2's fastest of 3 timings, 0.144 s, is 20.1% above"),
    (0.13, "is only 8% above window 1's slowest, 0.12 s, not more than the rule's 20%"),
    (0.12, "is no higher than window 1's slowest, 0.12 s"),
], ids=["tie", "just-above", "below-threshold", "equal"])
def test_step_time_growth_needs_the_last_fastest_more_than_20_percent_above_the_first_slowest(fastest_last,
                                                                                               expected):
    rows = _rows([1, 2], [0, 1], [(0.10, 0.11, 0.12), (fastest_last, 0.2, 0.3)])
    sentence = conclusions(rows, rows, repeats=3)[3]
    assert expected in sentence
    assert ("grows" in sentence) == (fastest_last > 1.2 * 0.12)


def test_no_growth_and_changing_bytes_are_said_as_they_are():
    still = _rows([5, 5, 5], [1, 1, 1], FLAT)
    assert "and the graph does not grow: it holds the same at all 3 windows." in conclusions(still, still, 3)[1]
    uneven = _rows([40, 40.5, 40], [0, 0, 0], FLAT, after=[0, 3 * MiB, 0])
    sentence = conclusions(uneven, uneven, 3)[0]
    assert "holds 40.00 to 40.50 MiB over the 3 windows" in sentence
    assert "up to 3.00 MiB is still held after a step" in sentence
    assert "the graph changes by -0.50 to 0.50 MiB per window" in conclusions(uneven, uneven, 3)[1]
    assert "differed between repeats" in conclusions(still, still, 3, identical=False)[-1]


def test_one_window_has_nothing_to_compare():
    rows = _rows([40], [20], FLAT[:1])
    text = conclusions(_rows([40], [0], FLAT[:1]), rows, repeats=1)
    assert text[0].startswith("With detach, autograd holds 40.00 MiB at the one window")
    assert text[1] == ("Without detach, window 1 holds 60.00 MiB (40.00 MiB of activations and 20.00 MiB of weight "
                       "snapshots). With one window there is no later window to compare: pass --chunks 2 or more.")
    assert len(text) == 2  # no step time to compare, and one run has no repeats to compare bytes across


def test_a_single_timing_is_called_a_timing():
    rows = _rows([1, 2], [0, 1], [(0.1, 0.1, 0.1), (0.5, 0.5, 0.5)])
    assert conclusions(rows, rows, repeats=1)[3] == ("Without detach, the step time grows: window 2's timing, 0.5 s, "
                                                     "is 400% above window 1's timing, 0.1 s.")


def test_the_picture_draws_both_cases_with_the_mean_loss_the_initial_state_and_each_windows_weights(tmp_path):
    from fastlm.figures import unrolled_graph

    texts = unrolled_graph(tmp_path / "graph.png", seq_len=3, chunks=2, nodes_with_detach=30, nodes_without=57)
    assert (tmp_path / "graph.png").read_bytes()[:4] == b"\x89PNG"
    assert texts.count("$L_{1} = \\frac{1}{3}(\\ell_{1} + \\ell_{2} + \\ell_{3})$") == 2  # one per case
    assert "$L_{2} = \\frac{1}{3}(\\ell_{4} + \\ell_{5} + \\ell_{6})$" in texts
    assert not any("\\sum" in text for text in texts)  # the loss is a mean, as F.cross_entropy's
    assert sum(text.startswith("$h_0, c_0$") for text in texts) == 2
    assert "$W^{(1)}$: W before any update" in texts and "$W^{(2)}$: W after 1 update" in texts
    assert any(text.startswith("With detach:") and "visits 30 autograd nodes" in text for text in texts)
    assert any(text.startswith("Without detach:") and "to $h_0, c_0$" in text and "visits 57" in text
               for text in texts)
    assert "detach(): the state crosses,\nthe gradient stops here" in texts
    assert {"forward: values", "backward: the gradient of $L_{2}$"} <= set(texts)


def _run(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_main(compare_main, argv)
    return exit_info.value.code, capsys.readouterr()


def test_detach_report_with_repeats(corpus_dir, tmp_path, capsys):
    out = tmp_path / "detach"
    code, printed = _run(["detach", "--data", str(corpus_dir), "--out", str(out), "--chunks", "3", "--repeats", "2",
                          *TINY], capsys)
    assert code == 0, printed.err
    report = json.loads((out / "report.json").read_text())
    assert report["repeats"] == 2 and report["bytes_identical_across_repeats"] is True
    for label in ("detach", "no-detach"):
        for row in report["results"][label]:
            assert len(row["step_s_all"]) == 2 and row["step_s_min"] <= row["step_s"] <= row["step_s_max"]
            assert row["graph_bytes"] == row["activation_bytes"] + row["snapshot_bytes"]
    assert {row["snapshot_bytes"] for row in report["results"]["detach"]} == {0}
    assert all(row["snapshot_bytes"] > 0 for row in report["results"]["no-detach"])
    outcomes = {o["loop"]: o for o in report["user_loops"]["outcomes"]}
    assert set(outcomes) == {*USER_LOOPS, FASTLM_ARM}
    text = (out / "report.md").read_text()
    assert all(sentence in text for sentence in report["conclusions"])
    assert "more than 20% above the first window's slowest" in text
    assert "no detach: weight snapshots MiB" in text and "stops at window 2" in text
    assert "differs from the true one by a relative error of" in text
    for heading in ("## Setting and baseline", "## Projected to one epoch", "## What full backpropagation buys",
                    "## What this does not show"):
        assert heading in text
    command = next(line for line in text.splitlines() if line.startswith("    python -m fastlm.compare detach"))
    assert command == ("    python -m fastlm.compare detach --chunks 3 --repeats 2 --eval-tokens 20000 "
                       f"--data {corpus_dir} "
                       "--embed-size 16 --hidden-size 32 --batch-size 4 --seq-len 5 --lr 0.01 --device cpu "
                       "--out NEW_FOLDER")
    losses = report["losses"]
    assert losses[0]["difference"] == losses[1]["difference"] == 0 and report["losses_identical_across_repeats"]
    assert report["projection"]["epoch_windows"] > 3 and report["projection"]["no_detach_bytes_per_window"] > 0
    assert set(report["validation_loss"]) == {"untrained", "detach", "no-detach"}
    for png in ("detach_memory.png", "unrolled_graph.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("flag, value", [("--repeats", "0"), ("--chunks", "0"), ("--eval-tokens", "0")],
                         ids=["repeats", "chunks", "eval-tokens"])
def test_counts_below_one_are_refused_in_one_line(corpus_dir, tmp_path, capsys, flag, value):
    out = tmp_path / "detach"
    code, printed = _run(["detach", "--data", str(corpus_dir), "--out", str(out), flag, value, *TINY], capsys)
    assert code == 2 and printed.err.strip().endswith(f"{flag} must be at least 1, got {value}")
    assert len(printed.err.strip().splitlines()) == 1 and not out.exists()


def test_each_window_reports_the_median_of_its_timings():
    from fastlm.experiments.detach import _summarise

    window = lambda k, seconds: {"chunk": k, "graph_bytes": 8, "step_s": seconds}
    runs = [[window(1, 0.30), window(2, 0.9)], [window(1, 0.10), window(2, 0.5)], [window(1, 0.20), window(2, 0.1)]]
    first, second = _summarise(runs)
    assert (first["step_s"], first["step_s_min"], first["step_s_max"]) == (0.20, 0.10, 0.30)
    assert (second["step_s"], second["step_s_all"]) == (0.5, [0.9, 0.5, 0.1])


def test_growth_below_a_hundredth_of_a_mib_is_given_in_bytes_and_shrinking_is_called_so():
    small = _rows([1, 1.001, 1.002], [0, 0, 0], FLAT)
    sentence = conclusions(small, small, 3)[1]
    assert "bytes per window" in sentence and "0.00 MiB per window" not in sentence, sentence
    steady = _rows([0, 0, 0], [0, 0, 0], FLAT)
    for k, row in enumerate(steady):
        row["graph_bytes"] = row["activation_bytes"] = 1000 * k
    assert "the graph grows by 1,000 bytes per window: 1,000 bytes of activations" in conclusions(steady, steady, 3)[1]
    falling = _rows([3, 2, 1], [0, 0, 0], FLAT)
    assert "the graph shrinks by -1.00 MiB per window" in conclusions(falling, falling, 3)[1]


def test_the_table_shows_cuda_peaks_on_a_gpu():
    from fastlm.experiments.detach_report import _table

    rows = _rows([40, 80], [0, 18], FLAT[:2])
    for k, row in enumerate(rows, 1):
        row["cuda_peak_bytes"] = 100 * k * MiB
    lines = _table({"detach": rows, "no-detach": rows}, cuda=True)
    assert lines[0].endswith("CUDA peak MiB, detach | CUDA peak MiB, no detach |")
    assert lines[1].count("---") == 9 and lines[3].endswith(" 200.0 | 200.0 |")
    assert "CUDA" not in _table({"detach": rows, "no-detach": rows}, cuda=False)[0]


def test_more_chunks_than_the_data_holds_are_refused(corpus_dir, tmp_path, capsys):
    code, printed = _run(["detach", "--data", str(corpus_dir), "--out", str(tmp_path / "d"), "--chunks", "100000",
                          *TINY], capsys)
    assert code == 2 and "windows of 5: use fewer --chunks" in printed.err


def _timed(graph_mib, seconds):
    return [{"chunk": k, "graph_bytes": int(mib * MiB), "step_s": s}
            for k, (mib, s) in enumerate(zip(graph_mib, seconds), 1)]


@pytest.mark.parametrize("no_detach_mib, no_detach_s, windows, available_mib, expected", [
    # bytes 50 + 50·k MiB: 550 at window 10; time 0 + 1·k s: Σ_1..10 k = 55 s; 400 MiB hold windows 1 to 7
    ([100, 150, 200], [1.0, 2.0, 3.0], 10, 400,
     {"last_mib": 550, "per_window_mib": 50, "last_step_s": 10.0, "epoch_s": 55.0, "fits": 7}),
    # least squares through (1, 1), (2, 2.5), (3, 3): slope 1, intercept 1/6; Σ_1..4 (1/6 + k) = 4/6 + 10
    ([100, 150, 200], [1.0, 2.5, 3.0], 4, 10**6,
     {"last_mib": 250, "per_window_mib": 50, "last_step_s": 4 + 1 / 6, "epoch_s": 10 + 4 / 6, "fits": 19999}),
], ids=["exact-line", "noisy-time-least-squares"])
def test_the_projection_is_linear_in_memory_and_quadratic_in_epoch_time(no_detach_mib, no_detach_s, windows,
                                                                         available_mib, expected):
    detach = _timed([40] * 3, [0.5] * 3)
    p = project_epoch(detach, _timed(no_detach_mib, no_detach_s), windows, 10**4 * MiB, available_mib * MiB)
    assert p["no_detach_last_window_bytes"] == pytest.approx(expected["last_mib"] * MiB)
    assert p["no_detach_bytes_per_window"] == pytest.approx(expected["per_window_mib"] * MiB)
    assert p["no_detach_last_step_s"] == pytest.approx(expected["last_step_s"])
    assert p["no_detach_epoch_s"] == pytest.approx(expected["epoch_s"])
    assert p["no_detach_windows_that_fit"] == expected["fits"]
    assert (p["detach_bytes"], p["detach_epoch_s"]) == (40 * MiB, pytest.approx(0.5 * windows))


def test_the_projection_says_when_the_graph_outgrows_the_machine_and_needs_two_windows():
    detach, no_detach = _timed([40] * 3, [0.5] * 3), _timed([100, 150, 200], [1.0, 2.0, 3.0])
    text = "\n".join(projection_lines(project_epoch(detach, no_detach, 10, 1000 * MiB, 400 * MiB), TrainConfig()))
    assert "linear extrapolation from the 3 measured windows to all 10 windows" in text
    assert "| the epoch's steps, in all | 5 s | 55 s |" in text
    assert "550.00 MiB before the last window's backward, against 40.00 MiB with detach" in text
    assert "outgrow that after window 7 of 10" in text and "11 times as long" in text
    roomy = "\n".join(projection_lines(project_epoch(detach, no_detach, 10, None, 10**4 * MiB), TrainConfig()))
    assert "so by this count the epoch would fit" in roomy
    assert project_epoch(detach[:1], no_detach[:1], 10) is None
    assert "pass --chunks 2 or more" in projection_lines(None, TrainConfig())[-1]


def test_the_loss_sentences_say_where_the_arms_part_and_by_how_much():
    rows = lambda losses: [{"chunk": k, "loss": loss} for k, loss in enumerate(losses, 1)]
    losses = loss_differences(rows([5.0, 4.0, 3.0, 2.0]), rows([5.0, 4.0, 2.75, 2.5]))
    assert [row["difference"] for row in losses] == [0.0, 0.0, -0.25, 0.5]
    assert losses[3]["relative"] == 0.25
    report = {"chunks": 4, "validation_tokens_scored": 1234, "repeats": 2, "losses_identical_across_repeats": True}
    text = loss_sentences(losses, {"untrained": 6.0, "detach": 5.0, "no-detach": 4.75}, report)
    assert text[0].startswith("The two arms' training losses are identical at windows 1 to 2 (window 1's gradient")
    assert text[1] == ("From window 3 to 4 they differ by 0.3750 on average (+0.1250 signed), at most +0.5000 at "
                       "window 4 (+25.00% of the detach arm's loss); no detach has the lower loss in 1 of these 2 "
                       "windows.")
    assert "score a loss of 5.0000 with detach and 4.7500 without (difference -0.2500, -5.00%)" in text[2]
    assert "lowered it by 1.0000, and full backpropagation changed the result by -0.2500, -25.0% of that" in text[2]
    assert text[3] == "The training losses were identical in all 2 repeats."
