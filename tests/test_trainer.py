"""Training: learning, exact resume, stopping, and the one-line errors of the entry points."""
import json
import math
import os
import signal
import subprocess
import sys
import time
import types
from dataclasses import replace

import pytest
import torch
from torch import nn

from fastlm import device
from fastlm.checkpoint import load_checkpoint
from fastlm.cli import run_main
from fastlm.config import TrainConfig
from fastlm.data import Corpus, batchify
from fastlm.errors import DivergedError
from fastlm.evaluate import main as evaluate_main
from fastlm.models.lm import RNNLM
from fastlm.scoring import evaluate
from fastlm.train import main as train_main
from fastlm.training import rundir, step, trainer
from fastlm.training.step import EvalForward
from fastlm.training.trainer import train


def tiny(corpus_dir, out, **changes) -> TrainConfig:
    cfg = TrainConfig(data=str(corpus_dir), embed_size=16, hidden_size=32, epochs=2, batch_size=4, seq_len=5,
                      lr=0.01, log_interval=1, eval_batch_size=3, out=str(out), device="cpu")
    return replace(cfg, **changes)


def test_training_learns_the_corpus(corpus_dir, tmp_path):
    result = train(tiny(corpus_dir, tmp_path / "run", epochs=3))
    vocab_size = len(Corpus(corpus_dir).dictionary)
    assert math.log(result.valid_ppl) < 0.5 * math.log(vocab_size), "validation loss not well below ln V"
    assert sum(result.train_losses[-20:]) / 20 < 0.5 * sum(result.train_losses[:5]) / 5
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert {r["split"] for r in records} == {"train", "valid", "test"}
    assert [r["epoch"] for r in records if r["split"] == "valid"] == [1, 2, 3]
    assert result.test_ppl is not None and result.best_test_ppl is not None


@pytest.mark.parametrize("unit", ["AMX_BF16", "AVX512_BF16", None], ids=["amx-cpu", "avx512-bf16-cpu", "plain-cpu"])
def test_cpu_default_stays_fp32_and_points_at_bf16_where_units_exist(corpus_dir, tmp_path, monkeypatch, capsys, unit):
    monkeypatch.setattr(device, "cpu_bf16_unit", lambda: unit)
    amp_dtypes = []

    class RecordingStep(step.TrainStep):
        def __init__(self, model, optimizer, batch_size, seq_len, clip, amp_dtype, *rest, **options):
            amp_dtypes.append(amp_dtype)
            super().__init__(model, optimizer, batch_size, seq_len, clip, amp_dtype, *rest, **options)

    monkeypatch.setattr(step, "TrainStep", RecordingStep)
    train(tiny(corpus_dir, tmp_path / "run", epochs=1))
    assert amp_dtypes == [None], "the CPU default must train in float32 (no autocast)"
    assert ("--amp bf16" in capsys.readouterr().out) == (unit is not None)


def test_training_time_leaves_out_checkpoint_writes(corpus_dir, tmp_path, monkeypatch, capsys):
    # Every epoch writes two checkpoints; on the trainer's clock each write takes an hour.
    hour, real_save, writes = 3600.0, rundir.save_checkpoint, []
    clock = types.SimpleNamespace(offset=0.0)

    def slow_save(obj, path):
        clock.offset += hour
        writes.append(path)
        real_save(obj, path)

    monkeypatch.setattr(rundir, "save_checkpoint", slow_save)
    result = train(tiny(corpus_dir, tmp_path / "run", epochs=2), clock=lambda: time.perf_counter() + clock.offset)
    assert len(writes) == 4
    assert 0 < result.train_seconds < hour
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    epoch_ends = [r["time"] for r in records if r["split"] == "valid"]
    assert 0 < epoch_ends[0] < epoch_ends[1] <= result.train_seconds
    assert (f"Training time: {result.train_seconds:.1f} s for {result.global_step} steps and 2 validation passes "
            f"({4 * hour:.1f} s of checkpoint writes not counted)") in capsys.readouterr().out


@pytest.mark.parametrize("feeding", [
    {},
    # Scheduled sampling draws coin flips and words from the RNG, so this also checks its saved state.
    {"teacher_forcing": 0.7, "teacher_forcing_schedule": "linear", "free_running_token": "sample"},
], ids=["teacher-forcing", "scheduled-sampling"])
def test_resume_gives_the_same_losses_as_a_straight_run(corpus_dir, tmp_path, feeding):
    # Epochs of 132 steps: the split at 150 steps lands inside the second epoch, the end in the third.
    straight = train(tiny(corpus_dir, tmp_path / "straight", epochs=3, max_steps=300, **feeding))
    first = train(tiny(corpus_dir, tmp_path / "split", epochs=3, max_steps=150, **feeding))
    ckpt = load_checkpoint(tmp_path / "split")
    assert (ckpt["global_step"], ckpt["epoch"]) == (150, 1) and ckpt["state"] is not None
    second = train(TrainConfig(), resume=str(tmp_path / "split"), overrides={"max_steps": 300})
    assert second.global_step == 300
    assert first.train_losses + second.train_losses == straight.train_losses


