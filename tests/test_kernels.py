"""The LSTM kernels: naive_lstm against nn.LSTM, fused_lstm against naive_lstm in float64.

fused_lstm runs under TRITON_INTERPRET=1 (set in conftest.py before any kernel import). With
TRITON_INTERPRET=0 on a machine with a CUDA GPU (benchmarks/gpu_check.sh) the same tests run the
compiled kernel on the GPU.
"""
import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import REPO
from helpers import TOLERANCE, assert_rel_close
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map

from fastlm.kernels import fused_lstm, naive_lstm
from fastlm.kernels.fused_lstm import interpreting, launch_device, lstm_backward, lstm_forward
from fastlm.models.lstm import LSTM

NAMES = ("x", "h0", "c0", "weight_ih", "weight_hh", "bias_ih", "bias_hh")
SHAPES = [  # (B, T, E, H)
    pytest.param(1, 1, 8, 16, id="B1-T1"),
    pytest.param(5, 7, 24, 40, id="B5-T7-E24-H40"),
    pytest.param(33, 3, 5, 70, id="B33-T3-E5-H70"),  # two row blocks, hidden split over blocks and chunks
    pytest.param(2, 12, 16, 16, id="B2-T12-H16"),
]
DEVICE = "cuda" if torch.cuda.is_available() and not interpreting() else "cpu"
DTYPES = [pytest.param(d, id=str(d).removeprefix("torch.")) for d in (torch.float32, torch.bfloat16, torch.float16)]


def lstm_inputs(B, T, E, H, zero_state=False, scale=1.0):
    """Fresh random inputs in nn.LSTM's layout and initialisation range."""
    k = H ** -0.5
    h0, c0 = (torch.zeros(B, H), torch.zeros(B, H)) if zero_state else (torch.randn(B, H), torch.randn(B, H))
    tensors = [scale * torch.randn(B, T, E), h0, c0] + [
        scale * torch.empty(shape).uniform_(-k, k) for shape in ((4 * H, E), (4 * H, H), (4 * H,), (4 * H,))
    ]
    return [t.to(DEVICE) for t in tensors]


def outputs_and_grads(fn, inputs, upstream):
    """Run fn, back-propagate one loss over (out, hN, cN) with fixed upstream gradients."""
    inputs = [t.detach().clone().requires_grad_() for t in inputs]
    outputs = fn(*inputs)
    loss = sum((o.double() * g).sum() for o, g in zip(outputs, upstream))
    loss.backward()
    return outputs, [t.grad for t in inputs]


def compare(fn, inputs, tol):
    """fn on `inputs` against naive_lstm in float64 on the same (already rounded) values."""
    reference_inputs = [t.double() for t in inputs]
    B, T, _ = inputs[0].shape
    H = inputs[1].shape[1]
    upstream = [torch.randn(shape, dtype=torch.float64, device=DEVICE) for shape in ((B, T, H), (B, H), (B, H))]
    want, want_grads = outputs_and_grads(naive_lstm, reference_inputs, upstream)
    got, got_grads = outputs_and_grads(fn, inputs, upstream)
    for name, a, b in zip(("out", "hN", "cN"), got, want):
        expected_dtype = torch.float32 if name == "cN" else inputs[0].dtype  # c is fp32 inside and out
        assert a.dtype == expected_dtype, f"{name} came back as {a.dtype}"
        assert_rel_close(a, b, tol, name)
    for name, grad, given in zip(NAMES, got_grads, inputs):
        assert grad.dtype == given.dtype, f"grad {name} came back as {grad.dtype}, its input is {given.dtype}"
    for name, a, b in zip(NAMES, got_grads, want_grads):
        assert_rel_close(a, b, tol, f"grad {name}")


@pytest.mark.parametrize("B, T, E, H", SHAPES)
def test_naive_lstm_matches_nn_lstm_float64(B, T, E, H):
    inputs = [t.double() for t in lstm_inputs(B, T, E, H)]
    upstream = [torch.randn(shape, dtype=torch.float64, device=DEVICE) for shape in ((B, T, H), (B, H), (B, H))]
    got, got_grads = outputs_and_grads(naive_lstm, inputs, upstream)

    torch_lstm = nn.LSTM(E, H, batch_first=True).double().to(DEVICE)
    with torch.no_grad():
        for name, value in zip(NAMES[3:], inputs[3:]):
            getattr(torch_lstm, f"{name}_l0").copy_(value)
    x, h0, c0 = (t.clone().requires_grad_() for t in inputs[:3])
    out, (hn, cn) = torch_lstm(x, (h0[None], c0[None]))
    want = (out, hn[0], cn[0])
    sum((o * g).sum() for o, g in zip(want, upstream)).backward()
    want_grads = [x.grad, h0.grad, c0.grad] + [getattr(torch_lstm, f"{n}_l0").grad for n in NAMES[3:]]

    for name, a, b in zip(("out", "hN", "cN"), got, want):
        assert_rel_close(a, b, 1e-10, name)
    for name, a, b in zip(NAMES, got_grads, want_grads):
        assert_rel_close(a, b, 1e-10, f"grad {name}")


