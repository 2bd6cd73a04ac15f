"""Exponential moving average of a module's weights (used for sampling in stage 2)."""
from __future__ import annotations

import copy
from contextlib import contextmanager

import torch
from torch import nn


class EMA(nn.Module):
    """Shadow copy of `module` updated as  θ_ema ← d·θ_ema + (1−d)·θ.

    With `warmup`, d = min(decay, (1 + n) / (10 + n)) after n updates, so early weights are not
    frozen at their random initialisation. Every rank calls `update` (DDP keeps weights identical, so
    the EMAs stay identical; updating on rank 0 only is a known fault elsewhere).
    """

    def __init__(self, module: nn.Module, decay: float = 0.9999, warmup: bool = True):
        super().__init__()
        self.decay, self.warmup = decay, warmup
        self.shadow = copy.deepcopy(module).eval().requires_grad_(False)
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))

    def current_decay(self) -> float:
        n = int(self.num_updates)
        return min(self.decay, (1 + n) / (10 + n)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        d = self.current_decay()
        ema_params = list(self.shadow.parameters())
        params = [p.detach() for p in module.parameters()]
        torch._foreach_lerp_(ema_params, params, 1.0 - d)
        for b_ema, b in zip(self.shadow.buffers(), module.buffers()):
            b_ema.copy_(b)
        self.num_updates += 1

    @contextmanager
    def swapped_into(self, module: nn.Module):
        """Temporarily load the EMA weights into `module` (for evaluation / sampling), then restore."""
        backup = [p.detach().clone() for p in module.parameters()]
        with torch.no_grad():
            for p, q in zip(module.parameters(), self.shadow.parameters()):
                p.copy_(q)
        try:
            yield module
        finally:
            with torch.no_grad():
                for p, b in zip(module.parameters(), backup):
                    p.copy_(b)