def test_resume_in_float16_restores_the_loss_scale(corpus_dir, tmp_path, monkeypatch, cpu_with_16_bit_units):
    # A scaler that doubles its scale every 10 clean steps overflows again and again: which steps it
    # skips, and so every later loss, depends on the scale and growth count the checkpoint carries.
    scalers, real = [], torch.amp.GradScaler

    def eager_scaler(device):
        scalers.append(real(device, growth_interval=10))
        return scalers[-1]

    monkeypatch.setattr(torch.amp, "GradScaler", eager_scaler)
    straight = train(tiny(corpus_dir, tmp_path / "straight", epochs=3, max_steps=300, amp="fp16"))
    first = train(tiny(corpus_dir, tmp_path / "split", epochs=3, max_steps=150, amp="fp16"))
    at_split = scalers[-1].state_dict()
    assert at_split["scale"] not in (65536.0, None), "the test needs a scale that moved away from its start"
    resumed = {}
    real_step = step.TrainStep.step

    def note_scale_first(self, inputs, targets):
        resumed.setdefault("scale", self.scaler.get_scale())
        return real_step(self, inputs, targets)

    monkeypatch.setattr(step.TrainStep, "step", note_scale_first)
    second = train(TrainConfig(), resume=str(tmp_path / "split"), overrides={"max_steps": 300})
    assert resumed["scale"] == at_split["scale"]
    assert first.train_losses + second.train_losses == straight.train_losses


def test_free_running_training_learns_and_logs_the_schedule(corpus_dir, tmp_path):
    result = train(tiny(corpus_dir, tmp_path / "run", epochs=2, teacher_forcing=0.5,
                        teacher_forcing_schedule="linear", log_interval=33, eval_interval=66, eval_tokens=60))
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    p = [r["teacher_forcing"] for r in records if r["split"] == "train"]
    assert p[0] < 0.5 and p == sorted(p, reverse=True) and p[-1] < 0.01
    interim = [r for r in records if r["split"] == "valid" and "tokens" in r]
    assert [r["global_step"] for r in interim] == [66, 132, 198, 264] and interim[0]["tokens"] == 60
    assert math.log(result.valid_ppl) < 0.75 * math.log(14)  # far below the 14 words of the uniform guess


def test_free_running_feeds_each_windows_last_prediction_into_the_next(corpus_dir, tmp_path, monkeypatch):
    calls, real_step = [], trainer.free_running_step

    def recorded(*args, **kwargs):
        loss, state, predicted = real_step(*args, **kwargs)
        calls.append((args[-1], predicted))
        return loss, state, predicted

    monkeypatch.setattr(trainer, "free_running_step", recorded)
    train(tiny(corpus_dir, tmp_path / "run", teacher_forcing=0.0, max_steps=140))  # 132 steps per epoch
    assert len(calls) == 140
    for k, (fed_back, _) in enumerate(calls):
        if k in (0, 132):  # an epoch starts from the true word
            assert fed_back is None, k
        else:
            assert torch.equal(fed_back, calls[k - 1][1]), k


def test_checkpoint_holds_everything_and_loads_weights_only(corpus_dir, tmp_path):
    train(tiny(corpus_dir, tmp_path / "run", max_steps=7))
    ckpt = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert {"model", "optimizer", "config", "vocab", "epoch", "step", "global_step", "state", "rng",
            "scaler"} <= set(ckpt)
    assert ckpt["scaler"] is None, "float32 training has no loss scaler"
    assert ckpt["step"] == 7 and ckpt["vocab"] == Corpus(corpus_dir).dictionary.idx2word
    assert ckpt["state"][0].shape == (1, 4, 32)


