"""The values a training step reads and writes, saved to be put back exactly: what lets a capture
(whose warm-up runs real steps) and the self-check's trial steps leave the run as they found it."""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from fastlm.device import rng_state, set_rng_state

if TYPE_CHECKING:
    from fastlm.training.step import TrainStep


class Snapshot:
    """The values of the parameters, gradients, optimizer state and carried state of a step, to put
    back exactly. Tensors are held as the live objects (never `p.data`, a new object per call)."""

    def __init__(self, step: TrainStep):
        self.named = [(name, p, p.detach().clone()) for name, p in step.model.named_parameters()]
        self.optimizer_state = {p: {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in s.items()}
                                for p, s in step.optimizer.state.items()}
        self.grads = [(p, None if p.grad is None else p.grad.clone()) for _, p, _ in self.named]
        self.carried = [(t, t.clone()) for t in (step.h, step.c, step.loss_sum)]
        # The random generators too: warm-up and trial steps draw dropout masks. Put back, the next step
        # (a replay, which draws from the generator's state at that moment, or an eager step) draws the
        # masks an eager run would, and each replay advances the generator, so masks stay fresh.
        self.rng = rng_state()

    def changed_parameters(self) -> list[str]:
        return [name for name, p, saved in self.named if not torch.equal(p.detach(), saved)]

    def updates(self) -> list[torch.Tensor]:
        """How far each parameter moved since the snapshot."""
        return [p.detach() - saved for _, p, saved in self.named]

    @torch.no_grad()
    def restore_keeping_new_state(self, step: TrainStep) -> None:
        """Put every value back; optimizer state made since the snapshot stays, zeroed as Adam starts
        it, since a captured graph reads those very tensors."""
        self._restore(step, keep_new_state=True)

    @torch.no_grad()
    def restore_all(self, step: TrainStep) -> None:
        """Put every value back and remove optimizer state made since the snapshot, gradients too:
        the step is as it was before."""
        self._restore(step, keep_new_state=False)
        for p, grad in self.grads:
            p.grad = grad

    def restore_rng(self) -> None:
        set_rng_state(self.rng)

    def _restore(self, step: TrainStep, keep_new_state: bool) -> None:
        self.restore_rng()
        for _, p, saved in self.named:
            p.copy_(saved)
        for t, saved in self.carried:
            t.copy_(saved)
        step.awaiting_detach = False  # the state a step starts from is back
        for p, state in list(step.optimizer.state.items()):
            saved = self.optimizer_state.get(p, {})
            for key, value in list(state.items()):
                if key in saved and isinstance(value, torch.Tensor):
                    value.copy_(saved[key])
                elif key in saved:
                    state[key] = saved[key]
                elif keep_new_state and isinstance(value, torch.Tensor):
                    value.zero_()
                else:
                    del state[key]
            if not state:
                del step.optimizer.state[p]
