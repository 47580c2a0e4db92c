"""One assertion for tensors: relative error ‖a − b‖ / ‖b‖, reporting where and how much they differ."""
from __future__ import annotations

import torch

# Relative-error tolerance (Frobenius norm of the difference over that of the reference) per dtype.
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 1e-2}


def assert_rel_close(actual: torch.Tensor, expected: torch.Tensor, tol: float, name: str = "tensor") -> None:
    assert actual is not None, f"{name}: no value (gradient missing?)"
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a, b = actual.detach().double().cpu(), expected.detach().double().cpu()
    bad = ~torch.isfinite(a)
    if bad.any():
        first = tuple(int(i) for i in bad.nonzero()[0])
        raise AssertionError(f"{name}: {int(bad.sum())} non-finite element(s), first at {first} = {a[first].item()}")
    diff = (a - b).abs()
    rel = (a - b).norm().item() / max(b.norm().item(), 1e-30)
    if rel > tol:
        worst = tuple(int(i) for i in (diff == diff.max()).nonzero()[0])
        raise AssertionError(
            f"{name}: relative error {rel:.3e} > {tol:.0e}; worst element {worst}: "
            f"{a[worst].item():.6g} vs {b[worst].item():.6g} (|diff| {diff.max().item():.3e}), "
            f"{int((diff > tol * b.abs().max()).sum())} of {b.numel()} elements off"
        )


def train_step(model, optimizer, inputs, targets, state, clip: float):
    """The plain TBPTT step written out by hand, the oracle for fastlm's steps: cut the graph at the
    window edge, forward, loss, backward, clip, update. Returns the loss and the new state."""
    import torch.nn.functional as F

    state = tuple(s.detach() for s in state)
    logits, state = model(inputs, state)
    loss = F.cross_entropy(logits, targets.reshape(-1))
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), clip, foreach=True)
    optimizer.step()
    return loss, state
