"""The comparison reports, end to end on the small corpus."""
import collections
import json
import math
import os
import shutil
import signal

import pytest
import torch
import torch.nn.functional as F

from fastlm.cli import run_main
from fastlm.compare import main as compare_main
from fastlm.data import Corpus, batchify
from fastlm.models.lm import load_model
from fastlm.scoring import evaluate, perplexity

TINY = ["--embed-size", "16", "--hidden-size", "32", "--batch-size", "4", "--seq-len", "5", "--lr", "0.01",
        "--eval-batch-size", "3", "--device", "cpu"]


def _run(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_main(compare_main, argv)
    return exit_info.value.code, capsys.readouterr()


def _trained_configs(monkeypatch) -> list:
    import fastlm.experiments.teacher_forcing_runs

    configs, real_train = [], fastlm.experiments.teacher_forcing_runs.train
    monkeypatch.setattr(fastlm.experiments.teacher_forcing_runs, "train",
                        lambda cfg, **resume: (configs.append((cfg, resume)), real_train(cfg, **resume))[1])
    return configs


def test_teacher_forcing_report(corpus_dir, tmp_path, capsys, monkeypatch):
    import matplotlib.axes

    configs = _trained_configs(monkeypatch)
    lines, real_plot = [], matplotlib.axes.Axes.plot
    monkeypatch.setattr(matplotlib.axes.Axes, "plot",
                        lambda ax, *a, **k: (lines.append((k.get("label"), k.get("color"), list(a[0]))),
                                             real_plot(ax, *a, **k))[1])
    out = tmp_path / "tf"
    code, printed = _run(["teacher-forcing", "--data", str(corpus_dir), "--out", str(out), "--steps", "20",
                          "--seeds", "2", "--eval-interval", "4", "--pair", "w1/w2", "--eval-tokens", "60",
                          "--arm", "0", "--arm", "0::sample:1", "--sweep", "0,0.5,1", "--sweep-seeds", "1", *TINY],
                         capsys)
    assert code == 0, printed.err
    # Two seeds per arm unless an arm says fewer, each seed's arms from the same start, all eager in
    # fp32; the sweep's P = 0 and P = 1 are the arms' runs, so only P = 0.5 trains for it.
    assert [(c.seed, c.teacher_forcing, c.free_running_token) for c, _ in configs] == [
        (1234, 1.0, "argmax"), (1235, 1.0, "argmax"), (1234, 0.0, "argmax"), (1235, 0.0, "argmax"),
        (1234, 0.0, "sample"), (1234, 0.5, "argmax")]
    assert {(c.amp, c.cuda_graphs) for c, _ in configs} == {("off", False)}
    report = json.loads((out / "report.json").read_text())
    runs, facts = report["runs"], report["facts"]["free-running"]
    assert list(runs) == [TF, FR, "free-running (sampled)", "P = 0.5"]
    assert list(report["facts"]) == [FR, "free-running (sampled)"]
    # The one-seed arm is compared with the teacher-forced run of its seed alone.
    sampled = report["facts"]["free-running (sampled)"]
    assert sampled["valid"][TF]["values"] == [runs[TF][0]["valid_ppl"]] and sampled["valid_test"] is None
    for arm in (TF, FR):
        assert [r["seed"] for r in runs[arm]] == [1234, 1235]
        assert all([s for s, _ in r["valid"]] == [4 * k for k in range(1, 6)] for r in runs[arm])
        # The reported perplexities are the teacher-forced ones of the saved model, state carried
        # through the split and reset at every window.
        model, dictionary, _ = load_model(out / "runs" / ("teacher-forced" if arm == TF else "P0-argmax") / "seed-1235")
        valid = batchify(Corpus(corpus_dir, dictionary).valid, 3)
        assert runs[arm][1]["valid_ppl"] == pytest.approx(perplexity(evaluate(model, valid, 5)), rel=1e-9)
        assert runs[arm][1]["valid_ppl_reset"] == pytest.approx(perplexity(_loss_reset_per_window(model, valid, 5)),
                                                                rel=1e-6)  # float32 sums against float64
        values = [r["valid_ppl"] for r in runs[arm]]
        assert facts["valid"][arm]["mean"] == pytest.approx((values[0] * values[1]) ** 0.5)  # geometric
        assert (facts["valid"][arm]["min"], facts["valid"][arm]["max"]) == (min(values), max(values))
    # The default target: the level every seed of the worse arm had reached by its last evaluation
    # (when each improved on its first); per seed, the first evaluation at or below it.
    target = facts["target"]
    worse = max((TF, FR), key=lambda arm: runs[arm][0]["valid_ppl"] * runs[arm][1]["valid_ppl"])
    assert target["worse"] == worse
    assert all(r["valid"][-1][1] < r["valid"][0][1] for r in runs[worse])
    assert target["ppl"] == max(runs[worse][0]["valid"][-1][1], runs[worse][1]["valid"][-1][1])
    for arm in (TF, FR):
        assert target["reached"][arm] == [next((step for step, ppl in r["valid"] if ppl <= target["ppl"]), None)
                                          for r in runs[arm]]
    text = (out / "report.md").read_text()
    assert "## Conclusions" in text and "## Baselines" in text and "## What this does not show" in text
    assert "P = 0: every input after the epoch's first word is the model's own prediction" in text
    assert (out / "teacher_forcing.png").read_bytes()[:4] == b"\x89PNG"
    # The curves: one line per seed and arm, each the seed's own validation-sample points.
    curves = [(colour, xs) for _, colour, xs in lines if xs != [0.0, 0.5, 1.0]]  # the rest: the sweep's means
    assert len(curves) == 5 and len({colour for colour, _ in curves}) == 3
    assert all(xs == [4 * k for k in range(1, 6)] for _, xs in curves)
    sweep = report["study"]["sweep"]
    assert [row["p"] for row in sweep] == [0.0, 0.5, 1.0] and sweep[0]["valid_ppl"]["values"] == [
        runs[FR][0]["valid_ppl"]]
    assert len(runs[TF][0]["samples"]) == 3 and runs[TF][1]["samples"] == []
    code, printed = _run(["teacher-forcing", "--data", str(corpus_dir), "--out", str(out), *TINY], capsys)
    assert code == 2 and "is not empty" in printed.err


def _loss_reset_per_window(model, rows, seq_len) -> float:
    """Mean cross-entropy with every window read from a zero state, by hand."""
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, rows.shape[1] - 1, seq_len):
            inputs = rows[:, start:start + seq_len]
            targets = rows[:, start + 1:start + 1 + seq_len]
            inputs = inputs[:, :targets.shape[1]]
            logits, _ = model(inputs, None)
            total += F.cross_entropy(logits.double(), targets.reshape(-1), reduction="sum").item()
            count += targets.numel()
    return total / count


