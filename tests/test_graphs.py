"""The static-buffer training step, eager and through the simulated CUDA graph API, and AMP."""
import contextlib
import copy
import dataclasses
import functools
import itertools
import json
import types
from pathlib import Path

import pytest
import torch
from helpers import TOLERANCE, assert_rel_close, train_step

from fastlm.checkpoint import load_checkpoint
from fastlm.cli import run_main
from fastlm.config import TrainConfig
from fastlm.data import Corpus, batchify, tbptt_windows
from fastlm.device import SIMULATE_ENV, use_device
from fastlm.models.lm import RNNLM
from fastlm.models.lstm import recurrence_dtype
from fastlm.scoring import evaluate
from fastlm.train import main as train_main
from fastlm.training import graphs, simulated_graphs, step
from fastlm.training.optimizer import make_optimizer
from fastlm.training.simulated_graphs import SimulatedGraphs
from fastlm.training.step import EvalForward, TrainStep
from fastlm.training.trainer import train


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
    stepper = TrainStep(model, optimizer, 4, 5, clip=0.5)
    static = []
    for inputs, targets in windows:
        stepper.step(inputs, targets)
        stepper.detach_state()
        static.append(stepper.take_loss_sum())
    assert static == pytest.approx(plain, rel=1e-6, abs=0)
    for a, b in zip(model.parameters(), plain_weights):
        assert_rel_close(a, b, 1e-6, "weights after 20 steps")
    assert_rel_close(stepper.state[0], state[0], 1e-6, "carried h")


def test_each_step_waits_for_the_detach_that_carries_its_state(corpus_dir):
    model, optimizer, windows = _setup(corpus_dir)
    stepper = TrainStep(model, optimizer, 4, 5, clip=0.5)
    stepper.step(*windows[0])
    assert not stepper.h.any(), "the carried state changes only at the detach"
    with pytest.raises(RuntimeError, match=r"call detach_state\(\) after each step"):
        stepper.step(*windows[1])
    stepper.detach_state()
    assert torch.equal(stepper.h, stepper.new_h) and stepper.h.grad_fn is None and stepper.h.any()
    stepper.step(*windows[1])
    stepper.reset_state()  # an epoch's start: zeros, no carry
    stepper.step(*windows[2])


def test_loss_sum_stays_on_the_device_until_read(corpus_dir):
    model, optimizer, windows = _setup(corpus_dir)
    stepper = TrainStep(model, optimizer, 4, 5, clip=0.5)
    for inputs, targets in windows[:3]:
        stepper.step(inputs, targets)
        stepper.detach_state()
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
    stepper = TrainStep(model, optimizer, 4, 5, clip=0.5, amp_dtype=amp, scaler=scaler)
    stepper.step(*windows[0])  # lazy set-up (optimizer state, the scaler's scale) may read once
    stepper.detach_state()

    def host_read(*args, **kwargs):
        raise AssertionError("the step read a tensor's value on the host")

    with monkeypatch.context() as patched:
        for name in HOST_READS:
            patched.setattr(torch.Tensor, name, host_read)
        for inputs, targets in windows[1:4]:
            stepper.step(inputs, targets)
            stepper.detach_state()
    assert stepper.take_loss_sum() > 0  # the reads work again outside


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_amp_steps_track_float32(corpus_dir, dtype):
    losses = {}
    for amp in (None, dtype):
        model, optimizer, windows = _setup(corpus_dir)
        scaler = torch.amp.GradScaler("cpu") if amp == torch.float16 else None
        stepper = TrainStep(model, optimizer, 4, 5, clip=0.5, amp_dtype=amp, scaler=scaler)
        for inputs, targets in windows[:10]:
            stepper.step(inputs, targets)
            stepper.detach_state()
        losses[amp] = stepper.take_loss_sum() / 10
        assert all(p.dtype == torch.float32 for p in model.parameters()), "master weights stay fp32"
    assert losses[dtype] == pytest.approx(losses[None], rel=0.03)


def test_a_scaler_cannot_be_captured(corpus_dir):
    model, optimizer, _ = _setup(corpus_dir)
    with pytest.raises(ValueError, match="GradScaler cannot run inside a CUDA graph"):
        TrainStep(model, optimizer, 4, 5, 0.5, torch.float16, graphs=SimulatedGraphs(),
                    scaler=torch.amp.GradScaler("cpu"))


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


