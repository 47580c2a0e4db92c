"""The comparison reports, end to end on the small corpus."""
import json

import pytest

from fastlm.cli import run_main
from fastlm.compare import main as compare_main
from fastlm.model import load_model
from fastlm.data import Corpus, batchify
from fastlm.trainer import evaluate, perplexity

TINY = ["--embed-size", "16", "--hidden-size", "32", "--batch-size", "4", "--seq-len", "5", "--lr", "0.01",
        "--eval-batch-size", "3", "--device", "cpu"]


def _run(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_main(compare_main, argv)
    return exit_info.value.code, capsys.readouterr()


def test_teacher_forcing_report(corpus_dir, tmp_path, capsys):
    out = tmp_path / "tf"
    code, printed = _run(["teacher-forcing", "--data", str(corpus_dir), "--out", str(out), "--steps", "80",
                          "--pair", "w1/w2", "--eval-tokens", "60", *TINY], capsys)
    assert code == 0, printed.err
    report = json.loads((out / "report.json").read_text())
    tf, fr = report["runs"]["teacher-forced"], report["runs"]["free-running"]
    assert (tf["teacher_forcing"], fr["teacher_forcing"]) == (1.0, 0.0)
    assert [s for s, _ in tf["valid"]] == [8 * k for k in range(1, 11)] == [s for s, _ in fr["valid"]]
    # The reported perplexity is the teacher-forced one of the saved model.
    model, dictionary, _ = load_model(out / "free-running")
    valid = batchify(Corpus(corpus_dir, dictionary).valid, 3)
    assert fr["valid_ppl"] == pytest.approx(perplexity(evaluate(model, valid, 5)), rel=1e-9)
    better = "teacher-forced" if tf["valid_ppl"] <= fr["valid_ppl"] else "free-running"
    assert report["conclusion"].startswith(f"On teacher-forced validation perplexity the {better} model is better")
    assert set(tf["distances"]) == {"w1/w2"} and len(tf["samples"]) == 3
    assert (out / "teacher_forcing.png").read_bytes()[:4] == b"\x89PNG"
    text = (out / "report.md").read_text()
    assert "| validation perplexity |" in text and "## Conclusion" in text
    code, printed = _run(["teacher-forcing", "--data", str(corpus_dir), "--out", str(out), *TINY], capsys)
    assert code == 2 and "is not empty" in printed.err


def test_detach_report(corpus_dir, tmp_path, capsys):
    out = tmp_path / "detach"
    code, printed = _run(["detach", "--data", str(corpus_dir), "--out", str(out), "--chunks", "4", *TINY], capsys)
    assert code == 0, printed.err
    report = json.loads((out / "report.json").read_text())
    with_detach = [m["graph_bytes"] for m in report["results"]["detach"]]
    without = [m["graph_bytes"] for m in report["results"]["no-detach"]]
    assert len(set(with_detach)) == 1 and without == sorted(without) and without[-1] > 3 * with_detach[0]
    assert report["nodes_without"] > report["nodes_with_detach"]
    for png in ("detach_memory.png", "unrolled_graph.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("extra, message", [
    (["--pair", "w1/w2/w3"], "--pair w1/w2/w3: give two words joined by one slash"),
    (["--pair", "w1/"], "--pair w1/: give two words joined by one slash"),
    (["--pair", "w1/zebra"], "--pair: 'zebra' not in the vocabulary of"),
    (["--target-ppl", "nan"], "--target-ppl must be a finite perplexity above 1, got nan"),
    (["--target-ppl", "0.5"], "--target-ppl must be a finite perplexity above 1, got 0.5"),
], ids=["three-words", "one-word", "unknown-word", "target-nan", "target-below-1"])
def test_teacher_forcing_flags_are_checked_before_any_training(corpus_dir, tmp_path, capsys, monkeypatch, extra,
                                                                message):
    import fastlm.comparison

    monkeypatch.setattr(fastlm.comparison, "train", lambda cfg: pytest.fail("trained before checking the flags"))
    with pytest.raises(SystemExit) as exit_info:
        run_main(compare_main, ["teacher-forcing", "--data", str(corpus_dir), "--out", str(tmp_path / "r"),
                                "--device", "cpu", *extra])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and message in err


def test_evaluate_refuses_a_batch_that_scores_nothing_or_is_not_positive(tiny_run, capsys):
    from fastlm.evaluate import main as evaluate_main

    for batch, message in (("0", "--batch-size must be a positive integer, got 0"),
                           ("200", "tokens leave nothing to score in 200 rows (each needs at least 2): use a smaller "
                                   "--batch-size")):
        with pytest.raises(SystemExit) as exit_info:
            run_main(evaluate_main, ["--checkpoint", str(tiny_run), "--batch-size", batch, "--device", "cpu"])
        assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_log_scale_axes_label_several_ticks_over_a_narrow_range(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from fastlm.plots import log_axis

    fig, ax = plt.subplots()
    ax.plot([1, 2, 3], [160, 240, 390])
    log_axis(ax)
    fig.canvas.draw()
    low, high = ax.get_ylim()
    labels = [t.get_text() for t, value in zip(ax.get_yticklabels(), ax.get_yticks()) if low <= value <= high]
    plt.close(fig)
    assert labels == ["200"] or len([text for text in labels if text]) >= 2, labels
    assert all(text.strip("$").replace(".", "").isdigit() for text in labels if text)


def test_the_conclusion_calls_equal_distances_equal():
    from fastlm.comparison import _conclusion

    run = {"valid_ppl": 100.0, "test_ppl": 99.0, "steps_to_target": 10, "distances": {"army/taxpayer": 0.93741}}
    other = {**run, "valid_ppl": 100.5, "distances": {"army/taxpayer": 0.93708}}
    text = _conclusion(run, other, 100.5, 50)
    assert "is 0.937 in both models (equal to three digits)" in text and "places them closer" not in text