def test_the_unigram_baseline_is_the_word_count_of_train_txt(corpus_dir, tmp_path, capsys, monkeypatch):
    """The report's unigram row against a count done here from the text files alone."""
    _trained_configs(monkeypatch)
    out = tmp_path / "tf"
    code, printed = _run(["teacher-forcing", "--data", str(corpus_dir), "--out", str(out), "--steps", "8",
                          "--seeds", "1", "--pair", "w1/w2", "--eval-tokens", "60", "--arm", "0", "--sweep", "none",
                          *TINY], capsys)
    assert code == 0, printed.err
    baseline = json.loads((out / "report.json").read_text())["study"]["baseline"]
    words = lambda split: [w for line in (corpus_dir / f"{split}.txt").read_text().splitlines()
                           for w in line.split() + ["<eos>"]]
    counts = collections.Counter(words("train"))
    total = sum(counts.values())
    for split in ("valid", "test"):
        ids = words(split)
        width = len(ids) // 3  # evaluate's 3 rows, every token after a row's first a target
        targets = [w for row in range(3) for w in ids[row * width + 1:(row + 1) * width]]
        want = math.exp(-sum(math.log(counts[w] / total) for w in targets) / len(targets))
        assert baseline["unigram"][split] == pytest.approx(want, rel=1e-12)
    # The untrained model scores about the vocabulary size (13 words and <eos>... here 14).
    assert 0.5 * 14 < baseline["untrained"]["valid"][0] < 2 * 14


def test_ptb_unigram_perplexity(ptb_dir):
    from fastlm.data import load_corpus
    from fastlm.experiments.baselines import unigram_loss

    corpus = load_corpus(ptb_dir)
    # A word count of PTB's train.txt predicts its validation text at about 687 (the figure).
    assert perplexity(unigram_loss(corpus.train, batchify(corpus.valid, 10), len(corpus.dictionary))) == (
        pytest.approx(686.92, abs=0.01))