# -- the CUDA-graph path on the CPU, through the simulated graph API ------------------------------

BACKENDS_AND_DTYPES = [pytest.param(backend, amp, id=f"{backend}-{name}") for backend in ("torch", "reference")
                       for amp, name in ((None, "fp32"), (torch.bfloat16, "bf16"))]


def _optimizer_values(optimizer) -> dict:
    return {(i, key): value.clone() for i, p in enumerate(optimizer.param_groups[0]["params"])
            for key, value in optimizer.state.get(p, {}).items()}


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("trained", [False, True], ids=["fresh", "after-3-steps"])
@pytest.mark.parametrize("backend, amp", BACKENDS_AND_DTYPES + [pytest.param("triton", torch.bfloat16,
                                                                             id="triton-bf16")])
def test_capture_leaves_the_model_and_the_optimizer_as_they_were(corpus_dir, backend, amp, trained, seed):
    torch.manual_seed(seed)
    model = RNNLM(14, 16, 32, backend=backend)
    optimizer = make_optimizer(model, 0.01, capturable=True)
    windows = list(itertools.islice(tbptt_windows(batchify(Corpus(corpus_dir).train, 4), 5), 3))
    if trained:
        eager = TrainStep(model, optimizer, 4, 5, 0.5, amp)
        for window in windows:
            eager.step(*window)
            eager.detach_state()
    weights = {name: p.detach().clone() for name, p in model.named_parameters()}
    moments = _optimizer_values(optimizer)

    stepper = TrainStep(model, optimizer, 4, 5, 0.5, amp, graphs=SimulatedGraphs())
    assert stepper.graph is not None
    for name, p in model.named_parameters():
        assert torch.equal(p, weights[name]), f"capture changed {name}"
    after = _optimizer_values(optimizer)
    if trained:
        assert after.keys() == moments.keys()
        assert all(torch.equal(after[key], moments[key]) for key in moments), "capture changed Adam's state"
    else:  # made by the warm-up, zero as Adam starts it, so that the graph can read it
        assert after and all(not value.any() for value in after.values())
    assert stepper.take_loss_sum() == 0.0 and not stepper.h.any() and not stepper.c.any()


def _logged_losses_and_checkpoint(run_dir: Path) -> tuple[list[float], dict]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if "loss" in r], load_checkpoint(run_dir)


@pytest.fixture
def replays(monkeypatch) -> list:
    seen, real = [], simulated_graphs.SimulatedGraph.replay
    monkeypatch.setattr(simulated_graphs.SimulatedGraph, "replay", lambda self: seen.append(self) or real(self))
    return seen


def _tiny(corpus_dir, out, **changes) -> TrainConfig:
    cfg = TrainConfig(data=str(corpus_dir), embed_size=16, hidden_size=32, epochs=2, batch_size=4, seq_len=5,
                      lr=0.01, log_interval=1, eval_batch_size=3, out=str(out), device="cpu")
    return dataclasses.replace(cfg, **changes)


def _train_simulating_graphs(monkeypatch, simulate: bool, *args, **kwargs):
    with monkeypatch.context() as patched:
        if simulate:
            patched.setenv(SIMULATE_ENV, "1")
        return train(*args, **kwargs)


