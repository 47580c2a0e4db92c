"""What detach saves: exact saved-tensor bytes, and gradients against full BPTT in float64."""
import pytest
import torch
import torch.nn.functional as F
from helpers import assert_rel_close
from torch import nn

from fastlm.experiments.autograd_memory import (
    FASTLM_ARM,
    USER_LOOPS,
    SavedTensorMeter,
    count_graph_nodes,
    run_chunks,
    true_last_window_gradient,
    user_loops_without_detach,
)
from fastlm.models.lm import RNNLM

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
        assert (meter.live_bytes, meter.snapshot_bytes, meter.activation_bytes) == (80, 40, 40)
        with torch.no_grad():
            w.add_(1.0)  # the optimizer's in-place update does not disturb the snapshot
        y.backward()
        assert meter.live_bytes == 0
    assert torch.allclose(x.grad, w.detach() - 1.0)  # the gradient used the weights as saved


def test_a_parameter_saved_many_times_in_a_window_is_copied_once():
    x, w = torch.randn(3, 10, requires_grad=True), nn.Parameter(torch.randn(10, 4))
    with SavedTensorMeter([w], snapshot_parameters=True) as meter:
        first = [(x[i:i + 1] @ w).sum() for i in range(3)]  # mm saves a view of w three times
        assert meter.snapshot_bytes == 160
        meter.new_window()
        second = (x @ w.t().t()).sum()  # another view of w, in a new window: a second copy
        assert meter.snapshot_bytes == 320
        with torch.no_grad():
            w.mul_(2.0)  # an in-place change that bumps the version: copied again, even within the window
        third = (x @ w).sum()
        assert meter.snapshot_bytes == 480
        del first
        assert meter.snapshot_bytes == 320  # the first window's copy is freed with the last graph holding it
        (second + third).backward()
        assert meter.live_bytes == 0
    assert torch.allclose(x.grad, (w.detach() / 2 + w.detach()).sum(1).expand(3, 10))


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
    embed, linear = nn.Embedding(V, E).double(), nn.Linear(H, V).double()
    lstm = nn.LSTM(E, H, batch_first=True).double()
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


@pytest.mark.parametrize("backend", ["reference", "torch"])
@pytest.mark.parametrize("fused", [False, True], ids=["adam", "fused-adam"])
def test_the_last_windows_gradient_is_true_bptt_with_each_windows_weights(backend, fused):
    # Fused Adam does not bump the parameters' versions: the meter must copy them per window anyway.
    windows, _ = _windows(3)
    starts = []
    for k in range(len(windows) + 1):  # window k + 1 starts from the weights training on k windows leaves
        model = _model(backend)
        if k:
            run_chunks(model, torch.optim.Adam(model.parameters(), lr=0.1, fused=fused), windows[:k], False, 1e9)
        starts.append({name: w.detach().clone() for name, w in model.state_dict().items()})
    expected = true_last_window_gradient(starts[:-1], windows)
    assert not torch.equal(starts[0]["lstm.weight_hh_l0"], starts[2]["lstm.weight_hh_l0"])
    for name, p in model.named_parameters():
        assert_rel_close(p.grad, expected[name], 1e-10, name)


def _saved_parameter_bytes(model, backend):
    """The parameters each LSTM backend saves for backward: W_ih and W_hh; torch's kernel (oneDNN on
    the CPU) saves the biases as well."""
    names = ["weight_ih_l0", "weight_hh_l0"] + (["bias_ih_l0", "bias_hh_l0"] if backend == "torch" else [])
    return sum(getattr(model.lstm, name).nbytes for name in names)


@pytest.mark.parametrize("backend", ["reference", "torch", "triton"])
def test_each_window_copies_each_saved_parameter_once_whatever_the_backend(backend):
    windows, _ = _windows(3)
    torch.manual_seed(0)
    model = RNNLM(V, E, H, backend=backend)  # float32: the triton kernel has no float64
    measured = run_chunks(model, torch.optim.Adam(model.parameters(), lr=0.1, fused=True), windows, False, 1.0)
    snapshots = [m.snapshot_bytes for m in measured]
    # The reference backend saves a view of W_hh at every time step; still one copy per window.
    assert {b - a for a, b in zip(snapshots, snapshots[1:])} == {_saved_parameter_bytes(model, backend)}
    # Window 1's graph also holds the output layer's weight until its loss is dropped.
    assert snapshots[0] == _saved_parameter_bytes(model, backend) + model.linear.weight.nbytes
    assert all(m.graph_bytes == m.activation_bytes + m.snapshot_bytes for m in measured)