def test_evaluate_carries_the_state_like_one_pass_over_each_row(corpus_dir):
    corpus = Corpus(corpus_dir)
    model = RNNLM(len(corpus.dictionary), 8, 16).double()
    rows = batchify(corpus.valid, 3)
    # Reference: nn.LSTM over each whole row at once, float64, loss computed by hand.
    classic = nn.LSTM(8, 16, batch_first=True).double()
    classic.load_state_dict(model.lstm.state_dict())
    with torch.no_grad():
        out, _ = classic(model.embed(rows[:, :-1]))
        log_probs = torch.log_softmax(model.linear(out), dim=-1)
        expected = -log_probs.gather(-1, rows[:, 1:, None]).mean().item()
    assert abs(evaluate(model, rows, seq_len=7) - expected) < 1e-10


def test_one_forward_serves_every_evaluation_of_its_shape(corpus_dir):
    # The trainer builds (and on a GPU captures) one forward for validation and test alike: each call
    # must start from a zero state and a zero sum, whatever the call before it left behind.
    corpus = Corpus(corpus_dir)
    torch.manual_seed(0)
    model = RNNLM(len(corpus.dictionary), 8, 16)
    valid, test = batchify(corpus.valid, 3), batchify(corpus.test, 3)
    forward = EvalForward(model, 3, 7)
    for split in (valid, test, valid):
        assert evaluate(model, split, 7, forward=forward) == evaluate(model, split, 7)
    with pytest.raises(ValueError, match=r"built for windows \(3, 7\)"):
        evaluate(model, batchify(corpus.valid, 2), 7, forward=forward)


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(corpus_dir, tmp_path, monkeypatch):
    cfg = tiny(corpus_dir, tmp_path / "run", epochs=2)
    real = torch.nn.functional.cross_entropy
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        loss = real(*args, **kwargs)
        return loss * math.nan if calls["n"] == 200 else loss  # in the second epoch

    monkeypatch.setattr(torch.nn.functional, "cross_entropy", poisoned)
    with pytest.raises(DivergedError, match=r"training loss became nan by step \d+; stopped without saving: "
                                            r".*checkpoint.pt keeps step 132 \(try a lower --lr\)"):
        train(cfg)
    ckpt = load_checkpoint(tmp_path / "run")
    assert ckpt["epoch"] == 1 and ckpt["step"] == 0
    assert all(torch.isfinite(p).all() for p in ckpt["model"].values())


def _cli(main, argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_main(main, argv)
    return exit_info.value.code, capsys.readouterr()


@pytest.mark.parametrize(
    "extra, message",
    [
        pytest.param(["--seq-len", "5000"], "seq_len 5000 is too long for rows of", id="seq-len-too-long"),
        pytest.param(["--batch-size", "0"], "--batch-size must be a positive integer, got 0", id="batch-size-0"),
        pytest.param(["--backend", "cudnn"], "unknown LSTM backend 'cudnn'", id="unknown-backend"),
        pytest.param(["--device", "tpu"], "unknown device 'tpu'", id="unknown-device"),
        pytest.param(["--device", "meta"], "fastlm runs on cpu or cuda, not meta", id="device-meta"),
        pytest.param(["--device", "xpu"], "fastlm runs on cpu or cuda, not xpu", id="device-xpu"),
        pytest.param(["--seed", str(10**24)], "--seed must be between 0 and 2**63 - 1", id="seed-too-big"),
        pytest.param(["--lr", "inf"], "--lr and --clip must be positive and finite", id="lr-inf"),
        pytest.param(["--hidden-size", "300000"], "training this model needs at least 5",
                     id="model-too-big-for-memory"),
        pytest.param(["--num-layers", "100000"], "use a smaller --hidden-size, --embed-size, --num-layers,",
                     id="too-many-layers"),
        pytest.param(["--eval-batch-size", "400"], "valid.txt's 262 tokens cannot fill 400 rows: use a smaller "
                     "--eval-batch-size", id="eval-batch-beyond-the-split"),
        pytest.param(["--eval-batch-size", "200"], "valid.txt's 262 tokens leave nothing to score in 200 rows",
                     id="eval-batch-leaves-nothing-to-score"),
    ],
)
def test_train_bad_input_is_one_line_and_exit_2(corpus_dir, tmp_path, capsys, extra, message):
    code, out = _cli(train_main, ["--data", str(corpus_dir), "--out", str(tmp_path / "run"), *extra], capsys)
    assert code == 2
    assert out.err.startswith("error: ") and out.err.count("\n") == 1 and message in out.err


def test_train_missing_and_empty_data(tmp_path, capsys):
    code, out = _cli(train_main, ["--data", str(tmp_path / "none")], capsys)
    assert code == 2 and "lacks train.txt, valid.txt, test.txt" in out.err
    (tmp_path / "empty").mkdir()
    for split in ("train", "valid", "test"):
        (tmp_path / "empty" / f"{split}.txt").write_text("")
    code, out = _cli(train_main, ["--data", str(tmp_path / "empty")], capsys)
    assert code == 2 and "train.txt is empty" in out.err


def test_resume_refuses_to_change_the_model(corpus_dir, tmp_path, capsys):
    train(tiny(corpus_dir, tmp_path / "run", max_steps=3))
    code, out = _cli(train_main, ["--resume", str(tmp_path / "run"), "--hidden-size", "64"], capsys)
    assert code == 2 and "--hidden-size 64 differs from the checkpoint's 32" in out.err


def test_train_then_evaluate_from_the_command_line(corpus_dir, tmp_path, capsys):
    run = tmp_path / "run"
    argv = ["--data", str(corpus_dir), "--out", str(run), "--embed-size", "16", "--hidden-size", "32",
            "--epochs", "1", "--batch-size", "4", "--seq-len", "5", "--log-interval", "50", "--device", "cpu"]
    code, out = _cli(train_main, argv, capsys)
    assert code == 0
    assert "Epoch [1/1], Step[50/132], Loss: " in out.out and "Test perplexity (last weights" in out.out
    code, out = _cli(evaluate_main, ["--checkpoint", str(run), "--split", "test", "--device", "cpu"], capsys)
    assert code == 0 and out.out.startswith("test perplexity: ")
    test_ppl = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()][-2]["ppl"]
    assert f"{test_ppl:.2f}" in out.out
    code, out = _cli(evaluate_main, ["--checkpoint", str(tmp_path / "nothing")], capsys)
    assert code == 2 and "no checkpoint at" in out.err


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_ctrl_c_or_sigterm_saves_a_checkpoint_and_the_run_resumes(corpus_dir, tmp_path, signum):
    run = tmp_path / "run"
    argv = ["--data", str(corpus_dir), "--out", str(run), "--embed-size", "16", "--hidden-size", "32",
            "--epochs", "1000", "--batch-size", "4", "--seq-len", "5", "--log-interval", "10", "--device", "cpu"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "fastlm.train", *argv], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (run / "metrics.jsonl").exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert f"; saved {run / 'checkpoint.pt'}. Continue with: python -m fastlm.train --resume {run}" in out
    ckpt = load_checkpoint(run)
    assert ckpt["global_step"] >= 10
    resumed = train(TrainConfig(), resume=str(run), overrides={"max_steps": ckpt["global_step"] + 5})
    assert resumed.global_step == ckpt["global_step"] + 5