@pytest.mark.parametrize("dim", [16, 128, 1024], ids=lambda d: f"d{d}")
def test_random_vectors_are_at_distance_one_give_or_take_one_over_root_d(dim):
    from fastlm.experiments.baselines import closed_form_distance, distance_spread

    assert closed_form_distance(dim) == (1.0, 1 / math.sqrt(dim))
    # Rows as torch initialises an embedding, N(0, 1): the sampled spread matches the closed form
    # within its sampling error (200,000 pairs of 5,000 rows: the mean to 5 standard errors of
    # independent pairs, the pairs sharing rows; the sd to 2%).
    mean, sd = distance_spread(torch.randn(5000, dim, generator=torch.Generator().manual_seed(dim)), pairs=200_000)
    assert abs(mean - 1) < 5 * (1 / math.sqrt(dim)) / math.sqrt(200_000)
    assert sd == pytest.approx(1 / math.sqrt(dim), rel=0.02)


def test_a_stopped_comparison_goes_on_with_the_runs_it_has(corpus_dir, tmp_path, capsys, monkeypatch):
    from fastlm.training.trainer import Run, train

    flags = ["teacher-forcing", "--data", str(corpus_dir), "--steps", "12", "--seeds", "1", "--pair", "w1/w2",
             "--eval-tokens", "60", "--eval-interval", "4", "--arm", "0", "--sweep", "none", "--runs",
             str(tmp_path / "runs"), *TINY]
    configs = _trained_configs(monkeypatch)
    code, printed = _run([*flags, "--out", str(tmp_path / "first")], capsys)
    assert code == 0, printed.err
    first = json.loads((tmp_path / "first" / "report.json").read_text())["runs"]
    # The free-running run stopped half-way, as Ctrl-C leaves it: a checkpoint at step 6 of 12.
    fr_cfg = configs[1][0]
    shutil.rmtree(fr_cfg.out)
    real_step = Run.train_step

    def interrupted_at_step_6(run, *args):
        real_step(run, *args)
        if run.global_step == 6:
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(Run, "train_step", interrupted_at_step_6)
    assert train(fr_cfg).interrupted
    monkeypatch.setattr(Run, "train_step", real_step)
    configs.clear()
    code, printed = _run([*flags, "--out", str(tmp_path / "second")], capsys)
    assert code == 0, printed.err
    # The finished teacher-forced run is reused, the stopped one resumed, and the report is the same.
    assert [(cfg.teacher_forcing, resume) for cfg, resume in configs] == [(0.0, {"resume": fr_cfg.out})]
    second = json.loads((tmp_path / "second" / "report.json").read_text())["runs"]
    for arm in first:
        assert [r["valid_ppl"] for r in second[arm]] == pytest.approx([r["valid_ppl"] for r in first[arm]], rel=1e-6)
    # A runs folder holding another setting is refused, naming the setting.
    code, printed = _run([*flags, "--out", str(tmp_path / "third"), "--lr", "0.02"], capsys)
    assert code == 2 and "holds a run with another lr (0.01, this experiment's is 0.02)" in printed.err, printed.err


def test_an_interrupted_arm_stops_the_comparison_without_a_report(corpus_dir, tmp_path, capsys, monkeypatch):
    import fastlm.experiments.teacher_forcing_runs
    from fastlm.training.trainer import TrainResult

    # A Ctrl-C inside train() ends that run early and returns normally: it must not be compared as a
    # run of the full budget.
    monkeypatch.setattr(fastlm.experiments.teacher_forcing_runs, "train",
                        lambda cfg: TrainResult(cfg.out, 3, [], None, None, None, interrupted=True))
    out = tmp_path / "tf"
    code, printed = _run(["teacher-forcing", "--data", str(corpus_dir), "--out", str(out), "--steps", "20",
                          "--pair", "w1/w2", "--sweep", "none", *TINY],
                         capsys)
    assert code == 130 and "interrupted" in printed.err and not (out / "report.md").exists()


