"""One LSTM layer, forward and forward+backward: the fused Triton kernel against cuDNN (and the reference).

    pytest benchmarks/test_lstm_layer.py --benchmark-only

Every provider includes the input projection. On CUDA the timed call is the replay of a CUDA graph
holding the whole forward (or forward+backward), synchronised inside the timed function, so launch
cost is not the difference; the cuDNN kernels that ran are read from the profiler. On the CPU the
suite runs torch (oneDNN) against the reference at small shapes; the Triton kernel would run under
the interpreter there, which times Python, not the kernel, so it is skipped with that reason.
"""
from __future__ import annotations

import pytest
import torch

from fastlm.kernels import fused_lstm, naive_lstm
from fastlm.kernels.fused_lstm import interpreting
from fastlm.lstm import LSTM

CUDA = torch.cuda.is_available() and not interpreting()
DEVICE = "cuda" if CUDA else "cpu"
DEFAULT = (20, 30, 128, 1024)  # B, T, E, H
if CUDA:
    SHAPES = [DEFAULT] + [(b, t, 128, h) for b in (1, 20, 64, 256) for h in (256, 1024, 2048) for t in (30, 256)
                          if (b, t, 128, h) != DEFAULT]
    DTYPES = [torch.bfloat16, torch.float32]
else:
    SHAPES = [(20, 30, 128, 256), (4, 30, 64, 128)]
    DTYPES = [torch.float32]
PROVIDERS = ["triton", "torch", "reference"]


def lstm_flops(B, T, E, H, backward: bool) -> float:
    forward = 2 * B * T * 4 * H * (E + H)
    return 3 * forward if backward else forward


def _inputs(B, T, E, H, dtype, grad: bool):
    k = H**-0.5
    tensors = [torch.randn(B, T, E), torch.randn(B, H), torch.randn(B, H)] + [
        torch.empty(s).uniform_(-k, k) for s in ((4 * H, E), (4 * H, H), (4 * H,), (4 * H,))]
    return [t.to(DEVICE, dtype).requires_grad_(grad) for t in tensors]


def _callable(provider, inputs):
    if provider == "triton":
        return lambda: fused_lstm(*inputs)
    if provider == "reference":
        return lambda: naive_lstm(*inputs)
    x, h0, c0, w_ih, w_hh, b_ih, b_hh = inputs
    lstm = LSTM(x.shape[2], h0.shape[1], backend="torch").to(DEVICE, x.dtype)
    with torch.no_grad():
        for name, w in zip(("weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0"), (w_ih, w_hh, b_ih, b_hh)):
            getattr(lstm, name).copy_(w)
    return lambda: lstm(x, (h0[None], c0[None]))


def _timed(fn, backward: bool):
    def run():
        outputs = fn()
        out = outputs[0]
        if backward:
            out.backward(grad)
        return out

    out = fn()[0]
    grad = torch.randn_like(out)
    if not CUDA:
        return run
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            run()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run()

    def replay():
        graph.replay()
        torch.cuda.synchronize()

    return replay


def _cudnn_kernels(fn) -> list[str]:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sorted({e.key for e in prof.key_averages() if "rnn" in e.key.lower() or "lstm" in e.key.lower()})[:6]


@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwd+bwd"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}-T{}-E{}-H{}".format(*s))
@pytest.mark.parametrize("provider", PROVIDERS)
def test_lstm_layer(benchmark, record, provider, shape, dtype, backward):
    if provider == "triton" and not CUDA:
        pytest.skip("no CUDA GPU: the Triton kernel would run under the interpreter, which times Python")
    if provider == "reference" and CUDA and shape != DEFAULT:
        pytest.skip("the reference is timed at the default shape only on CUDA")
    inputs = _inputs(*shape, dtype, grad=backward)
    fn = _timed(_callable(provider, inputs), backward)
    benchmark.pedantic(fn, rounds=50 if CUDA else 5, warmup_rounds=2, iterations=1)
    seconds = benchmark.stats.stats.median
    extra = {"tflops": lstm_flops(*shape, backward) / seconds / 1e12}
    if CUDA and provider == "torch" and shape == DEFAULT:
        extra["cudnn_kernels"] = ", ".join(_cudnn_kernels(fn))
    group = "lstm {} {} B{} T{} E{} H{}".format("fwd+bwd" if backward else "fwd", str(dtype)[6:], *shape)
    record(group, provider, benchmark, baseline=provider == "torch", **extra)


# cuDNN's persistent RNN kernels keep W_hh on chip across steps; PyTorch asks for them only in fp16
# with a batch that is a multiple of 8. So the baseline beside fastlm's B=20 bf16 is B=16 and B=24 in
# fp16 (compare time per row); the cuDNN kernels that ran are recorded to show which algorithm it was.
PERSISTENT_SHAPES = [(16, 30, 128, 1024), (24, 30, 128, 1024)]


@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwd+bwd"])
@pytest.mark.parametrize("shape", PERSISTENT_SHAPES, ids=lambda s: "B{}-T{}-E{}-H{}".format(*s))
def test_cudnn_persistent_fp16(benchmark, record, shape, backward):
    if not CUDA:
        pytest.skip("cuDNN's persistent algorithm is a GPU baseline")
    inputs = _inputs(*shape, torch.float16, grad=backward)
    fn = _timed(_callable("torch", inputs), backward)
    benchmark.pedantic(fn, rounds=50, warmup_rounds=2, iterations=1)
    seconds = benchmark.stats.stats.median
    group = "lstm {} cudnn-persistent-candidates float16 H1024".format("fwd+bwd" if backward else "fwd")
    record(group, f"torch-fp16-B{shape[0]}", benchmark, baseline=shape[0] == 16,
           tflops=lstm_flops(*shape, backward) / seconds / 1e12, us_per_row=seconds / shape[0] * 1e6,
           cudnn_kernels=", ".join(_cudnn_kernels(fn)))
