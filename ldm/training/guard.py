"""NaN/Inf guard for the optimizer step.

A step whose loss or gradient norm is not finite is skipped: applying it would write NaN into every
weight, and the next checkpoints would then rotate the good ones away. Every rank must take the same
decision (one rank stepping while another skips splits the replicas), so the flag is all-reduced.
`trainer.max_bad_steps` skips in a row mean the run has diverged: stop with a message and a non-zero
exit, leaving the last checkpoints (all written from finite weights) as they are.

The forward pass of a bad step has already written its buffers (BatchNorm running statistics in the
PatchGAN went NaN at lr=1e6 while every weight was still finite), so a skipped step also restores the
buffers as they were after the last good step (a small copy: buffers are statistics, not weights).
"""
from __future__ import annotations

from typing import Callable

import torch

from ldm.errors import NonFiniteError

WARN_FIRST, WARN_EVERY = 5, 100  # print the first skips, then every 100th


class StepGuard:
    def __init__(self, max_bad_steps: int, all_reduce_sum: Callable[[torch.Tensor], torch.Tensor],
                 main_process: bool = True, module: torch.nn.Module | None = None):
        self.max_bad_steps, self.all_reduce_sum, self.main_process = max_bad_steps, all_reduce_sum, main_process
        self.buffers = list(module.buffers()) if module is not None else []
        self.saved = [b.detach().clone() for b in self.buffers]  # as after the last good step
        self.in_a_row = 0  # consecutive skipped steps
        self.skipped = 0  # skipped steps in this process's run (logged as train/skipped_steps)

    def skip(self, loss: torch.Tensor, norms: dict[str, torch.Tensor], step: int) -> bool:
        """True when optimizer step `step` must be skipped (some rank saw a non-finite loss or grad norm).
        One host sync per step (the decision is needed on the host)."""
        finite = [torch.isfinite(loss.detach()).all()] + [torch.isfinite(n).all() for n in norms.values()]
        bad = (~torch.stack(finite)).any().float().reshape(1)
        with torch.no_grad():
            if not float(self.all_reduce_sum(bad)):
                self.in_a_row = 0
                for saved, buffer in zip(self.saved, self.buffers):
                    saved.copy_(buffer)
                return False
            for saved, buffer in zip(self.saved, self.buffers):
                buffer.copy_(saved)
        self.in_a_row += 1
        self.skipped += 1
        if self.main_process and (self.skipped <= WARN_FIRST or self.skipped % WARN_EVERY == 0):
            values = ", ".join([f"loss {float(loss.detach()):.4g}"] + [f"grad_norm/{k} {float(n):.4g}"
                                                                         for k, n in norms.items()])
            print(f"[ldm] step {step}: non-finite loss or gradient ({values} on rank 0): optimizer step "
                  f"skipped ({self.in_a_row} in a row, {self.skipped} in all; trainer.max_bad_steps="
                  f"{self.max_bad_steps})", flush=True)
        if self.in_a_row >= self.max_bad_steps:
            raise NonFiniteError(
                f"stopping at step {step}: {self.in_a_row} steps in a row had a non-finite loss or gradient "
                f"(trainer.max_bad_steps={self.max_bad_steps}); the run has diverged. The checkpoints on disk "
                f"hold the last finite weights: lower the learning rate or the offending loss weight and rerun "
                f"to resume from them")
        return True
