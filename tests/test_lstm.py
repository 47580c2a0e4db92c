"""fastlm.models.lstm.LSTM against nn.LSTM with copied weights, in float64."""
import subprocess
import sys

import pytest
import torch
from helpers import assert_rel_close
from torch import nn

from fastlm.models import lstm as lstm_module
from fastlm.models.lstm import LSTM, check_backend, resolve_backend

TOL = 1e-10
SHAPES = [  # (B, T, E, H, L)
    pytest.param(1, 1, 3, 4, 1, id="B1-T1"),
    pytest.param(5, 7, 24, 40, 1, id="B5-T7-E24-H40"),
    pytest.param(3, 4, 6, 5, 3, id="3-layers"),
]


def _run(module, x, state, upstream):
    """Forward, then one loss over (out, hN, cN) with fixed random upstream gradients."""
    x = x.clone().requires_grad_()
    h0, c0 = (s.clone().requires_grad_() for s in state)
    out, (hn, cn) = module(x, (h0, c0))
    loss = sum((t * g).sum() for t, g in zip((out, hn, cn), upstream))
    loss.backward()
    grads = {"x": x.grad, "h0": h0.grad, "c0": c0.grad}
    grads.update({name: p.grad for name, p in module.named_parameters()})
    return (out, hn, cn), grads


@pytest.mark.parametrize("backend", ["reference", "torch"])
@pytest.mark.parametrize("batch_first", [True, False], ids=["batch_first", "seq_first"])
@pytest.mark.parametrize("B, T, E, H, L", SHAPES)
def test_backend_matches_nn_lstm_float64(backend, batch_first, B, T, E, H, L):
    ours = LSTM(E, H, L, batch_first=batch_first, backend=backend).double()
    theirs = nn.LSTM(E, H, L, batch_first=batch_first).double()
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn((B, T, E) if batch_first else (T, B, E), dtype=torch.float64)
    state = (torch.randn(L, B, H, dtype=torch.float64), torch.randn(L, B, H, dtype=torch.float64))
    out_shape = (B, T, H) if batch_first else (T, B, H)
    upstream = [torch.randn(out_shape, dtype=torch.float64)] + [torch.randn(L, B, H, dtype=torch.float64)] * 2

    got, got_grads = _run(ours, x, state, upstream)
    want, want_grads = _run(theirs, x, state, upstream)
    for name, a, b in zip(("out", "hN", "cN"), got, want):
        assert_rel_close(a, b, TOL, name)
    assert got_grads.keys() == want_grads.keys()
    for name in want_grads:
        assert_rel_close(got_grads[name], want_grads[name], TOL, f"grad {name}")


def test_default_state_is_zeros():
    lstm = LSTM(3, 4, backend="reference").double()
    x = torch.randn(2, 5, 3, dtype=torch.float64)
    zeros = torch.zeros(1, 2, 4, dtype=torch.float64)
    out_default, _ = lstm(x)
    out_zeros, _ = lstm(x, (zeros, zeros))
    assert torch.equal(out_default, out_zeros)


def test_parameters_are_nn_lstm_parameters():
    torch.manual_seed(3)
    ours = LSTM(6, 5, 2)
    torch.manual_seed(3)
    theirs = nn.LSTM(6, 5, 2, batch_first=True)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    for (name, a), (_, b) in zip(ours.state_dict().items(), theirs.state_dict().items()):
        assert torch.equal(a, b), f"{name}: different initialisation"
    assert isinstance(ours, nn.LSTM)


BF16, FP16 = torch.bfloat16, torch.float16


@pytest.mark.parametrize("backend, device, amp, graphed, expected", [
    ("auto", "cuda", BF16, True, "triton"),  # tensor cores, one replay: where the fused kernel wins
    ("auto", "cuda", FP16, True, "triton"),
    ("auto", "cuda", None, True, "torch"),  # fp32: the kernel's IEEE products use no tensor cores
    ("auto", "cuda", BF16, False, "torch"),  # eager: 2·T Python launches per layer and step
    ("auto", "cpu", BF16, True, "torch"),
    ("auto", "cpu", None, False, "torch"),
    ("triton", "cuda", None, False, "triton"),  # a named backend is always taken
    ("reference", "cpu", None, False, "reference"),
], ids=lambda v: str(v).removeprefix("torch."))
def test_auto_picks_the_backend_expected_to_be_fastest_for_the_run(monkeypatch, backend, device, amp, graphed,
                                                                  expected):
    monkeypatch.setattr(lstm_module, "_triton_available", lambda: True)
    assert resolve_backend(backend, device, amp, graphed) == expected


