"""Teacher forcing vs free running: the step against a hand-written float64 reference."""
import math

import pytest
import torch
import torch.nn.functional as F
from helpers import TOLERANCE, assert_rel_close, train_step
from torch import nn

from fastlm.config import SCHEDULES
from fastlm.models.lm import RNNLM
from fastlm.training.scheduled_sampling import PROBABILITY, free_running_step, teacher_forcing_probability

V, E, H, B, T = 11, 6, 8, 3, 5


@pytest.mark.parametrize("schedule, at_half, at_end", [
    ("constant", 0.8, 0.8), ("linear", 0.4, 0.0), ("exponential", 0.08, 0.008), ("inverse-sigmoid", 0.4, 0.8 / (1 + math.exp(5))),
])
def test_schedules(schedule, at_half, at_end):
    p = lambda s: teacher_forcing_probability(0.8, schedule, s)
    assert p(0.0) == pytest.approx(0.8 if schedule != "inverse-sigmoid" else 0.8 / (1 + math.exp(-5)))
    assert p(0.5) == pytest.approx(at_half) and p(1.0) == pytest.approx(at_end)
    values = [p(s / 20) for s in range(21)]
    assert all(a >= b for a, b in zip(values, values[1:]))
    assert tuple(PROBABILITY) == SCHEDULES == ("constant", "linear", "exponential", "inverse-sigmoid")


def _setup(backend="reference", dtype=torch.float64):
    torch.manual_seed(0)
    model = RNNLM(V, E, H, backend=backend).to(dtype)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # lr 0: the weights stay, the gradients are kept
    inputs, targets = torch.randint(0, V, (B, T)), torch.randint(0, V, (B, T))
    state = tuple(torch.randn(1, B, H, dtype=dtype) for _ in range(2))
    return model, optimizer, inputs, targets, state


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def test_probability_one_is_teacher_forcing():
    model, optimizer, inputs, targets, state = _setup()
    loss_tf, state_tf = train_step(model, optimizer, inputs, targets, state, clip=1e9)
    grads_tf = _grads(model)
    loss_fr, state_fr, _ = free_running_step(model, optimizer, inputs, targets, state, clip=1e9, teacher_forcing=1.0)
    assert abs(loss_tf.item() - loss_fr.item()) < 1e-12
    for name, g in _grads(model).items():
        assert_rel_close(g, grads_tf[name], 1e-10, name)
    assert_rel_close(state_fr[0], state_tf[0], 1e-10, "state")


def test_free_running_matches_a_hand_written_unrolled_reference():
    model, optimizer, inputs, targets, state = _setup()
    # Reference: nn modules, one time step at a time, the arg-max fed back, the recurrence not cut.
    embed, linear = nn.Embedding(V, E).double(), nn.Linear(H, V).double()
    cell = nn.LSTM(E, H, batch_first=True).double()
    embed.load_state_dict(model.embed.state_dict())
    linear.load_state_dict(model.linear.state_dict())
    cell.load_state_dict(model.lstm.state_dict())
    word, (h, c), logits = inputs[:, 0], state, []
    for t in range(T):
        out, (h, c) = cell(embed(word)[:, None], (h, c))
        logits.append(linear(out[:, 0]))
        word = logits[-1].argmax(-1)
    want = F.cross_entropy(torch.stack(logits, 1).reshape(B * T, V), targets.reshape(-1))
    want.backward()

    calls = []
    step = optimizer.step
    optimizer.step = lambda *a, **k: (calls.append(1), step(*a, **k))[1]
    got, _, _ = free_running_step(model, optimizer, inputs, targets, state, clip=1e9, teacher_forcing=0.0)
    assert len(calls) == 1, "one optimizer step per window"
    assert abs(got.item() - want.item()) < 1e-12
    reference = {"embed.weight": embed.weight.grad, "linear.weight": linear.weight.grad,
                 "linear.bias": linear.bias.grad, **{f"lstm.{n}": p.grad for n, p in cell.named_parameters()}}
    for name, g in _grads(model).items():
        assert_rel_close(g, reference[name], 1e-10, name)


def test_free_running_carries_the_last_prediction_into_the_next_window():
    model, optimizer, inputs, targets, state = _setup()
    second_inputs, second_targets = torch.randint(0, V, (B, T)), torch.randint(0, V, (B, T))
    # Reference: one unbroken free run over both windows, the arg-max fed back at every step.
    word, (h, c), logits = inputs[:, 0], state, []
    with torch.no_grad():
        for _ in range(2 * T):
            step_logits, (h, c) = model(word[:, None], (h, c))
            logits.append(step_logits)
            word = step_logits.argmax(-1)
    want = F.cross_entropy(torch.stack(logits[T:], 1).reshape(B * T, V), second_targets.reshape(-1))

    _, state, last = free_running_step(model, optimizer, inputs, targets, state, clip=1e9, teacher_forcing=0.0)
    assert torch.equal(last, logits[T - 1].argmax(-1))
    got, _, _ = free_running_step(model, optimizer, second_inputs, second_targets, state, clip=1e9,
                                  teacher_forcing=0.0, fed_back=last)
    assert abs(got.item() - want.item()) < 1e-12
    # Without a prediction to carry (an epoch's first window) the true first word is fed.
    from_truth, _, _ = free_running_step(model, optimizer, second_inputs, second_targets, state, clip=1e9,
                                         teacher_forcing=0.0)
    assert abs(from_truth.item() - want.item()) > 1e-6


def test_mixed_feeding_is_the_same_on_the_triton_kernel():
    results = []
    for backend in ("reference", "triton"):
        model, optimizer, inputs, targets, state = _setup(backend, torch.float32)
        torch.manual_seed(5)  # the same coin flips and samples for both
        loss, _, _ = free_running_step(model, optimizer, inputs, targets, state, clip=1e9, teacher_forcing=0.5,
                                    token="sample")
        results.append((loss, _grads(model)))
    (loss_ref, grads_ref), (loss_triton, grads_triton) = results
    assert abs(loss_ref.item() - loss_triton.item()) < 1e-5
    for name in grads_ref:
        assert_rel_close(grads_triton[name], grads_ref[name], TOLERANCE[torch.float32], name)