@pytest.mark.parametrize("backend, amp", BACKENDS_AND_DTYPES)
def test_simulated_graph_training_equals_eager_training_bit_for_bit(corpus_dir, tmp_path, monkeypatch, replays,
                                                                   cpu_with_16_bit_units, backend, amp):
    # 2 epochs of 132 steps. Split runs stop at step 150, inside the second epoch, and resume the other
    # way (eager → graphs, graphs → eager), so a mid-epoch state and Adam's state cross in both directions.
    flags = {"backend": backend, "amp": "off" if amp is None else "bf16"}
    run = functools.partial(_train_simulating_graphs, monkeypatch)
    eager = run(False, _tiny(corpus_dir, tmp_path / "eager", **flags))
    graphed = run(True, _tiny(corpus_dir, tmp_path / "graphed", **flags))
    steps = [graph for graph in replays if graph.name == "_step"]
    assert len(steps) == 264 + 1, "every step is a replay (and one more for the start-up check)"
    assert len(replays) > len(steps), "validation replays its captured forward too"
    for first, then in ((False, True), (True, False)):
        split = tmp_path / f"split-{'graphs' if first else 'eager'}-first"
        run(first, _tiny(corpus_dir, split, max_steps=150, **flags))
        run(then, TrainConfig(), resume=str(split), overrides={"max_steps": 264})

    want_losses, want = _logged_losses_and_checkpoint(tmp_path / "eager")
    assert graphed.train_losses == eager.train_losses
    for name in ("graphed", "split-eager-first", "split-graphs-first"):
        losses, ckpt = _logged_losses_and_checkpoint(tmp_path / name)
        assert losses == want_losses, f"{name}: the logged training and validation losses differ"
        for key, value in want["model"].items():
            assert torch.equal(ckpt["model"][key], value), f"{name}: {key} differs from the eager run's"
        for index, state in want["optimizer"]["state"].items():
            for key, value in state.items():
                assert torch.equal(ckpt["optimizer"]["state"][index][key], value), f"{name}: Adam's {key} differs"
        capturable = name != "split-graphs-first"  # the flag follows the run, not the checkpoint it resumed
        assert all(g["capturable"] == capturable for g in ckpt["optimizer"]["param_groups"])


@pytest.mark.parametrize("backend, amp", BACKENDS_AND_DTYPES)
def test_validation_through_a_captured_forward_equals_eager_validation(corpus_dir, backend, amp):
    corpus = Corpus(corpus_dir)
    model = RNNLM(len(corpus.dictionary), 8, 16, backend=backend)
    valid, test = batchify(corpus.valid, 3), batchify(corpus.test, 3)
    captured = EvalForward(model, 3, 7, amp, graphs=SimulatedGraphs())
    assert captured.graph is not None and model.training, "capture records eval mode and gives training mode back"
    for split in (valid, test, valid):
        assert evaluate(model, split, 7, amp, forward=captured) == evaluate(model, split, 7, amp)


class FailingGraphs(SimulatedGraphs):
    """A capture that stops halfway, after the captured function ran, as an unsupported op would."""

    def capture(self, fn, buffers):
        fn()
        raise RuntimeError("operation not permitted when stream is capturing\nmore detail")


@pytest.mark.parametrize("trained", [False, True], ids=["fresh", "after-3-steps"])
def test_a_failed_capture_leaves_model_optimizer_and_gradients_untouched(corpus_dir, trained):
    model, _, windows = _setup(corpus_dir)
    optimizer = make_optimizer(model, 0.01, capturable=True)
    if trained:
        eager = TrainStep(model, optimizer, 4, 5, 0.5)
        for window in windows[:3]:
            eager.step(*window)
            eager.detach_state()
    weights = {name: p.detach().clone() for name, p in model.named_parameters()}
    grads = {name: None if p.grad is None else p.grad.clone() for name, p in model.named_parameters()}
    moments = _optimizer_values(optimizer)
    with pytest.raises(RuntimeError, match="not permitted when stream is capturing"):
        TrainStep(model, optimizer, 4, 5, 0.5, graphs=FailingGraphs())
    for name, p in model.named_parameters():
        assert torch.equal(p, weights[name]), f"{name} changed"
        assert (p.grad is None) if grads[name] is None else torch.equal(p.grad, grads[name]), f"grad {name} changed"
    after = _optimizer_values(optimizer)
    assert after.keys() == moments.keys() and all(torch.equal(after[k], moments[k]) for k in moments)


class DriftingGraphs(SimulatedGraphs):
    """Graphs that go wrong without raising: every replay adds 1 to the loss."""

    def capture(self, fn, buffers):
        graph = super().capture(fn, buffers)
        replay = graph.replay
        graph.replay = lambda: (replay(), buffers()["loss_sum"].add_(1.0))
        return graph


def _capture_that_loses_a_weight(monkeypatch):
    """What the old capture did to every parameter (zeroed it), done to one."""
    real = TrainStep._capture

    def capture(self, graph_api):
        real(self, graph_api)
        with torch.no_grad():
            self.model.linear.weight.zero_()

    monkeypatch.setattr(TrainStep, "_capture", capture)
    return SimulatedGraphs()