def test_a_word_never_fed_is_reported_untouched(corpus_dir, tmp_path, capsys):
    from fastlm.models.lm import RNNLM

    # 'zebra' ends train.txt: in the last columns of the last row, never inside the 20 windows trained.
    with open(corpus_dir / "train.txt", "a") as text:
        text.write("w1 zebra\n")
    out = tmp_path / "tf"
    code, printed = _run(["teacher-forcing", "--data", str(corpus_dir), "--out", str(out), "--steps", "20",
                          "--seeds", "1", "--pair", "zebra/w1", "--eval-tokens", "60", "--arm", "0", "--sweep", "none",
                          *TINY], capsys)
    assert code == 0, printed.err
    report = json.loads((out / "report.json").read_text())
    pair = report["facts"][FR]["pairs"]["zebra/w1"]
    assert pair["fed"]["zebra"] == 0 and pair["updated"]["teacher-forced"] == {"zebra": 0, "w1": 1}
    # Independently: the untrained model of that seed, built by hand, has the same row and distance.
    dictionary = load_model(out / "runs" / "teacher-forced" / "seed-1234")[1]
    torch.manual_seed(1234)
    untrained = RNNLM(len(dictionary), 16, 32).embed.weight.detach().double()
    trained = load_model(out / "runs" / "teacher-forced" / "seed-1234")[0].embed.weight.detach().double()
    zebra, w1 = dictionary.word2idx["zebra"], dictionary.word2idx["w1"]
    assert torch.equal(trained[zebra], untrained[zebra]) and not torch.equal(trained[w1], untrained[w1])
    start = 1 - F.cosine_similarity(untrained[zebra], untrained[w1], dim=0).item()
    assert pair["start"]["mean"] == pytest.approx(start, abs=1e-12)
    conclusion = report["conclusions"][FR]
    assert "'zebra' does not occur in the text trained on" in conclusion
    assert "never updated the vector of 'zebra': it is still the untrained one" in conclusion
    assert "With one seed this difference cannot be told from seed-to-seed noise" in conclusion


@pytest.mark.parametrize("extra, message", [
    (["--pair", "w1/w2/w3"], "--pair w1/w2/w3: give two words joined by one slash"),
    (["--pair", "w1/"], "--pair w1/: give two words joined by one slash"),
    (["--pair", "w1/zebra"], "--pair: 'zebra' not in the vocabulary of"),
    (["--target-ppl", "nan"], "--target-ppl must be a finite perplexity above 1, got nan"),
    (["--target-ppl", "0.5"], "--target-ppl must be a finite perplexity above 1, got 0.5"),
    (["--seeds", "0"], "--seeds must be at least 1, got 0"),
    (["--eval-tokens", "0"], "--eval-tokens must be at least 1, got 0"),
    (["--eval-interval", "0"], "--eval-interval must be at least 1, got 0"),
    (["--steps", "50", "--eval-interval", "60"], "--eval-interval 60 leaves no evaluation within --steps 50: lower it"),
    (["--arm", "2"], "error: --arm/--sweep P is a probability in [0, 1], got 2.0"),
    (["--sweep", "0,-1"], "error: --arm/--sweep P is a probability in [0, 1], got -1.0"),
    (["--sweep", "0,half"], "error: argument --sweep: '0,half': give probabilities joined by commas"),
    (["--arm", "1:bogus"], "error: unknown --arm's schedule 'bogus': choose constant, linear"),
    (["--arm", "0:constant:best"], "error: --arm's token must be argmax or sample, got 'best'"),
    (["--arm", "zero"], "error: --arm zero: write P[:schedule[:token[:seeds]]], P a probability"),
    (["--arm", "0::sample:0"], "error: --arm 0::sample:0: its seeds must be at least 1, got 0"),
    (["--seed", str(2**63 - 2), "--seeds", "3"], f"--seeds 3 from --seed {2**63 - 2} reach seed {2**63}, above "
                                                 f"2**63 - 1: use a --seed of at most {2**63 - 3}"),
], ids=["three-words", "one-word", "unknown-word", "target-nan", "target-below-1", "no-seeds", "eval-tokens-0",
        "eval-interval-0", "eval-interval-beyond-steps", "arm-above-1", "sweep-below-0", "sweep-not-a-number",
        "unknown-schedule", "unknown-token", "arm-not-a-number", "arm-without-seeds",
        "seeds-beyond-64-bits"])
def test_teacher_forcing_flags_are_checked_before_any_training(corpus_dir, tmp_path, capsys, monkeypatch, extra,
                                                                message):
    import fastlm.experiments.teacher_forcing_runs

    monkeypatch.setattr(fastlm.experiments.teacher_forcing_runs, "train",
                        lambda cfg: pytest.fail("trained before checking the flags"))
    with pytest.raises(SystemExit) as exit_info:
        run_main(compare_main, ["teacher-forcing", "--data", str(corpus_dir), "--out", str(tmp_path / "r"),
                                "--device", "cpu", *extra])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1 and message in err, err
    if err.endswith("--help)\n"):  # the help that describes the flag
        assert err.endswith("(see python -m fastlm.compare teacher-forcing --help)\n"), err


@pytest.mark.parametrize("experiment", ["teacher-forcing", "detach"])
def test_an_out_that_is_a_file_is_refused(corpus_dir, tmp_path, capsys, experiment):
    out = tmp_path / "notes.md"
    out.write_text("my notes\n")
    code, printed = _run([experiment, "--data", str(corpus_dir), "--out", str(out), *TINY], capsys)
    assert code == 2 and printed.err.count("\n") == 1, printed.err
    assert f"--out {out} is a file: pass a new folder for the report" in printed.err
    assert out.read_text() == "my notes\n"


