"""One LSTM layer, forward and forward+backward: the fused Triton kernel against cuDNN (and the reference).

    pytest benchmarks/test_lstm_layer.py --benchmark-only

Every provider includes the input projection. On the GPU path (benchmarks/conftest.py) the timed
call is the replay of a graph holding the whole forward (or forward+backward), synchronised inside
the timed function, so launch cost is not the difference; the cuDNN kernels that ran are read from
the profiler. Rehearsed on the CPU, the same rows run at a tiny shape, with torch's CPU LSTM where
cuDNN would be. Elsewhere on the CPU the suite runs torch (oneDNN) against the reference at small
shapes; the Triton kernel would run under the interpreter there, which times Python, not the
kernel, so it is skipped with that reason.
"""
from __future__ import annotations

import pytest
import torch

from benchmarks.conftest import CUDA, DEVICE, GPU_PATH, REHEARSAL, synchronize
from fastlm.kernels import fused_lstm, naive_lstm
from fastlm.models.lstm import LSTM
from fastlm.training.graphs import graph_api

# cuDNN's persistent RNN kernels keep W_hh on chip across steps; PyTorch asks for them only in fp16
# with a batch that is a multiple of 8. So the baseline beside fastlm's B=20 bf16 is B=16 and B=24 in
# fp16 (compare time per row).
if REHEARSAL:  # the GPU's rows, at shapes the interpreter runs in a second
    DEFAULT = (4, 3, 8, 16)
    SHAPES = [DEFAULT]
    PERSISTENT_SHAPES = [(16, 3, 8, 16), (24, 3, 8, 16)]
else:
    DEFAULT = (20, 30, 128, 1024)  # B, T, E, H
    SHAPES = [DEFAULT] + [(b, t, 128, h) for b in (1, 20, 64, 256) for h in (256, 1024, 2048) for t in (30, 256)
                          if (b, t, 128, h) != DEFAULT] if CUDA else [(20, 30, 128, 256), (4, 30, 64, 128)]
    PERSISTENT_SHAPES = [(16, 30, 128, 1024), (24, 30, 128, 1024)]
DTYPES = [torch.bfloat16, torch.float32] if GPU_PATH else [torch.float32]
ROUNDS = 50 if CUDA else 3 if REHEARSAL else 5
PROVIDERS = ["triton", "torch", "reference"]


def shape_id(shape) -> str:
    return "B{}-T{}-E{}-H{}".format(*shape)


def lstm_flops(B, T, E, H, backward: bool) -> float:
    forward = 2 * B * T * 4 * H * (E + H)
    return 3 * forward if backward else forward


def _inputs(B, T, E, H, dtype, grad: bool):
    k = H**-0.5
    tensors = [torch.randn(B, T, E), torch.randn(B, H), torch.randn(B, H)] + [
        torch.empty(s).uniform_(-k, k) for s in ((4 * H, E), (4 * H, H), (4 * H,), (4 * H,))]
    return [t.to(DEVICE, dtype).requires_grad_(grad) for t in tensors]


def _callable(provider, inputs):
    """The provider's forward, and the tensors from outside that it reads."""
    if provider == "triton":
        return (lambda: fused_lstm(*inputs)), inputs
    if provider == "reference":
        return (lambda: naive_lstm(*inputs)), inputs
    x, h0, c0, w_ih, w_hh, b_ih, b_hh = inputs
    lstm = LSTM(x.shape[2], h0.shape[1], backend="torch").to(DEVICE, x.dtype)
    with torch.no_grad():
        for name, w in zip(("weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0"), (w_ih, w_hh, b_ih, b_hh)):
            getattr(lstm, name).copy_(w)
    return (lambda: lstm(x, (h0[None], c0[None]))), [x, h0, c0, *lstm.parameters()]


def _timed(fn, reads: list[torch.Tensor], backward: bool):
    """What the benchmark times: on the GPU path the replay of a graph of `fn` (and of its backward,
    into the gradients of `reads`), synchronised; elsewhere the eager call."""
    def run():
        out = fn()[0]
        if backward:
            out.backward(upstream)

    upstream = torch.randn_like(fn()[0])
    if not GPU_PATH:
        return run
    graphs = graph_api(torch.device(DEVICE))
    with graphs.side_stream():
        for _ in range(3):  # the warm-up also allocates the gradients the graph accumulates into
            run()

    def buffers():
        grads = {f"grad {i}": t.grad for i, t in enumerate(reads) if t.grad is not None}
        return {"upstream": upstream, **{f"input {i}": t for i, t in enumerate(reads)}, **grads}

    graph = graphs.capture(run, buffers)

    def replay():
        graph.replay()
        synchronize()

    return replay


def _cudnn_kernels(fn) -> str:
    """The cuDNN kernels one call of `fn` ran, as the CUDA profiler names them: which algorithm it was."""
    if not CUDA:
        return "none: a rehearsal on the CPU has no cuDNN"
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    names = {e.key for e in prof.key_averages() if "rnn" in e.key.lower() or "lstm" in e.key.lower()}
    return ", ".join(sorted(names)[:6])


@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwd+bwd"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
@pytest.mark.parametrize("provider", PROVIDERS)
def test_lstm_layer(benchmark, record, provider, shape, dtype, backward):
    if provider == "triton" and not GPU_PATH:
        pytest.skip("no CUDA GPU: the Triton kernel would run under the interpreter, which times Python")
    if provider == "reference" and GPU_PATH and shape != DEFAULT:
        pytest.skip("the reference is timed at the default shape only on CUDA")
    inputs = _inputs(*shape, dtype, grad=backward)
    fn = _timed(*_callable(provider, inputs), backward)
    benchmark.pedantic(fn, rounds=ROUNDS, warmup_rounds=2, iterations=1)
    seconds = benchmark.stats.stats.median
    extra = {"tflops": lstm_flops(*shape, backward) / seconds / 1e12}
    if GPU_PATH and provider == "torch" and shape == DEFAULT:
        extra["cudnn_kernels"] = _cudnn_kernels(fn)
    group = "lstm {} {} {}".format("fwd+bwd" if backward else "fwd", str(dtype)[6:], shape_id(shape).replace("-", " "))
    record(group, provider, benchmark, baseline=provider == "torch", **extra)


@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwd+bwd"])
@pytest.mark.parametrize("shape", PERSISTENT_SHAPES, ids=shape_id)
def test_cudnn_persistent_fp16(benchmark, record, shape, backward):
    if not GPU_PATH:
        pytest.skip("cuDNN's persistent algorithm is a GPU baseline")
    inputs = _inputs(*shape, torch.float16, grad=backward)
    fn = _timed(*_callable("torch", inputs), backward)
    benchmark.pedantic(fn, rounds=ROUNDS, warmup_rounds=2, iterations=1)
    seconds = benchmark.stats.stats.median
    group = "lstm {} cudnn-persistent-candidates float16 H{}".format("fwd+bwd" if backward else "fwd", shape[3])
    record(group, f"torch-fp16-B{shape[0]}", benchmark, baseline=shape[0] == 16,
           tflops=lstm_flops(*shape, backward) / seconds / 1e12, us_per_row=seconds / shape[0] * 1e6,
           cudnn_kernels=_cudnn_kernels(fn))