@pytest.mark.parametrize("graph_api, message", [
    (lambda patch: FailingGraphs(), "CUDA graphs off: the capture failed (operation not permitted when stream is "
                                    "capturing); training eagerly from the same weights"),
    (lambda patch: DriftingGraphs(), "CUDA graphs off: the first replayed loss"),
    (_capture_that_loses_a_weight, "CUDA graphs off: capture changed 1 parameter(s), first linear.weight"),
], ids=["capture-raises", "replayed-loss-differs", "capture-loses-a-weight"])
def test_the_trainer_falls_back_to_eager_steps_from_the_same_weights(corpus_dir, tmp_path, monkeypatch, capsys,
                                                                     graph_api, message):
    eager = train(_tiny(corpus_dir, tmp_path / "eager", max_steps=40))
    api = graph_api(monkeypatch)
    monkeypatch.setattr(step, "graph_api", lambda device: api)
    # As on a GPU, --backend auto picks another LSTM for graphed steps than for eager ones.
    monkeypatch.setattr(step, "resolve_backend", lambda backend, device, amp, graphed: "reference" if graphed
                        else "torch")
    made = []
    monkeypatch.setattr(step, "make_optimizer", lambda *a, **k: made.append(k["capturable"]) or make_optimizer(*a, **k))
    capsys.readouterr()
    fallback = train(_tiny(corpus_dir, tmp_path / "fallback", max_steps=40))
    out = capsys.readouterr().out
    assert message in out and len([line for line in out.splitlines() if "CUDA graphs off" in line]) == 1
    assert "from the same weights, LSTM backend torch" in out, "the fallback says the backend changed"
    assert "LSTM backend torch, eager steps" in out, "the run's summary line tells how it trains after the fallback"
    assert fallback.train_losses == eager.train_losses
    assert made == [True, False], "the eager fallback gets a new, non-capturable optimizer"
    ckpt = load_checkpoint(tmp_path / "fallback")
    assert not any(g["capturable"] for g in ckpt["optimizer"]["param_groups"])
    for name, value in load_checkpoint(tmp_path / "eager")["model"].items():
        assert torch.equal(ckpt["model"][name], value), name


def test_a_simulated_replay_refuses_a_buffer_rebound_since_capture(corpus_dir):
    model, _, windows = _setup(corpus_dir)
    optimizer = make_optimizer(model, 0.01, capturable=True)
    stepper = TrainStep(model, optimizer, 4, 5, 0.5, graphs=SimulatedGraphs())
    stepper.step(*windows[0])
    stepper.detach_state()
    optimizer.load_state_dict(copy.deepcopy(optimizer.state_dict()))  # new tensors, as from a checkpoint
    with pytest.raises(RuntimeError, match=r"buffer 'embed.weight.exp_avg' was rebound since capture"):
        stepper.step(*windows[1])


def test_a_simulated_capture_refuses_a_step_that_rebinds_its_own_buffers(corpus_dir):
    model, _, windows = _setup(corpus_dir)
    stepper = TrainStep(model, make_optimizer(model, 0.01, capturable=True), 4, 5, 0.5)
    stepper.free_grads = True  # zero_grad(set_to_none=True) inside the graph: backward allocates anew
    with pytest.raises(RuntimeError, match=r"'[\w.]+\.grad' was rebound by the captured function itself"):
        stepper._capture(SimulatedGraphs())


def test_capture_needs_a_capturable_optimizer(corpus_dir):
    model, optimizer, _ = _setup(corpus_dir)
    with pytest.raises(ValueError, match="capturable=True"):
        TrainStep(model, optimizer, 4, 5, 0.5, graphs=SimulatedGraphs())


WORLD = types.SimpleNamespace(enabled=False)


