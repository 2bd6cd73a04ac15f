"""NaN/Inf guard for the optimizer step, decided on the device (no host sync inside the step).

A step whose loss or gradient norm is not finite is skipped: applying it would write NaN into every
weight, and the next checkpoints would then rotate the good ones away. Every rank must take the same
decision (one rank stepping while another skips splits the replicas), so the flag is all-reduced.

The decision stays a device tensor, `update()`'s return value: the loop hands it to the fused AdamW
as `found_inf` (the hook GradScaler uses: the kernel leaves weights, moments and step count untouched
when it is 1) and scales the EMA update by `1 - flag`. Reading it on the host every step would stall
the GPU queue once per step. The host reads the counters only in `check()`, which the loop calls at log
steps and before every checkpoint: `trainer.max_bad_steps` skips in a row mean the run has diverged,
so `check()` stops it with a message and a non-zero exit. The weights of skipped steps never change,
so a stop found a few steps late leaves the same finite weights.

The forward pass of a bad step has already written its buffers (BatchNorm running statistics in the
PatchGAN went NaN at lr=1e6 while every weight was still finite), so a skipped step also restores the
buffers as they were after the last good step (a small copy: buffers are statistics, not weights).
"""
from __future__ import annotations

from typing import Callable

import torch

from ldm.errors import NonFiniteError


class StepGuard:
    def __init__(self, max_bad_steps: int, all_reduce_sum: Callable[[torch.Tensor], torch.Tensor],
                 main_process: bool = True, module: torch.nn.Module | None = None,
                 device: torch.device | str = "cpu"):
        self.max_bad_steps, self.all_reduce_sum, self.main_process = max_bad_steps, all_reduce_sum, main_process
        self.buffers = list(module.buffers()) if module is not None else []
        self.saved = [b.detach().clone() for b in self.buffers]  # as after the last good step
        # Device-side counters: skipped steps in this process's run, the current run of skips, and the
        # longest run since the last check (a run that ended between two checks still counts).
        self.counts = torch.zeros(3, dtype=torch.long, device=device)
        self.skipped = 0  # as of the last check (logged as train/skipped_steps)
        self.checked_step = 0

    @torch.no_grad()
    def update(self, loss: torch.Tensor, norms: dict[str, torch.Tensor]) -> torch.Tensor:
        """The skip flag of this optimizer step: a float32 0-dim device tensor, 1.0 when some rank saw a
        non-finite loss or gradient norm (the same on every rank). Restores the buffers when it is 1."""
        finite = [torch.isfinite(loss.detach()).all()] + [torch.isfinite(n).all() for n in norms.values()]
        bad = self.all_reduce_sum((~torch.stack(finite)).any().float().reshape(1)).reshape(()) > 0
        for saved, buffer in zip(self.saved, self.buffers):
            buffer.copy_(torch.where(bad, saved, buffer))
            saved.copy_(buffer)
        skipped, in_a_row, longest = self.counts.unbind()
        skipped += bad
        in_a_row.copy_((in_a_row + 1) * bad)
        torch.maximum(longest, in_a_row, out=longest)
        return bad.float()

    def check(self, step: int) -> int:
        """Host side, at log steps and checkpoints (one sync): report skips since the last check, raise
        NonFiniteError if `max_bad_steps` came in a row. Returns the skipped steps so far."""
        skipped, in_a_row, longest = self.counts.tolist()
        self.counts[2] = in_a_row  # the next window starts with the current run of skips
        new, since = skipped - self.skipped, self.checked_step
        self.skipped, self.checked_step = skipped, step
        if new and self.main_process:
            print(f"[ldm] steps {since + 1}-{step}: {new} optimizer step(s) skipped for a non-finite loss or "
                  f"gradient ({in_a_row} in a row now, {skipped} in all; trainer.max_bad_steps="
                  f"{self.max_bad_steps})", flush=True)
        if longest >= self.max_bad_steps:
            raise NonFiniteError(
                f"stopping at step {step}: {longest} steps in a row had a non-finite loss or gradient "
                f"(trainer.max_bad_steps={self.max_bad_steps}); the run has diverged. The checkpoints on disk "
                f"hold the last finite weights: lower the learning rate or the offending loss weight and rerun "
                f"to resume from them")
        return skipped