def test_a_plain_text_corpus_trains_end_to_end(tmp_path, capsys):
    # Own text: no <unk> of its own, words in valid/test that train never has, a vocabulary cap.
    from fastlm.sample import main as sample_main

    corpus = tmp_path / "mine"
    corpus.mkdir()
    sentences = ["the cat sat on the mat", "the dog sat on the log", "a cat and a dog met"] * 40
    (corpus / "train.txt").write_text("\n".join(sentences) + "\n")
    (corpus / "valid.txt").write_text("the zebra sat on the mat\nthe cat met a yak\n" * 5)
    (corpus / "test.txt").write_text("a dog sat on the rug\n" * 5)
    run = tmp_path / "run"
    code, out = _cli(train_main, ["--data", str(corpus), "--out", str(run), "--vocab-size", "8", "--embed-size", "8",
                                  "--hidden-size", "16", "--epochs", "2", "--batch-size", "4", "--seq-len", "5",
                                  "--eval-batch-size", "2", "--device", "cpu"], capsys)
    assert code == 0, out.err
    vocab = load_checkpoint(run)["vocab"]
    assert len(vocab) == 8 and vocab[-1] == "<unk>" and {"the", "cat", "sat", "on"} <= set(vocab)
    assert "fastlm: 8 words" in out.out
    code, out = _cli(evaluate_main, ["--checkpoint", str(run), "--split", "valid", "--device", "cpu"], capsys)
    assert code == 0 and out.out.startswith("valid perplexity: ")
    valid_words = [w for line in (corpus / "valid.txt").read_text().splitlines() for w in line.split() + ["<eos>"]]
    unknown = sum(w not in vocab for w in valid_words) / len(valid_words)  # zebra, yak and the words cut off
    assert f"{unknown:.2%} out of vocabulary" in out.out
    assert out.err.startswith(f"warning: {unknown:.1%} of the valid words are not in the model's vocabulary")
    code, out = _cli(sample_main, ["--checkpoint", str(run), "--prompt", "the cat", "--seed", "1", "--device", "cpu",
                                   "--out", str(tmp_path / "s.txt")], capsys)
    assert code == 0 and (tmp_path / "s.txt").read_text().startswith("the cat")