@pytest.mark.parametrize("changes, world, simulate, expected, said", [
    ({}, WORLD, False, None, ""),
    ({}, WORLD, True, "graphs", ""),
    ({"cuda_graphs": False}, WORLD, True, None, ""),
    ({}, types.SimpleNamespace(enabled=True), True, None, "DistributedDataParallel"),
    ({"amp": "fp16"}, WORLD, True, None, "fp16 needs a gradient scaler"),
    ({"teacher_forcing": 0.5}, WORLD, True, None, "scheduled sampling runs step by step"),
    ({"teacher_forcing_schedule": "linear"}, WORLD, True, None, "scheduled sampling runs step by step"),
], ids=["cpu", "simulated", "no-cuda-graphs", "ddp", "fp16", "free-running", "schedule"])
def test_which_runs_capture_their_step(monkeypatch, changes, world, simulate, expected, said):
    if simulate:
        monkeypatch.setenv(SIMULATE_ENV, "1")
    cfg = TrainConfig(device="cpu", **changes)
    scaler = torch.amp.GradScaler("cpu") if cfg.amp == "fp16" else None
    lines = []
    api = step._graphs_for(cfg, torch.device("cpu"), world, scaler, lines.append)
    assert isinstance(api, SimulatedGraphs) if expected else api is None
    assert said in " ".join(lines) and len(lines) == bool(said)




def test_the_cli_trains_with_cuda_graph_semantics_on_the_cpu_behind_the_test_switch(corpus_dir, tmp_path, monkeypatch,
                                                                                    capsys, replays):
    monkeypatch.setenv(SIMULATE_ENV, "1")
    with pytest.raises(SystemExit) as exit_info:
        run_main(train_main, ["--data", str(corpus_dir), "--out", str(tmp_path / "r"), "--device", "cpu",
                              "--cuda-graphs", "--embed-size", "8", "--hidden-size", "16", "--batch-size", "4",
                              "--seq-len", "5", "--eval-batch-size", "3", "--epochs", "1"])
    out = capsys.readouterr().out
    assert exit_info.value.code == 0
    assert "LSTM backend torch, CUDA graphs," in out and "CUDA graphs off" not in out
    assert sum(graph.name == "_step" for graph in replays) == 132 + 1


def test_simulated_graph_training_with_the_fused_kernel_equals_eager_training(corpus_dir, tmp_path, monkeypatch,
                                                                              cpu_with_16_bit_units):
    # The GPU's default: the Triton kernel (interpreted here) in bf16, graphed; fewer steps, since
    # every kernel program runs in Python.
    flags = {"backend": "triton", "amp": "bf16", "embed_size": 8, "hidden_size": 16}
    run = functools.partial(_train_simulating_graphs, monkeypatch)
    eager = run(False, _tiny(corpus_dir, tmp_path / "eager", max_steps=12, **flags))
    graphed = run(True, _tiny(corpus_dir, tmp_path / "graphed", max_steps=6, **flags))
    resumed = run(True, TrainConfig(), resume=str(tmp_path / "graphed"), overrides={"max_steps": 12})
    assert graphed.train_losses + resumed.train_losses == eager.train_losses
    want, got = load_checkpoint(tmp_path / "eager"), load_checkpoint(tmp_path / "graphed")
    for key, value in want["model"].items():
        assert torch.equal(got["model"][key], value), key
    assert got["state"][1].dtype == torch.float32, "c crosses the window edge in fp32"


REFUSED_IN_CAPTURE = {  # what each captured function does → what the refusal says
    "item": (lambda t: t.sum().item(), r"reads a tensor's value on the host \(\.item\(\)\)"),
    "bool": (lambda t: bool(t.sum() > 0), r"reads a tensor's value on the host \(aten"),
    "float": (lambda t: float(t.sum()), r"reads a tensor's value on the host \(aten"),
    "tolist": (lambda t: t.tolist(), r"\.tolist\(\)"),
    "numpy": (lambda t: t.numpy(), r"\.numpy\(\)"),
    "cpu": (lambda t: t.cpu(), r"copies a tensor to the host"),
    "torch.tensor": (lambda t: t.add_(torch.tensor([1.0, 2.0, 3.0])), r"copies Python data to the device"),
    "as_tensor": (lambda t: t.add_(torch.as_tensor([1.0, 2.0, 3.0])), r"copies Python data to the device"),
    "asarray": (lambda t: t.add_(torch.asarray([1.0, 2.0, 3.0])), r"copies Python data to the device"),
    "new_tensor": (lambda t: t.add_(t.new_tensor([1.0, 2.0, 3.0])), r"copies Python data to the device"),
    "numpy.asarray": (lambda t: __import__("numpy").asarray(t), r"\(numpy.asarray\)"),
    "nonzero": (lambda t: torch.nonzero(t), r"shape depends on values \(aten.nonzero"),
    "masked-select": (lambda t: t[t > 0], r"shape depends on values \(aten.index.Tensor"),
    "masked-assign": (lambda t: t.__setitem__(t > 0, 0.0), r"shape depends on values \(aten.index_put_"),
}


