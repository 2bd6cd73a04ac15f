"""Step guard: skip an optimizer step whose loss or gradient norm is non-finite or spikes, decided on the
device (no host sync inside the step), and tell the loop when to rewind or stop.

A step whose loss or gradient norm is not finite is skipped: applying it would write NaN into every
weight, and the next checkpoints would then rotate the good ones away. A *finite* blow-up is as bad
(at lr=1e6 one update took the largest weight from 1.25 to 1.35e6, and every later step was finite), so
a step whose loss or global gradient norm exceeds `trainer.spike.factor` x its running median over the
last `trainer.spike.window` accepted steps is skipped too (PaLM and OLMo skip or rewind such steps).
Every rank must take the same decision (one rank stepping while another skips splits the replicas), so
the non-finite flag and the loss are all-reduced in one small collective; the gradient norm is already
the same on every rank.

The decision stays a device tensor, `update()`'s return value: the loop hands it to the fused AdamW
as `found_inf` (the hook GradScaler uses: the kernel leaves weights, moments and step count untouched
when it is 1) and scales the EMA update by `1 - flag`. Reading it on the host every step would stall
the GPU queue once per step. The host reads the counters only in `check()`, which the loop calls at log
steps and before every checkpoint:
* `trainer.max_bad_steps` non-finite steps in a row: the run has diverged, `check()` raises;
* `trainer.spike.max_in_row` bad steps (spikes or non-finite) in a row: `check()` returns REWIND and the
  loop reloads the newest healthy checkpoint (the weights that produced the spikes are already damaged:
  skipping more steps cannot repair them).
The weights of skipped steps never change, so a decision found a few steps late sees the same weights.

The forward pass of a bad step has already written its buffers (BatchNorm running statistics in the
PatchGAN went NaN at lr=1e6 while every weight was still finite), so a skipped step also restores the
buffers as they were after the last good step (a small copy: buffers are statistics, not weights).
"""
from __future__ import annotations

from typing import Callable

import torch

from ldm.errors import NonFiniteError

REWIND = "rewind"
MIN_HISTORY = 4  # accepted steps before spikes are judged: the median of fewer values is noise
# counts: skipped steps (all kinds), spikes, bad steps (either kind) in a row, non-finite ones in a row, the
# longest runs of both since the last check, steps since the last bad one. Updated as slices of one vector:
# each indexed write would be an op of its own, and a list index is a host-to-device copy.
SKIPPED, SPIKES, BAD_ROW, NAN_ROW, BAD_LONGEST, NAN_LONGEST, SINCE_BAD = range(7)