def test_a_run_speaks_at_once_and_says_where_it_stands(corpus_dir, tmp_path, capsys):
    run = tmp_path / "run"
    train(tiny(corpus_dir, run, max_steps=30, log_interval=10))
    out = capsys.readouterr().out.splitlines()
    first = next(i for i, line in enumerate(out) if line.startswith("First step done in "))
    assert first < next(i for i, line in enumerate(out) if line.startswith("Epoch [1/2], Step[10/132]"))
    assert "the 30 steps of this run take " in out[first] and "the first log line comes at step 10" in out[first]
    assert all(" s/step, step " in line and ", ETA " in line for line in out if line.startswith("Epoch [1/2], Step["))
    assert "step 30/30, ETA 0m00s" in out[-2]

    saved = (run / "checkpoint.pt").read_bytes()
    train(TrainConfig(), resume=str(run), overrides={"max_steps": 20})
    out = capsys.readouterr().out
    assert f"Resuming {run} at epoch 1, step 30/132 (step 30 in all)" in out
    assert "Nothing to train: the run is at step 30 and --max-steps is 20; raise --max-steps" in out
    assert (run / "checkpoint.pt").read_bytes() == saved


@pytest.mark.parametrize("amp, units", [("bf16", "AMX_BF16 or AVX512_BF16"), ("fp16", "AMX_FP16 or AVX512_FP16")])
def test_16_bit_autocast_on_a_cpu_without_its_units_is_refused(corpus_dir, tmp_path, capsys, monkeypatch, amp, units):
    monkeypatch.setattr(device, "_cpu_capabilities", lambda: {"avx512_f": True})
    code, out = _cli(train_main, ["--data", str(corpus_dir), "--out", str(tmp_path / "run"), "--device", "cpu",
                                  "--amp", amp], capsys)
    assert code == 2 and f"this CPU has no {amp} units ({units}), so --amp {amp} would run many times slower" in out.err
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


def test_a_resumed_runs_first_loss_says_how_many_steps_it_averages(corpus_dir, tmp_path, capsys):
    run = tmp_path / "run"
    train(tiny(corpus_dir, run, epochs=1, log_interval=10, max_steps=15))
    capsys.readouterr()
    train(TrainConfig(), resume=str(run), overrides={"max_steps": 40})
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("Epoch [1/1], Step[")]
    assert "Step[20/132], Loss: " in lines[0] and "(mean of 5 steps)" in lines[0], "steps 16-20 since the resume"
    assert "Step[30/132]" in lines[1] and "(mean of" not in lines[1]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["steps"] for r in records if r["split"] == "train"] == [10, 5, 10, 10]


def test_nothing_to_train_names_every_flag_that_stops_the_run(corpus_dir, tmp_path, capsys):
    run = tmp_path / "run"
    result = train(tiny(corpus_dir, run, epochs=1))
    train(TrainConfig(), resume=str(run), overrides={"max_steps": result.global_step})
    out = capsys.readouterr().out
    assert (f"Nothing to train: the run has finished its 1 epoch(s); pass --epochs N with N > 1 and raise --max-steps "
            f"above {result.global_step} (it stops the run too) to train more") in out


def test_the_first_line_gives_the_models_size_and_activations_count_towards_fitting(corpus_dir, tmp_path, capsys,
                                                                                      monkeypatch):
    from fastlm.models.lm import parameter_count, training_bytes

    cfg = tiny(corpus_dir, tmp_path / "run", max_steps=1)
    train(cfg)
    vocab_size = len(Corpus(corpus_dir).dictionary)
    parameters = sum(p.numel() for p in RNNLM(vocab_size, 16, 32).parameters())
    assert parameter_count(cfg, vocab_size) == parameters
    assert f"fastlm: {vocab_size} words, {parameters:,} parameters, " in capsys.readouterr().out
    # One window's activations count too: with a byte less free than weights and activations need, refused.
    free = training_bytes(cfg, vocab_size) - 1
    assert free > 16 * parameters, "the weights, gradients and Adam state alone would fit"
    monkeypatch.setattr(device, "available_bytes", lambda where: free)
    code, out = _cli(train_main, ["--data", str(corpus_dir), "--out", str(tmp_path / "big"), "--embed-size", "16",
                                  "--hidden-size", "32", "--batch-size", "4", "--seq-len", "5", "--eval-batch-size",
                                  "3", "--device", "cpu"], capsys)
    assert code == 2 and "training this model needs at least" in out.err and "--seq-len" in out.err
    assert not (tmp_path / "big").exists()