def test_kernels_run_interpreted_or_on_a_gpu():
    assert interpreting() or DEVICE == "cuda", \
        "TRITON_INTERPRET=1 must be set before fastlm.kernels is imported (tests/conftest.py)"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("zero_state", [False, True], ids=["random-state", "zero-state"])
@pytest.mark.parametrize("B, T, E, H", SHAPES)
def test_fused_lstm_matches_reference(B, T, E, H, zero_state, dtype, nan_empty):
    inputs = [t.to(dtype) for t in lstm_inputs(B, T, E, H, zero_state)]
    compare(fused_lstm, inputs, TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", DTYPES[1:])
def test_the_cell_state_crosses_windows_in_fp32(dtype, nan_empty):
    # A cell that only remembers (forget gate saturated at 1, input gate at 0) returns c0 unchanged:
    # to fp32 precision only if c0 goes in and cN comes out in fp32, whatever the compute dtype.
    B, T, E, H = 3, 2, 8, 16
    inputs = lstm_inputs(B, T, E, H)
    bias_ih = torch.zeros(4 * H, device=DEVICE)
    bias_ih[:H], bias_ih[H: 2 * H] = -60.0, 60.0  # gates i, f
    x, h0, c0, w_ih, w_hh, _, b_hh = inputs
    c0 = c0 + 1e-3 * torch.rand_like(c0)  # digits a 16-bit float cannot hold
    cast = [t.to(dtype) for t in (x, h0, w_ih, w_hh, bias_ih, b_hh)]
    _, _, c_n = fused_lstm(cast[0], cast[1], c0, *cast[2:])
    assert c_n.dtype == torch.float32
    assert_rel_close(c_n, c0, 1e-6, "cN of a remembering cell")
    rounded = (c0.to(dtype).double() - c0.double()).norm() / c0.double().norm()
    assert rounded > 1e-4, "c0 must hold digits the compute dtype would round away, or the test cannot tell"
    layer = LSTM(E, H, backend="triton").to(DEVICE)
    with torch.no_grad():
        layer.bias_ih_l0.copy_(bias_ih)
    with torch.autocast(DEVICE, dtype=dtype):
        _, (_, c_layer) = layer(x, (h0[None], c0[None]))
    assert c_layer.dtype == torch.float32
    assert_rel_close(c_layer[0], c0, 1e-6, "cN of the triton backend under autocast")


def test_kernels_launch_on_the_inputs_device(monkeypatch):
    # Triton launches on torch's current device: the launchers must make that the tensors' device.
    guard = launch_device(torch.device("cuda", 1))
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1
    module = sys.modules["fastlm.kernels.fused_lstm"]
    seen = []
    real = module.launch_device
    monkeypatch.setattr(module, "launch_device", lambda device: seen.append(device) or real(device))
    inputs = [t.requires_grad_() for t in lstm_inputs(2, 3, 4, 16)]
    out, _, _ = fused_lstm(*inputs)
    out.sum().backward()
    assert seen == [inputs[0].device] * 2, "forward and backward each launch under the inputs' device"


@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")  # e^{-x} → inf: σ(x) = 0, meant
def test_fused_lstm_saturated_gates_stay_finite(nan_empty):
    # Pre-activations up to |x| ≈ 100: every sigmoid and tanh saturates; (1−e^{−2x})/(1+e^{−2x}) would be NaN.
    inputs = lstm_inputs(3, 5, 8, 16)
    inputs[0] = inputs[0] * 30  # x
    inputs[3] = inputs[3] * 30  # weight_ih: x W_ihᵀ reaches ~±100
    inputs[1], inputs[2] = inputs[1] * 100, inputs[2] * 100
    reference = naive_lstm(*[t.double() for t in inputs])[0]
    assert reference.abs().max() > 0.99
    compare(fused_lstm, inputs, TOLERANCE[torch.float32])


@pytest.mark.parametrize("dtype", [DTYPES[0], DTYPES[1]])
def test_two_stacked_layers_through_fastlm_lstm(dtype, nan_empty):
    B, T, E, H = 4, 6, 12, 20
    ours = LSTM(E, H, num_layers=2, backend="triton").to(DEVICE, dtype)
    reference = nn.LSTM(E, H, num_layers=2, batch_first=True).double().to(DEVICE)
    reference.load_state_dict({k: v.double() for k, v in ours.state_dict().items()})
    x = torch.randn(B, T, E).to(DEVICE, dtype)
    state = tuple(torch.randn(2, B, H).to(DEVICE, dtype) for _ in range(2))
    upstream = [torch.randn(shape, dtype=torch.float64, device=DEVICE) for shape in ((B, T, H), (2, B, H), (2, B, H))]

    def run(module, cast):
        xs = cast(x).requires_grad_()
        out, (hn, cn) = module(xs, tuple(cast(s) for s in state))
        sum((o.double() * g).sum() for o, g in zip((out, hn, cn), upstream)).backward()
        return [out, hn, cn, xs.grad] + [p.grad for p in module.parameters()]

    got = run(ours, lambda t: t.clone())
    want = run(reference, lambda t: t.double())
    names = ["out", "hN", "cN", "grad x"] + [f"grad {n}" for n, _ in reference.named_parameters()]
    for name, a, b in zip(names, got, want):
        assert_rel_close(a, b, TOLERANCE[dtype], name)


@pytest.mark.parametrize("used", [("out",), ("hN",), ("cN",), ("hN", "cN")], ids="+".join)
def test_outputs_left_out_of_the_loss_reach_the_backward_as_none(used, nan_empty):
    # Autograd passes None for an output the loss does not use; the backward takes it as zero.
    B, T, E, H = 3, 4, 8, 16
    inputs = lstm_inputs(B, T, E, H)
    shapes = {"out": (B, T, H), "hN": (B, H), "cN": (B, H)}
    upstream = {name: torch.randn(shapes[name], dtype=torch.float64, device=DEVICE) for name in used}

    def grads(fn, inputs):
        inputs = [t.detach().clone().requires_grad_() for t in inputs]
        outputs = dict(zip(shapes, fn(*inputs)))
        sum((outputs[name].double() * g).sum() for name, g in upstream.items()).backward()
        return [t.grad for t in inputs]

    want = grads(naive_lstm, [t.double() for t in inputs])
    for name, a, b in zip(NAMES, grads(fused_lstm, inputs), want):
        assert_rel_close(a, b, TOLERANCE[torch.float32], f"grad {name}")


class RecordOps(TorchDispatchMode):
    """What a simulated CUDA graph sees: every dispatched op, with its arguments and (a copy of) its outputs."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        clone = lambda t: t.detach().clone() if isinstance(t, torch.Tensor) else t
        self.calls.append((func, args, kwargs or {}, tree_map(clone, out)))
        return out


@pytest.mark.parametrize("dtype", DTYPES)
def test_the_kernel_is_dispatched_as_ops_that_replay_bit_for_bit(dtype):
    # A raw Triton launch would be invisible here, and a graph replaying the record would skip it.
    inputs = [t.to(dtype).requires_grad_() for t in lstm_inputs(3, 4, 8, 16)]
    with RecordOps() as record:
        out, h_n, _ = fused_lstm(*inputs)  # cN unused: its gradient reaches the backward op as None
        (out.float().sum() + h_n.float().square().sum()).backward()
    ours = [call for call in record.calls if call[0].namespace == "fastlm"]
    assert [str(func) for func, *_ in ours] == ["fastlm.lstm_forward.default", "fastlm.lstm_backward.default"]
    assert ours[1][1][2] is None, "the unused cN's gradient"
    with torch.no_grad():
        for func, args, kwargs, recorded in ours:
            for i, (again, then) in enumerate(zip(func(*args, **kwargs), recorded)):
                assert torch.equal(again, then), f"{func} output {i} differs on replay"


@pytest.mark.parametrize("dtype", DTYPES)
def test_opcheck_passes_on_both_ops(dtype):
    B, T, E, H = 2, 2, 4, 16
    x, h0, c0, *weights = [t.to(dtype) for t in lstm_inputs(B, T, E, H)]
    inputs = [x, h0, c0.float(), *weights]  # c0 may come in fp32 whatever the dtype: d_c0 comes back in fp32
    saved = lstm_forward(*inputs)
    upstream = [torch.randn_like(saved[0]), torch.randn_like(h0), torch.randn_like(inputs[2])]  # d_cn: fp32
    checks = [
        (torch.ops.fastlm.lstm_forward.default, [t.clone().requires_grad_() for t in inputs]),  # with autograd
        (torch.ops.fastlm.lstm_backward.default, [*upstream, *inputs[:5], *saved]),
        (torch.ops.fastlm.lstm_backward.default, [None, upstream[1], None, *inputs[:5], *saved]),
    ]
    for op, args in checks:
        result = torch.library.opcheck(op, args)
        assert all(v == "SUCCESS" for v in result.values()), f"{op}: {result}"


@pytest.mark.parametrize("c0_fp32", [False, True], ids=["c0-as-x", "c0-fp32"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_fake_tensors_get_the_real_outputs_shapes_dtypes_and_strides(dtype, c0_fp32):
    x, h0, c0, *weights = [t.to(dtype) for t in lstm_inputs(3, 4, 8, 16)]
    inputs = [x, h0, c0.float() if c0_fp32 else c0, *weights]
    saved = lstm_forward(*inputs)
    upstream = [torch.randn_like(saved[0]), torch.randn_like(h0), torch.randn_like(inputs[2])]
    real_forward = torch.ops.fastlm.lstm_forward(*inputs)
    real_backward = lstm_backward(*upstream, *inputs[:5], *saved)
    with FakeTensorMode() as mode:
        fake = lambda ts: [mode.from_tensor(t) for t in ts]
        fake_forward = torch.ops.fastlm.lstm_forward(*fake(inputs))
        fake_public = fused_lstm(*fake(inputs))
        fake_backward = torch.ops.fastlm.lstm_backward(*fake(upstream), *fake(inputs[:5]), *fake(saved))
    for name, a, b in [*zip(("out", "hN", "cN", "c", "act"), fake_forward, real_forward),
                       *zip(("fused_lstm out", "hN", "cN"), fake_public, real_forward),
                       *zip(("d_x", "d_h0", "d_c0", "d_weight_ih", "d_weight_hh", "d_bias"), fake_backward,
                            real_backward)]:
        assert (a.shape, a.dtype, a.stride()) == (b.shape, b.dtype, b.stride()), name
    assert real_forward[2].dtype == torch.float32 and real_backward[2].dtype == inputs[2].dtype


def test_torch_compile_traces_the_ops_and_matches_eager():
    inputs = lstm_inputs(2, 3, 4, 16)
    upstream = [torch.randn(shape, device=DEVICE) for shape in ((2, 3, 16), (2, 16), (2, 16))]

    def outputs_and_grads(fn):
        leaves = [t.detach().clone().requires_grad_() for t in inputs]
        outputs = fn(*leaves)
        sum((o * g).sum() for o, g in zip(outputs, upstream)).backward()
        return [*outputs, *(t.grad for t in leaves)]

    compiled = torch.compile(fused_lstm, backend="aot_eager", fullgraph=True)
    for name, a, b in zip(("out", "hN", "cN", *NAMES), outputs_and_grads(compiled), outputs_and_grads(fused_lstm)):
        assert torch.equal(a, b), name


@pytest.mark.parametrize(
    "change, message",
    [
        pytest.param(lambda a: a.__setitem__(0, a[0][0]), r"x must be 3-D \(B, T, E\)", id="x-rank"),
        pytest.param(lambda a: a.__setitem__(1, a[1][:, :3]), r"h0 must have shape \(2, 8\), got \(2, 3\)",
                     id="h0-shape"),
        pytest.param(lambda a: a.__setitem__(3, a[3][:, :2]), r"weight_ih must have shape \(32, 4\)",
                     id="weight-ih-shape"),
        pytest.param(lambda a: a.__setitem__(4, a[4][:5]), r"weight_hh must be \(4H, H\)", id="weight-hh-shape"),
        pytest.param(lambda a: a.__setitem__(5, a[5].half()), "bias_ih is torch.float16 but x is torch.float32",
                     id="mixed-dtype"),
        pytest.param(lambda a: a.__setitem__(slice(0, 7), [t.double() for t in a]), "dtype torch.float64 is not",
                     id="float64"),
        pytest.param(lambda a: a.__setitem__(0, a[0][:, :0]), "at least one row and one time step", id="T0"),
    ],
)
def test_bad_inputs_raise_value_error(change, message):
    inputs = lstm_inputs(2, 3, 4, 8)
    change(inputs)
    with pytest.raises(ValueError, match=message):
        fused_lstm(*inputs)


def test_cpu_tensors_without_the_interpreter_are_refused(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="runs on CUDA tensors"):
        fused_lstm(*[t.cpu() for t in lstm_inputs(2, 3, 4, 8)])


def test_compiles_for_hopper_without_spills_and_with_tensor_cores(tmp_path):
    """benchmarks/compile_check.py builds every launcher config for sm_90 (needs real, not interpreted, kernels)."""
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    # Its report goes to tmp_path: a test run leaves the committed results alone.
    report = tmp_path / "compile_check.json"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.compile_check", "--out", str(report)], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "all configurations passed" in proc.stdout
    from benchmarks.compile_check import configurations

    # a forward kernel per configuration, and a backward with and without the recurrent product
    expected = sum(1 if kind == "fwd" else 2 for kind, *_ in configurations())
    assert expected >= 81 + 99, "27 configurations step_config picks, 33 more the sweep may time"
    assert len(json.loads(report.read_text())["configs"]) == expected