def test_auto_without_triton_installed_is_torch(monkeypatch):
    monkeypatch.setattr(lstm_module, "_triton_available", lambda: False)
    assert resolve_backend("auto", "cuda", BF16, graphed=True) == "torch"


@pytest.mark.parametrize(
    "make, call, message",
    [
        pytest.param(lambda: check_backend("cudnn"), None, "unknown LSTM backend 'cudnn'", id="unknown-backend"),
        pytest.param(lambda: LSTM(3, 4), lambda m: m(torch.randn(2, 3)), "3-D tensor", id="rank-2-input"),
        pytest.param(lambda: LSTM(3, 4), lambda m: m(torch.randn(2, 5, 7)), "feature size 7", id="wrong-feature-size"),
        pytest.param(
            lambda: LSTM(3, 4),
            lambda m: m(torch.randn(2, 5, 3), (torch.zeros(1, 3, 4), torch.zeros(1, 3, 4))),
            r"h0 must have shape \(num_layers, batch, hidden_size\) = \(1, 2, 4\), got \(1, 3, 4\)",
            id="wrong-state-shape",
        ),
        pytest.param(
            lambda: LSTM(3, 4),
            lambda m: m(torch.randn(2, 5, 3), torch.zeros(1, 2, 4)),
            "must be a pair",
            id="state-not-a-pair",
        ),
    ],
)
def test_bad_input_raises_value_error(make, call, message):
    with pytest.raises(ValueError, match=message):
        module = make()
        call(module)


def test_without_triton_everything_but_the_kernel_works(corpus_dir):
    # Triton is not a dependency (CUDA builds of torch bring it): a CPU install without it keeps the
    # torch and reference backends, and asking for the kernel is one line.
    script = """
import sys
sys.modules["triton"] = None  # as if not installed
import torch
from fastlm.kernels import fused_lstm
from fastlm.models.lstm import LSTM, resolve_backend
LSTM(4, 8, backend="reference")(torch.randn(2, 3, 4))
print("auto on a graphed bf16 GPU run:", resolve_backend("auto", "cuda", torch.bfloat16, True))
try:
    fused_lstm()
except ImportError as err:
    print("fused_lstm:", err)
from fastlm.cli import run_main
from fastlm.train import main
run_main(main, ["--data", sys.argv[1], "--backend", "triton", "--device", "cpu"])
"""
    proc = subprocess.run([sys.executable, "-c", script, str(corpus_dir)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "auto on a graphed bf16 GPU run: torch" in proc.stdout
    assert "fused_lstm: fastlm's fused LSTM kernel needs Triton, which is not installed" in proc.stdout
    assert proc.stderr == ("error: the triton backend needs Triton, which is not installed: the CUDA builds of torch "
                           "bring it (elsewhere pip install 'triton>=3.3'), or choose --backend torch\n")


def test_the_fused_kernel_on_a_cpu_without_the_interpreter_is_one_line(tiny_run, tmp_path, monkeypatch, capsys):
    # A compiled Triton kernel needs CUDA tensors; on the CPU only the interpreter runs it (the tests
    # switch it on in conftest.py, so this test switches it off again).
    from fastlm.cli import run_main
    from fastlm.evaluate import main as evaluate_main
    from fastlm.train import main as train_main

    monkeypatch.delenv("TRITON_INTERPRET")
    run = tmp_path / "run"
    for main, argv in [(train_main, ["--data", str(tiny_run.parent / "corpus"), "--out", str(run), "--backend",
                                     "triton", "--device", "cpu"]),
                       (evaluate_main, ["--checkpoint", str(tiny_run), "--backend", "triton", "--device", "cpu"])]:
        with pytest.raises(SystemExit) as exit_info:
            run_main(main, argv)
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and err.count("\n") == 1, err
        assert "--backend triton runs the fused kernel on a CUDA GPU: use --device cuda, or on the CPU set " \
               "TRITON_INTERPRET=1" in err
    assert not run.exists()
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    check_backend("triton", "cpu")  # interpreted: allowed