@pytest.mark.parametrize("case", REFUSED_IN_CAPTURE)
def test_a_simulated_capture_refuses_what_a_cuda_graph_capture_refuses(case):
    do, message = REFUSED_IN_CAPTURE[case]
    t = torch.tensor([0.5, -1.0, 2.0])
    with pytest.raises(RuntimeError, match=message):
        SimulatedGraphs().capture(lambda: (t.mul_(3.0), do(t)), lambda: {"t": t})
    assert t.tolist() == [0.5, -1.0, 2.0], "a capture runs nothing: what it wrote is put back, also when refused"


def test_a_simulated_capture_records_the_fused_kernel_as_ops_and_refuses_a_bare_launch():
    from fastlm.kernels.fused_lstm import lstm_forward, lstm_forward_op

    torch.manual_seed(0)
    inputs = [torch.randn(shape) for shape in ((2, 2, 4), (2, 16), (2, 16), (64, 4), (64, 16), (64,), (64,))]
    with pytest.raises(RuntimeError, match="launches the Triton kernel _lstm_fwd_step outside a torch custom op"):
        SimulatedGraphs().capture(lambda: lstm_forward(*inputs), dict)
    out = torch.empty(2, 2, 16)
    graph = SimulatedGraphs().capture(lambda: out.copy_(lstm_forward_op(*inputs)[0]), lambda: {"out": out})
    graph.replay()
    assert torch.equal(out, lstm_forward_op(*inputs)[0]), "the replayed record ran the kernel"


def test_a_simulated_capture_takes_what_a_cuda_graph_capture_takes():
    # A CPU scalar is read as a value at capture (no copy); an in-place view changes metadata once.
    t, out = torch.ones(3), torch.zeros(1, 3)

    def step():
        y = t * torch.tensor(2.0)
        y.unsqueeze_(0)
        out.copy_(y + 1.0)

    graph = SimulatedGraphs().capture(step, lambda: {"t": t, "out": out})
    for want in (3.0, 5.0):
        graph.replay()
        assert out.tolist() == [[want] * 3]
        t.mul_(2.0)


def test_a_simulated_replay_repeats_the_recorded_ops_not_the_python():
    total, scale, calls = torch.ones(()), [2.0], []

    def step():
        calls.append(1)  # a Python side effect
        total.mul_(scale[0])  # a Python number, read at capture
        return total + 1.0  # allocated during capture: the graph's pool

    graph = SimulatedGraphs().capture(lambda: calls.append(step()), lambda: {"total": total})
    assert total.item() == 1.0 and len(calls) == 2, "capture ran the Python once and left total as it was"
    pooled = calls[1]
    assert torch.isnan(pooled), "memory allocated by a capture holds nothing until the first replay"
    scale[0] = 3.0
    for want in (2.0, 4.0, 8.0):
        graph.replay()
        assert total.item() == want, "the captured 2.0 is replayed, not the 3.0 set since"
        assert pooled.item() == want + 1.0, "the pool is rewritten in place by each replay"
    assert len(calls) == 2, "replay does not run the Python"


def test_a_replayed_step_keeps_the_learning_rate_it_was_captured_with(corpus_dir):
    # Why TrainStep refuses a changed rate (test_regularisation): the graph would go on using the old one.
    model, _, windows = _setup(corpus_dir)
    optimizer = make_optimizer(model, 1.0, capturable=True, kind="sgd")
    stepper = TrainStep(model, optimizer, 4, 5, 0.5, graphs=SimulatedGraphs())
    stepper.reset_state()
    stepper.inputs.copy_(windows[0][0])
    stepper.targets.copy_(windows[0][1])
    before = [p.detach().clone() for p in model.parameters()]
    optimizer.param_groups[0]["lr"] = 0.5
    stepper.graph.replay()
    replayed = [p.detach() - b for p, b in zip(model.parameters(), before)]
    with torch.no_grad():
        for p, b in zip(model.parameters(), before):
            p.copy_(b)
    optimizer.param_groups[0]["lr"] = 1.0
    stepper.reset_state()
    stepper._step()
    for got, (name, p), b in zip(replayed, model.named_parameters(), before):
        assert_rel_close(got, p.detach() - b, 1e-6, f"{name}'s replayed update against an eager step at lr 1.0")