def test_what_user_loops_without_detach_do():
    outcomes = {outcome.loop: outcome for outcome in user_loops_without_detach(windows=2, lr=0.1)}
    plain, retained, fused = (outcomes[name] for name in USER_LOOPS)
    assert plain.failed_at_window == 2 and "backward through the graph a second time" in plain.error
    assert retained.failed_at_window == 2 and "modified by an inplace operation" in retained.error
    assert retained.step_bumps_version is True
    # Fused Adam runs silently, back-propagating window 1 with the weights already updated.
    assert fused.failed_at_window is None and fused.error is None and fused.step_bumps_version is False
    assert fused.gradient_error > 1e-3
    assert outcomes[FASTLM_ARM].failed_at_window is None and outcomes[FASTLM_ARM].gradient_error < 1e-5
    torch.manual_seed(0)
    first_draw = torch.rand(1)
    torch.manual_seed(0)
    user_loops_without_detach()
    assert torch.equal(torch.rand(1), first_draw)  # the caller's random stream is left alone


def test_count_graph_nodes_grows_without_detach():
    model = _model()
    tokens = torch.randint(0, V, (1, 7))
    _, state = model(tokens[:, :3])
    with_state = F.cross_entropy(model(tokens[:, 3:6], state)[0], tokens[0, 4:7])
    cut = F.cross_entropy(model(tokens[:, 3:6], tuple(s.detach() for s in state))[0], tokens[0, 4:7])
    assert count_graph_nodes(with_state) > count_graph_nodes(cut) > 0


def _training_losses(detach, windows, optimizer=lambda params: torch.optim.Adam(params, lr=0.1)):
    model = _model("torch")
    return [m.loss for m in run_chunks(model, optimizer(model.parameters()), windows, detach, clip=1e9)]


def test_the_arms_losses_agree_until_a_gradient_has_crossed_a_window_edge():
    windows, _ = _windows(5)
    detached, full = _training_losses(True, windows), _training_losses(False, windows)
    # Window 1's gradient has no earlier window to reach, so the first update is the same in both arms;
    # window 2's loss comes before its own update. Window 2's gradient crosses the edge: it differs.
    assert detached[:2] == full[:2]
    assert all(a != b for a, b in zip(detached[2:], full[2:])), (detached, full)


def _full_bptt_losses(start: dict, windows, lr: float) -> list[float]:
    """Float64 training with torch's own modules, no fastlm code: window k's loss back-propagated
    through windows 1 to k, each run with the weights it had (a copy kept per window), the gradient
    summed over the copies, then a plain Adam step."""
    modules = nn.ModuleDict({"embed": nn.Embedding(V, E), "lstm": nn.LSTM(E, H, batch_first=True),
                             "linear": nn.Linear(H, V)}).double()
    modules.load_state_dict(start)
    optimizer, copies, losses, state = torch.optim.Adam(modules.parameters(), lr=lr), [], [], None
    for inputs, targets in windows:
        copy = {name: p.detach().clone().requires_grad_() for name, p in modules.named_parameters()}
        copies.append(copy)
        run = lambda name, *args: torch.func.functional_call(modules[name], {
            key.split(".", 1)[1]: value for key, value in copy.items() if key.startswith(name + ".")}, args)
        out, state = run("lstm", run("embed", inputs), state)
        loss = F.cross_entropy(run("linear", out).reshape(-1, V), targets.reshape(-1))
        loss.backward(retain_graph=True)
        for name, p in modules.named_parameters():
            p.grad = sum(c[name].grad for c in copies if c[name].grad is not None)
        for c in copies:
            for p in c.values():
                p.grad = None
        optimizer.step()
        losses.append(loss.item())
    return losses


def test_the_no_detach_arms_losses_are_full_bptt_training_in_float64():
    windows, _ = _windows(4)
    start = {name: w.clone() for name, w in _model("torch").state_dict().items()}
    expected = _full_bptt_losses(start, windows, lr=0.1)
    got = _training_losses(False, windows)
    assert_rel_close(torch.tensor(got), torch.tensor(expected), 1e-10, "losses")
    assert expected[3] != _training_losses(True, windows)[3]  # the reference is not the detach arm's
