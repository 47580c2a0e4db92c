"""The optimizer, and the one update that every training step ends with."""
from __future__ import annotations

import torch
from torch import nn


def make_optimizer(model: nn.Module, lr: float, capturable: bool, state: dict | None = None,
                   kind: str = "adam") -> torch.optim.Optimizer:
    """The optimizer, optionally from a saved state (its learning rate included).

    `adam`: fused (all parameters in one kernel, not one per parameter); `capturable`
    keeps its step count on the device, which a CUDA graph needs, and is this run's choice, not the
    saved run's, so it is set after loading. `sgd`: plain SGD, p ← p − lr·g, as the PyTorch
    word-language-model example updates (a CUDA graph can replay it as it is).
    """
    if kind == "sgd":
        optimizer = torch.optim.SGD(model.parameters(), lr=lr, foreach=True)
    else:
        optimizer = torch.optim.Adam(model.parameters(), lr=lr, fused=True, capturable=capturable)
    if state is not None:
        optimizer.load_state_dict(state)
        for group in optimizer.param_groups:
            if "capturable" in group:
                group["capturable"] = capturable
    return optimizer


def update(model: nn.Module, optimizer: torch.optim.Optimizer, loss: torch.Tensor, clip: float, scaler=None,
           free_grads: bool = True, retain_graph: bool = False) -> None:
    """Zero the gradients, back-propagate `loss`, clip the global gradient norm to `clip`, step.

    `scaler` (a GradScaler, for float16) scales the loss and skips the step when the gradients
    overflowed. `free_grads=False` zeroes the gradients in place instead of freeing them, for a CUDA
    graph that reads and writes the gradient memory it was captured with. `retain_graph` keeps the
    graph for a later backward through it (training without detach).
    """
    optimizer.zero_grad(set_to_none=free_grads)
    if scaler is None:
        loss.backward(retain_graph=retain_graph)
    else:
        scaler.scale(loss).backward(retain_graph=retain_graph)
        scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
    torch.nn.utils.clip_grad_norm_(model.parameters(), clip, foreach=True)
    if scaler is None:
        optimizer.step()
    else:
        scaler.step(optimizer)
        scaler.update()