@pytest.mark.parametrize("experiment, extra, message", [
    ("teacher-forcing", ["--pair", "zebra/w1"], "--pair: 'zebra' not in the vocabulary"),
    ("detach", ["--chunks", "100000"], "--chunks"),
], ids=["unknown-pair-word", "too-many-chunks"])
def test_a_failed_comparison_leaves_no_folder_it_made(corpus_dir, tmp_path, capsys, experiment, extra, message):
    out = tmp_path / "new" / "deeper" / "report"
    code, printed = _run([experiment, "--data", str(corpus_dir), "--out", str(out), *TINY, *extra], capsys)
    assert code == 2 and message in printed.err, printed.err
    assert not (tmp_path / "new").exists(), "the report folder and the parents made for it are gone"


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

    from fastlm.figures import log_axis

    fig, ax = plt.subplots()
    ax.plot([1, 2, 3], [160, 240, 390])
    log_axis(ax)
    fig.canvas.draw()
    low, high = ax.get_ylim()
    labels = [t.get_text() for t, value in zip(ax.get_yticklabels(), ax.get_yticks()) if low <= value <= high]
    plt.close(fig)
    assert labels == ["200"] or len([text for text in labels if text]) >= 2, labels
    assert all(text.strip("$").replace(".", "").isdigit() for text in labels if text)