def test_simulated_replays_draw_fresh_dropout_masks_equal_to_eager_ones():
    ones, out = torch.ones(64), torch.zeros(64)
    step = lambda: out.copy_(torch.nn.functional.dropout(ones, 0.5))  # noqa: E731
    graph = SimulatedGraphs().capture(step, lambda: {"ones": ones, "out": out})
    torch.manual_seed(7)
    graph.replay()
    first = out.clone()
    graph.replay()
    assert not torch.equal(out, first), "each replay draws a new mask"
    torch.manual_seed(7)
    step()
    assert torch.equal(out, first), "the replay drew the mask an eager step draws from the same generator state"


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="this torch build has no oneDNN")
def test_onednn_lstm_backward_survives_record_and_replay():
    # oneDNN's LSTM keeps its backward workspace only in grad mode: a record replayed with grad mode off
    # gave LSTM gradients up to 40% off. Each op is replayed in the grad mode it was recorded in.
    torch.manual_seed(0)
    model = RNNLM(14, 8, 16, backend="torch")
    tokens = torch.randint(0, 14, (3, 4))

    def backward():
        model.zero_grad(set_to_none=False)
        logits, _ = model(tokens, model.init_state(3))
        torch.nn.functional.cross_entropy(logits, tokens.reshape(-1)).backward()

    backward()  # allocates the gradients the record then writes
    recorder = simulated_graphs._Recorder()
    with recorder:
        backward()
    assert torch.ops.aten.mkldnn_rnn_layer_backward.default in {op.func for op in recorder.ops}
    eager = {name: p.grad.clone() for name, p in model.named_parameters()}
    recorder.undo()
    simulated_graphs.SimulatedGraph("backward", recorder.ops, dict).replay()
    for name, p in model.named_parameters():
        assert torch.equal(p.grad, eager[name]), f"{name}'s replayed gradient differs from eager"


def test_cuda_graphs_work_on_their_device_and_wait_for_the_warm_up_even_when_it_fails(monkeypatch):
    # torch.cuda's graph API replaced by recorders: CudaGraphs' own lines run on the CPU.
    calls = []

    class Stream:
        def __init__(self, device=None):
            self.device = device

        def wait_stream(self, other):
            calls.append(("wait", self.device, other.device))

    @contextlib.contextmanager
    def recorded(name, value):
        calls.append((name, value))
        yield

    monkeypatch.setattr(torch.cuda, "Stream", Stream)
    monkeypatch.setattr(torch.cuda, "current_stream", Stream)
    monkeypatch.setattr(torch.cuda, "stream", lambda stream: recorded("on stream", stream.device))
    monkeypatch.setattr(torch.cuda, "device", lambda device: recorded("device", device))
    monkeypatch.setattr(torch.cuda, "CUDAGraph", lambda: "graph")
    monkeypatch.setattr(torch.cuda, "graph", lambda graph, stream: recorded("capture on", stream.device))
    gpu1 = torch.device("cuda", 1)
    api = graphs.graph_api(gpu1)
    assert isinstance(api, graphs.CudaGraphs) and api.device == gpu1

    with pytest.raises(ValueError, match="warm-up failed"), api.side_stream():
        raise ValueError("warm-up failed")
    assert calls == [("device", gpu1), ("wait", gpu1, gpu1), ("on stream", gpu1), ("wait", gpu1, gpu1)]
    calls.clear()
    ran = []
    assert api.capture(lambda: ran.append(1), dict) == "graph" and ran == [1]
    assert calls == [("device", gpu1), ("capture on", gpu1)]


def test_the_trainer_makes_its_cuda_device_the_current_one(monkeypatch):
    chosen = []
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    use_device(torch.device("cpu"))
    use_device(torch.device("cuda", 1))
    assert chosen == [torch.device("cuda", 1)]
