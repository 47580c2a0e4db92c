"""The static-buffer training step (the CUDA-graph path, run eagerly on the CPU) and AMP."""
import itertools

import pytest
import torch

from fastlm.cli import run_main
from fastlm.data import Corpus, batchify, tbptt_windows
from fastlm.graphs import GraphedStep
from fastlm.lstm import recurrence_dtype
from fastlm.model import RNNLM
from fastlm.train import main as train_main
from fastlm.trainer import train_step
from helpers import TOLERANCE, assert_rel_close


def _setup(corpus_dir, backend="torch"):
    torch.manual_seed(0)
    model = RNNLM(14, 16, 32, backend=backend)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01, fused=True)
    windows = list(itertools.islice(tbptt_windows(batchify(Corpus(corpus_dir).train, 4), 5), 20))
    return model, optimizer, windows


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_static_step_matches_the_plain_loop_for_20_steps(corpus_dir, backend):
    model, optimizer, windows = _setup(corpus_dir, backend)
    state, plain = model.init_state(4), []
    for inputs, targets in windows:
        loss, state = train_step(model, optimizer, inputs, targets, state, clip=0.5)
        plain.append(loss.item())
    plain_weights = [p.detach().clone() for p in model.parameters()]

    model, optimizer, windows = _setup(corpus_dir, backend)
    stepper = GraphedStep(model, optimizer, 4, 5, clip=0.5)
    static = []
    for inputs, targets in windows:
        stepper.step(inputs, targets)
        static.append(stepper.take_loss_sum())
    assert static == pytest.approx(plain, rel=1e-6, abs=0)
    for a, b in zip(model.parameters(), plain_weights):
        assert_rel_close(a, b, 1e-6, "weights after 20 steps")
    assert_rel_close(stepper.state[0], state[0], 1e-6, "carried h")


def test_loss_sum_stays_on_the_device_until_read(corpus_dir):
    model, optimizer, windows = _setup(corpus_dir)
    stepper = GraphedStep(model, optimizer, 4, 5, clip=0.5)
    for inputs, targets in windows[:3]:
        stepper.step(inputs, targets)
    total = stepper.take_loss_sum()
    assert total > 0 and stepper.take_loss_sum() == 0.0


HOST_READS = ("item", "tolist", "numpy", "__bool__", "__float__", "__int__", "__index__")


@pytest.mark.parametrize("backend", ["torch", "reference"])
@pytest.mark.parametrize("amp", [None, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16-scaler"])
def test_a_step_reads_nothing_back_to_the_host(corpus_dir, monkeypatch, backend, amp):
    # On a GPU a host read inside the step is a sync, and inside a CUDA graph capture an error; here
    # every way a tensor's value can reach Python raises instead, for three steps after a first one.
    model, optimizer, windows = _setup(corpus_dir, backend)
    scaler = torch.amp.GradScaler("cpu") if amp == torch.float16 else None
    stepper = GraphedStep(model, optimizer, 4, 5, clip=0.5, amp_dtype=amp, scaler=scaler)
    stepper.step(*windows[0])  # lazy set-up (optimizer state, the scaler's scale) may read once

    def host_read(*args, **kwargs):
        raise AssertionError("the step read a tensor's value on the host")

    with monkeypatch.context() as patched:
        for name in HOST_READS:
            patched.setattr(torch.Tensor, name, host_read)
        for inputs, targets in windows[1:4]:
            stepper.step(inputs, targets)
    assert stepper.take_loss_sum() > 0  # the reads work again outside


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_amp_steps_track_float32(corpus_dir, dtype):
    losses = {}
    for amp in (None, dtype):
        model, optimizer, windows = _setup(corpus_dir)
        scaler = torch.amp.GradScaler("cpu") if amp == torch.float16 else None
        stepper = GraphedStep(model, optimizer, 4, 5, clip=0.5, amp_dtype=amp, scaler=scaler)
        for inputs, targets in windows[:10]:
            stepper.step(inputs, targets)
        losses[amp] = stepper.take_loss_sum() / 10
        assert all(p.dtype == torch.float32 for p in model.parameters()), "master weights stay fp32"
    assert losses[dtype] == pytest.approx(losses[None], rel=0.03)


def test_a_scaler_cannot_be_captured(corpus_dir):
    model, optimizer, _ = _setup(corpus_dir)
    with pytest.raises(ValueError, match="GradScaler cannot run inside a CUDA graph"):
        GraphedStep(model, optimizer, 4, 5, 0.5, torch.float16, capture=True, scaler=torch.amp.GradScaler("cpu"))


def test_torch_lstm_under_cpu_autocast_keeps_its_recurrence_in_fp32():
    model = RNNLM(20, 6, 8, 2, backend="torch")
    tokens, state = torch.randint(0, 20, (3, 4)), (torch.randn(2, 3, 8), torch.randn(2, 3, 8))
    want, (want_h, want_c) = model.lstm(model.embed(tokens), state)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, (h, c) = model(tokens, state)
        got, _ = model.lstm(model.embed(tokens), state)
    assert logits.dtype == torch.bfloat16, "the output layer runs in bf16"
    assert got.dtype == h.dtype == c.dtype == torch.float32
    for name, a, b in (("out", got, want), ("h", h, want_h), ("c", c, want_c)):
        assert_rel_close(a, b, TOLERANCE[torch.float32], f"{name} under bf16 autocast")


@pytest.mark.parametrize("device_type, asked, runs", [("cuda", torch.bfloat16, torch.bfloat16),
                                                      ("cuda", torch.float16, torch.float16),
                                                      ("cpu", torch.bfloat16, torch.float32)])
def test_the_recurrence_runs_in_the_asked_dtype_except_on_the_cpu(device_type, asked, runs):
    assert recurrence_dtype(device_type, asked) == runs


def test_cuda_graphs_on_the_cpu_is_a_clear_error(corpus_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_main(train_main, ["--data", str(corpus_dir), "--out", str(tmp_path / "r"), "--device", "cpu",
                              "--cuda-graphs"])
    assert exit_info.value.code == 2 and "--cuda-graphs needs a CUDA device" in capsys.readouterr().err
