"""What detach saves: exact saved-tensor bytes, and gradients against full BPTT in float64."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastlm.graph_memory import SavedTensorMeter, count_graph_nodes, run_chunks
from fastlm.model import RNNLM
from helpers import assert_rel_close

V, E, H, B, T = 13, 5, 7, 3, 4


def test_meter_counts_known_saved_tensors_exactly():
    x = torch.randn(10, requires_grad=True)
    w = torch.randn(10, requires_grad=True)
    with SavedTensorMeter() as meter:
        y = (x * w).sum()  # mul saves both operands: 2 × 10 float32
        assert meter.live_bytes == 80
        z = torch.exp(x).sum()  # exp saves its result: 10 more floats
        assert meter.live_bytes == 120
        y.backward()
        assert meter.live_bytes == 40  # y's graph is freed by its backward
        del z
        assert meter.live_bytes == 0


def test_parameters_count_only_as_snapshots():
    x, w = torch.randn(10, requires_grad=True), nn.Parameter(torch.randn(10))
    with SavedTensorMeter([w]) as meter:
        y = (x * w).sum()
        assert meter.live_bytes == 40  # x; the parameter itself is no extra memory
    with SavedTensorMeter([w], snapshot_parameters=True) as meter:
        y = (x * w).sum()
        assert meter.live_bytes == 80
        with torch.no_grad():
            w.add_(1.0)  # the optimizer's in-place update does not disturb the snapshot
        y.backward()
        assert meter.live_bytes == 0
    assert torch.allclose(x.grad, w.detach() - 1.0)  # the gradient used the weights as saved


def _windows(k):
    torch.manual_seed(1)
    data = torch.randint(0, V, (B, k * T + 1))
    return [(data[:, i * T:(i + 1) * T], data[:, i * T + 1:(i + 1) * T + 1]) for i in range(k)], data


def _model(backend="reference"):
    torch.manual_seed(0)
    return RNNLM(V, E, H, backend=backend).double()


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_flat_with_detach_and_linear_without(backend):
    windows, _ = _windows(5)
    sizes = {}
    for detach in (True, False):
        model = _model(backend)
        optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
        sizes[detach] = [m.graph_bytes for m in run_chunks(model, optimizer, windows, detach, clip=1.0)]
    assert len(set(sizes[True])) == 1 and sizes[True][0] > 0
    steps = [b - a for a, b in zip(sizes[False], sizes[False][1:])]
    # Without detach the first window also holds the weight snapshots its graph will need later.
    assert sizes[False][0] > sizes[True][0] and len(set(steps)) == 1 and steps[0] > 0


def _reference_grads(model, tokens, loss_slice, initial=None):
    """Float64 nn modules over `tokens` at once (full BPTT); loss on the outputs in `loss_slice`."""
    embed, linear, lstm = nn.Embedding(V, E).double(), nn.Linear(H, V).double(), nn.LSTM(E, H, batch_first=True).double()
    embed.load_state_dict(model.embed.state_dict())
    linear.load_state_dict(model.linear.state_dict())
    lstm.load_state_dict(model.lstm.state_dict())
    out, _ = lstm(embed(tokens[:, :-1]), initial)
    logits = linear(out[:, loss_slice])
    F.cross_entropy(logits.reshape(-1, V), tokens[:, 1:][:, loss_slice].reshape(-1)).backward()
    return {"embed.weight": embed.weight.grad, "linear.weight": linear.weight.grad, "linear.bias": linear.bias.grad,
            **{f"lstm.{n}": p.grad for n, p in lstm.named_parameters()}}


@pytest.mark.parametrize("detach", [True, False], ids=["detach", "no-detach"])
def test_one_window_is_full_bptt(detach):
    windows, data = _windows(1)
    model = _model()
    run_chunks(model, torch.optim.SGD(model.parameters(), lr=0.0), windows, detach, clip=1e9)
    expected = _reference_grads(model, data, slice(0, T))
    for name, p in model.named_parameters():
        assert_rel_close(p.grad, expected[name], 1e-10, name)


def test_without_detach_the_second_window_back_propagates_through_the_first():
    windows, data = _windows(2)
    model = _model()
    run_chunks(model, torch.optim.SGD(model.parameters(), lr=0.0), windows, detach=False, clip=1e9)
    expected = _reference_grads(model, data, slice(T, 2 * T))  # loss of window 2, BPTT over both windows
    for name, p in model.named_parameters():
        assert_rel_close(p.grad, expected[name], 1e-10, name)


def test_retained_graphs_use_the_weights_of_their_window():
    # With a real optimizer step between windows, the second backward still runs (no in-place error).
    windows, _ = _windows(3)
    model = _model()
    measurements = run_chunks(model, torch.optim.Adam(model.parameters(), lr=0.1), windows, False, clip=1.0)
    assert len(measurements) == 3 and all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_count_graph_nodes_grows_without_detach():
    model = _model()
    tokens = torch.randint(0, V, (1, 7))
    _, state = model(tokens[:, :3])
    with_state = F.cross_entropy(model(tokens[:, 3:6], state)[0], tokens[0, 4:7])
    cut = F.cross_entropy(model(tokens[:, 3:6], tuple(s.detach() for s in state))[0], tokens[0, 4:7])
    assert count_graph_nodes(with_state) > count_graph_nodes(cut) > 0