def test_log_scale_axes_over_many_decades_label_the_powers_of_ten(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from fastlm.figures import log_axis

    fig, ax = plt.subplots()
    ax.plot([1, 2, 3], [250, 3000, 6.6e9])  # a diverging run beside a healthy one
    log_axis(ax)
    fig.canvas.draw()
    low, high = ax.get_ylim()
    labels = [t.get_text() for t, value in zip(ax.get_yticklabels(), ax.get_yticks()) if low <= value <= high]
    offset = ax.yaxis.get_offset_text().get_text()
    plt.close(fig)
    assert len(labels) >= 5 and all("10^{" in text for text in labels) and offset == "", (labels, offset)


TF, FR = "teacher-forced", "free-running"


def facts_of_runs(valid_tf, valid_fr, curves=None, given=None, start=None, tf=None, fr=None, updated=None, fed=100,
           names=None):
    """The facts `_facts` draws from per-seed numbers: validation perplexities, validation-sample curves
    (evaluated every 5 of 50 steps), and distances of one pair, army/taxpayer, with its start."""
    from fastlm.experiments.teacher_forcing_facts import facts_of_runs as facts

    seeds = len(valid_tf)
    start = start or [0.6513] * seeds
    flat = lambda ppl: [(step, ppl) for step in range(5, 55, 5)]
    curves = curves or {TF: [flat(v) for v in valid_tf], FR: [flat(v) for v in valid_fr]}
    distances = {TF: tf or start, FR: fr or start}
    updated = updated or {arm: {"army": seeds, "taxpayer": seeds} for arm in (TF, FR)}
    runs = {arm: [{"valid_ppl": ppl, "test_ppl": ppl, "valid_ppl_reset": ppl, "test_ppl_reset": ppl,
                   "valid": curves[arm][k], "valid_tokens": 20000, "distances": {"army/taxpayer": distances[arm][k]},
                   "output_distances": {"army/taxpayer": distances[arm][k]},
                   "updated": {w: k < updated[arm][w] for w in ("army", "taxpayer")}}
                  for k, ppl in enumerate(valid)] for arm, valid in ((TF, valid_tf), (FR, valid_fr))}
    start = {matrix: [{"army/taxpayer": d} for d in start] for matrix in ("input", "output")}
    return facts(runs, start, [("army", "taxpayer")], {"army": fed, "taxpayer": fed},
                 50, list(range(seeds)), 5, given, names or {TF: TF, FR: FR})


def test_the_t_tests_match_hand_computed_values():
    from fastlm.experiments.teacher_forcing_facts import t_test

    # Welch: means 2 and 5, variances 1: t = −3 / √(2/3), 4 degrees of freedom (critical 2.776).
    welch = t_test([1.0, 2.0, 3.0], [4.0, 5.0, 6.0], paired=False)
    assert welch["t"] == pytest.approx(-3 / (2 / 3) ** 0.5) and welch["df"] == 4 and welch["lower"] == TF
    # Paired differences −1, −0.9, −1.2: t = mean / (sd / √3) with 2 degrees of freedom (critical 4.303).
    paired = t_test([1.0, 2.0, 3.0], [2.0, 2.9, 4.2], paired=True)
    diffs = [-1.0, -0.9, -1.2]
    mean = sum(diffs) / 3
    sd = (sum((d - mean) ** 2 for d in diffs) / 2) ** 0.5
    assert paired["t"] == pytest.approx(mean / (sd / 3 ** 0.5)) and paired["df"] == 2 and paired["lower"] == TF
    # The same numbers unpaired: far apart per seed pair, but within the seeds' spread.
    assert t_test([1.0, 2.0, 3.0], [2.0, 2.9, 4.2], paired=False)["lower"] is None
    # Differences −1, −2, −3: t = −2 / (1 / √3) = −3.46, 2 degrees of freedom: inside the critical 4.303.
    assert t_test([0.0, 0.0, 0.0], [1.0, 2.0, 3.0], paired=True)["lower"] is None
    assert t_test([5.0], [6.0], paired=False) is None
    assert t_test([5.0, 5.0], [5.0, 5.0], paired=False)["lower"] is None


@pytest.mark.parametrize("valid_tf, valid_fr, says, never_says", [
    ([100.0], [100.04], "One seed cannot tell a difference from seed-to-seed noise", "models are better"),
    ([100.0, 101.0, 99.0], [100.04, 99.5, 100.6], "No clear difference at this budget (Welch's t-test on the seeds' "
                                                   "log-perplexities: t = -0.0743, 3 degrees of freedom", "are better"),
    ([100.0, 100.0, 100.0], [100.0, 100.0, 100.0], "No clear difference", "models are better"),
    # Ranges that do not overlap are not enough: two seeds each, t = −2.8 with 1 degree of freedom.
    ([100.0, 101.0], [102.0, 103.0], "Every teacher-forced seed is better than every free-running seed, but with 2 "
                                     "seeds and this spread that is not significant at the 5% level (Welch's t-test "
                                     "on the seeds' log-perplexities: t = -2.83, 1 degree of freedom): run more seeds",
     "models are better"),
    # The default run's case: one arm diverged in some seeds; its geometric mean is not pulled up by one.
    ([239.76, 236.28, 239.13], [3525.13, 98785.71, 1700.8], "8397.97 (1700.80–98785.71) for the free-running ones",
     "models are better"),
    ([100.0, 101.0, 99.0], [110.0, 112.0, 111.0], "The teacher-forced models are better, 9.9% lower (Welch's t-test "
                                                   "on the seeds' log-perplexities: t = -13.4, 3 degrees of freedom, "
                                                   "significant at the 5% level). A likely reason, which this report "
                                                   "does not measure", "No clear"),
    ([110.0, 112.0, 111.0], [100.0, 101.0, 99.0], "The free-running models are better", "likely reason"),
], ids=["one-seed", "within-the-spread", "tie", "two-seeds-apart", "one-arm-diverged", "teacher-forcing-better",
        "free-running-better"])
def test_the_perplexity_conclusion_calls_a_difference_only_beyond_the_seeds_spread(valid_tf, valid_fr, says,
                                                                                    never_says):
    from fastlm.experiments.teacher_forcing_conclusions import _perplexity_sentences

    text = _perplexity_sentences(facts_of_runs(valid_tf, valid_fr))
    assert says in text and never_says not in text, text


def _curve(*ppl):
    return list(zip(range(5, 55, 5), ppl))


FAST = _curve(200, 150, 120, 110, 100, 95, 92, 90, 89, 88)
SLOW = _curve(250, 220, 200, 180, 160, 150, 140, 130, 125, 120)


@pytest.mark.parametrize("curves, given, says", [
    ({TF: [FAST, _curve(190, 150, 118, 112, 100, 96, 92, 90, 89, 88), _curve(205, 150, 121, 109, 100, 95, 92, 91,
                                                                               89, 88)],
      FR: [SLOW, _curve(250, 220, 200, 180, 160, 150, 140, 130, 125, 118), SLOW]}, None,
     ["Every free-running model had reached", "of 120.00 by its last evaluation (step 50; the highest of their "
      "last points); that level was first reached at step 15, 15, 20 by the teacher-forced models and 50, 50, 50 by "
      "the free-running ones (per seed; the validation sample, 20,000 tokens, evaluated every 5 steps, so each step "
      "is known to within 5).", "The teacher-forced models got there sooner (Welch's t-test"]),
    ({TF: [FAST, SLOW, FAST], FR: [SLOW, FAST, SLOW]}, 120.0,
     ["Validation-sample perplexity 120.00 (--target-ppl) was first reached at step 15, 50, 15 by the",
      "not separated at this resolution"]),
    ({TF: [FAST] * 3, FR: [SLOW, SLOW, _curve(*[130] * 10)]}, 120.0,
     ["50, 50, not reached by the free-running ones", "Not every seed reached it, so no difference in speed is "
                                                     "called."]),
    ({TF: [FAST] * 3, FR: [_curve(*range(100, 200, 10)), SLOW, SLOW]}, None,
     ["Not every free-running model ended below its first validation-sample perplexity (first → last evaluation, "
      "seed 0: 100.00 → 190.00; seed 1: 250.00 → 120.00; seed 2: 250.00 → 120.00), so there is no level they all "
      "worked towards"]),
], ids=["sooner", "not-separated", "not-every-seed", "a-worse-seed-never-improved"])
def test_steps_to_the_target_are_per_seed_with_their_resolution(curves, given, says):
    from fastlm.experiments.teacher_forcing_conclusions import _target_sentences

    text = _target_sentences(facts_of_runs([90.0, 91.0, 92.0], [120.0, 121.0, 122.0], curves=curves, given=given))
    assert all(part in text for part in says), text


def test_one_seed_times_the_target_without_a_test():
    from fastlm.experiments.teacher_forcing_conclusions import _target_sentences

    text = _target_sentences(facts_of_runs([90.0], [120.0], curves={TF: [FAST], FR: [SLOW]}))
    assert text == ("The free-running model had reached a validation-sample perplexity of 120.00 by its last "
                    "evaluation (step 50); that level was first reached at step 15 by the teacher-forced model and 50 "
                    "by the free-running one (the validation sample, 20,000 tokens, evaluated every 5 steps, so each "
                    "step is known to within 5).")


def test_curves_evaluated_at_different_steps_are_refused():
    from fastlm.errors import TrainingError

    with pytest.raises(TrainingError, match="not evaluated at the same steps"):
        facts_of_runs([90.0, 91.0], [120.0, 121.0], curves={TF: [FAST, FAST[:-1]], FR: [SLOW, SLOW]})


@pytest.mark.parametrize("valid_tf, valid_fr, says", [
    ([100.0, math.inf, 99.0], [110.0, 112.0, 111.0], "1 of the 3 teacher-forced seeds ended with a non-finite "
                                                     "perplexity (diverged): no test is made."),
    ([100.0, 101.0, 99.0], [110.0, math.nan, math.inf], "2 of the 3 free-running seeds ended with a non-finite"),
    ([100.0, 100.0, 100.0], [100.0 + 1e-9, 100.0 + 1e-9, 100.0 + 1e-9], "equal to the precision printed"),
], ids=["one-diverged", "two-diverged", "apart-by-rounding"])
def test_diverged_or_identical_arms_are_said_so_and_not_tested(valid_tf, valid_fr, says):
    from fastlm.experiments.teacher_forcing_conclusions import conclusion_of

    text = conclusion_of(facts_of_runs(valid_tf, valid_fr))
    assert says in text and "better" not in text and "sooner" not in text, text


@pytest.mark.parametrize("kwargs, says, never_says", [
    # The short run of the issue: an embedding row never updated keeps the untrained distance.
    (dict(valid=1, tf=[0.6513107131880383], fr=[0.6620], start=[0.6513107131880383], fed=0,
          updated={TF: {"army": 0, "taxpayer": 0}, FR: {"army": 1, "taxpayer": 1}}),
     ["0.651 before training", "(change +0.000)", "'army' does not occur in the text trained on",
      "The teacher-forced model never updated the vector of 'army': it is still the untrained one",
      "With one seed this difference cannot be told"], "closer ("),
    # Distances start far apart across seeds; each seed's change is what counts (paired).
    (dict(valid=3, start=[0.45, 0.65, 0.85], tf=[0.40, 0.61, 0.79], fr=[0.46, 0.66, 0.86]),
     ["The teacher-forced models end with them closer than the free-running ones do (a paired t-test"],
     "Neither"),
    # Untouched rows in one arm, moved apart in the other: the untouched arm is not credited as closer
    # unless the other moved away beyond the spread; here it moved away consistently.
    (dict(valid=3, start=[0.65, 0.66, 0.64], tf=[0.65, 0.66, 0.64], fr=[0.70, 0.72, 0.69],
          updated={TF: {"army": 0, "taxpayer": 0}, FR: {"army": 3, "taxpayer": 3}}),
     ["never updated the vector of 'army'", "(change +0.000)", "(change +0.053)",
      "Only the free-running models moved the pair, apart (a paired t-test", "the teacher-forced ones left it where "
                                                                               "it started"], "end with them closer"),
    (dict(valid=3, start=[0.65, 0.66, 0.64], tf=[0.60, 0.67, 0.61], fr=[0.615, 0.63, 0.64], fed=3,
          updated={TF: {"army": 3, "taxpayer": 3}, FR: {"army": 2, "taxpayer": 3}}),
     ["Neither places them clearly closer (a paired t-test", "'army' occurs only 3 times",
      "The free-running models updated the vector of 'army' in only 2 of 3 seeds"], "end with them closer"),
    (dict(valid=3, start=[0.65, 0.66, 0.64], updated={TF: {"army": 0, "taxpayer": 0}, FR: {"army": 0, "taxpayer": 0}}),
     ["Neither way of training moved this pair: there is nothing to compare"], "closer"),
], ids=["untouched-one-seed", "paired-changes", "untouched-against-moved", "within-the-spread-and-rare", "unmoved"])
def test_the_distance_conclusion_shows_the_start_and_untouched_rows(kwargs, says, never_says):
    from fastlm.experiments.teacher_forcing_conclusions import _distance_sentences

    seeds = kwargs.pop("valid")
    text = _distance_sentences(facts_of_runs([100.0] * seeds, [101.0] * seeds, **kwargs), "army/taxpayer")
    assert all(part in text for part in says) and never_says not in text, text


def test_a_mixed_second_arm_is_named_by_its_probability():
    from fastlm.experiments.teacher_forcing_conclusions import _perplexity_sentences

    names = {TF: TF, FR: "P = 0.5"}
    text = _perplexity_sentences(facts_of_runs([100.0, 101.0, 99.0], [110.0, 112.0, 111.0], names=names))
    assert "111.00 (110.00–112.00) for the P = 0.5 ones" in text and "likely reason" not in text, text


@pytest.mark.parametrize("specs, want", [
    (["0", "0::argmax:2"], [("teacher-forced", None), ("free-running", None)]),
    (["0::sample:2", "0::sample:3"], [("teacher-forced", None), ("free-running (sampled)", 3)]),
    (["1::sample", "1:linear", "0.5:inverse-sigmoid"],
     [("teacher-forced", None), ("scheduled sampling (linear)", None),
      ("scheduled sampling (inverse-sigmoid, from P 0.5)", None)]),
], ids=["same-setting-all-seeds-win", "most-seeds-kept", "tf-whatever-token-and-distinct-schedules"])
def test_arms_are_distinct_settings_with_distinct_names(specs, want):
    from fastlm.experiments.teacher_forcing import _distinct
    from fastlm.experiments.teacher_forcing_runs import Arm

    arms = _distinct([Arm.parse(spec) for spec in specs])
    assert [(arm.name, arm.seeds) for arm in arms] == want


def test_a_dead_run_is_removed_but_a_live_one_is_not(tmp_path):
    import fcntl

    from fastlm.errors import TrainingError
    from fastlm.experiments.teacher_forcing_runs import _remove_dead_run

    folder = tmp_path / "seed-1234"
    folder.mkdir()
    (folder / "metrics.jsonl").write_text("{}\n")
    with open(folder / ".lock", "a+") as held:  # a training that has not reached its first checkpoint
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(TrainingError, match="is in use by another training"):
            _remove_dead_run(folder)
        assert (folder / "metrics.jsonl").exists()
    _remove_dead_run(folder)  # its process gone, the lock with it
    assert not folder.exists()


@pytest.mark.parametrize("means, says", [
    ({0.0: 1000.0, 0.5: 250.0, 1.0: 172.0}, "P = 0, 0.5 end more than 5% above teacher forcing."),
    ({0.5: 175.0, 0.75: 173.0, 1.0: 172.0}, "Every P ends within 5% of teacher forcing."),
    ({0.0: 1000.0, 0.9: 175.0, 1.0: 172.0}, "P = 0 end more than 5% above teacher forcing; P = 0.9 within 5% of it."),
    ({1.0: 172.0}, "P = 1: 172.00; the unigram: 686.92."),
], ids=["all-worse", "all-close", "mixed", "teacher-forcing-alone"])
def test_the_sweep_sentence_says_where_feeding_own_words_stops_hurting(means, says):
    from fastlm.experiments.teacher_forcing_conclusions import sweep_sentence

    sweep = [{"p": p, "valid_ppl": {"mean": mean}} for p, mean in means.items()]
    text = sweep_sentence(sweep, 686.92)
    assert text.endswith(says), text