class StepGuard:
    def __init__(self, max_bad_steps: int, all_reduce_sum: Callable[[torch.Tensor], torch.Tensor],
                 main_process: bool = True, module: torch.nn.Module | None = None,
                 device: torch.device | str = "cpu", spike=None, world_size: int = 1):
        self.max_bad_steps, self.all_reduce_sum, self.main_process = max_bad_steps, all_reduce_sum, main_process
        self.spike, self.world_size = spike if spike is not None and spike.enabled else None, world_size
        self.buffers = list(module.buffers()) if module is not None else []
        self.saved = [b.detach().clone() for b in self.buffers]  # as after the last good step
        self.counts = torch.zeros(7, dtype=torch.long, device=device)
        self.counts[SINCE_BAD] = 1 << 40  # no bad step yet
        window = self.spike.window if self.spike is not None else 1
        # loss and global gradient norm of the last `window` accepted steps (NaN: empty slot), and how many
        # were accepted so far (the next slot); device tensors, checkpointed with the run
        self.history = torch.full((window, 2), float("nan"), device=device)
        self.accepted = torch.zeros((), dtype=torch.long, device=device)
        self.phase = None
        self.skipped = 0  # as of the last check (logged as train/skipped_steps)
        self.checked_step = 0

    @torch.no_grad()
    def update(self, loss: torch.Tensor, norms: dict[str, torch.Tensor], phase: object = None) -> torch.Tensor:
        """The skip flag of this optimizer step: a float32 0-dim device tensor, 1.0 when some rank saw a
        non-finite loss or gradient norm, or the step spiked (the same on every rank). Restores the
        buffers when it is 1. `phase` is `task.step_phase(step)`: a new phase (stage 1's GAN starting)
        changes the loss itself, so the running statistics start over."""
        if phase != self.phase and self.phase is not None:
            self.history.fill_(float("nan"))
            self.accepted.zero_()
        self.phase = phase
        loss = loss.detach().float().reshape(())
        finite = torch.stack([torch.isfinite(loss)] + [torch.isfinite(n).all() for n in norms.values()])
        reduced = self.all_reduce_sum(torch.stack([(~finite).any().float(), loss]))
        non_finite = reduced[0] > 0
        bad, spiked = non_finite, torch.zeros_like(non_finite)
        if self.spike is not None:
            norm = torch.stack([n.detach().float().reshape(()) for n in norms.values()]).square().sum().sqrt() \
                if norms else torch.zeros((), device=loss.device)
            values = torch.stack([reduced[1] / self.world_size, norm])
            median = self.history.nanmedian(dim=0).values
            judged = (self.accepted >= MIN_HISTORY) & ~non_finite
            spiked = judged & ((values > self.spike.factor * median) & (median > 0)).any()
            bad = non_finite | spiked
            slot = torch.arange(self.history.shape[0], device=loss.device) == self.accepted % self.history.shape[0]
            self.history.copy_(torch.where((slot & ~bad)[:, None], values, self.history))
            self.accepted += ~bad
        for saved, buffer in zip(self.saved, self.buffers):
            buffer.copy_(torch.where(bad, saved, buffer))
            saved.copy_(buffer)
        c = self.counts
        rows = (c[2:4] + 1) * torch.stack([bad, non_finite])
        c.copy_(torch.cat([c[0:2] + torch.stack([bad, spiked]), rows, torch.maximum(c[4:6], rows),
                           (c[6:7] + 1) * ~bad]))
        return bad.float()

    def check(self, step: int) -> str | None:
        """Host side, at log steps and checkpoints (one sync): report skips since the last check, raise
        NonFiniteError if `max_bad_steps` non-finite steps came in a row; returns REWIND when
        `spike.max_in_row` bad steps came in a row (the streak then starts over), else None."""
        counts = self.counts.tolist()
        skipped, spikes = counts[SKIPPED], counts[SPIKES]
        self.counts[NAN_LONGEST], self.counts[BAD_LONGEST] = counts[NAN_ROW], counts[BAD_ROW]
        new, since = skipped - self.skipped, self.checked_step
        self.skipped, self.checked_step = skipped, step
        if new and self.main_process:
            print(f"[ldm] steps {since + 1}-{step}: {new} optimizer step(s) skipped for a non-finite or spiking "
                  f"loss or gradient ({counts[BAD_ROW]} in a row now, {skipped} in all, {spikes} of them spikes; "
                  f"trainer.max_bad_steps={self.max_bad_steps}"
                  + (f", trainer.spike.max_in_row={self.spike.max_in_row})" if self.spike else ")"), flush=True)
        if counts[NAN_LONGEST] >= self.max_bad_steps:
            raise NonFiniteError(
                f"stopping at step {step}: {counts[NAN_LONGEST]} steps in a row had a non-finite loss or gradient "
                f"(trainer.max_bad_steps={self.max_bad_steps}); the run has diverged")
        if self.spike is not None and counts[BAD_LONGEST] >= self.spike.max_in_row:
            self.counts[BAD_ROW] = self.counts[BAD_LONGEST] = 0
            return REWIND
        return None

    def recent_skips(self) -> bool:
        """Whether a step was skipped within the last `spike.window` steps (one host read)."""
        return int(self.counts[SINCE_BAD]) < (self.spike.window if self.spike is not None else 1)

    def snapshot_buffers(self) -> None:
        """The buffers as they are now count as "after the last good step" (after a checkpoint loads)."""
        for saved, buffer in zip(self.saved, self.buffers):
            saved.copy_(buffer)

    def totals(self) -> torch.Tensor:
        return self.counts[SKIPPED:SPIKES + 1].clone()

    def keep_totals(self, totals: torch.Tensor) -> None:
        """After a rewind: the counts of skipped steps go on from where they were, not from the checkpoint's."""
        self.counts[SKIPPED:SPIKES + 1] = totals
        self.skipped = int(totals[0])

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Counters and the accepted values, oldest first (no empty slots: NaN never equals itself, and
        resumed runs are compared bit for bit)."""
        accepted, window = int(self.accepted), len(self.history)
        order = [(accepted - n + i) % window for i in range(n)] if (n := min(accepted, window)) else []
        return {"counts": self.counts.cpu(), "history": self.history[order].cpu(), "accepted": torch.tensor(n)}

    def load_state_dict(self, state: dict[str, torch.Tensor], phase: object = None) -> None:
        """Continue from a checkpoint's counters and running statistics (its window size may differ: the
        newest values are kept). `phase` is the phase of the checkpoint's last step."""
        self.counts.copy_(state["counts"])
        self.skipped = int(state["counts"][SKIPPED])
        history = state["history"][-len(self.history):]
        self.history.fill_(float("nan"))
        self.history[:len(history)] = history.to(self.history.device)
        self.accepted.fill_(len(history))
        self.phase = phase
