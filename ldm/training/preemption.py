"""Preemption: a signal ends the run in a checkpoint, on every rank at the same step, and under SLURM
the job requeues itself.

What goes wrong without this (measured on `ldm` before, and a known fault of other frameworks):
* SLURM and `kill -TERM -<pgid>` signal EVERY process, DataLoader workers included. torch's worker
  handler dies on a SIGTERM that does not come from its parent, and the main process then fails with
  "DataLoader worker (pid …) is killed by signal". Workers must ignore the stop signals.
* A per-rank flag lets ranks stop at different steps: one waits in the checkpoint barrier while another
  runs a collective, and the job hangs. The flag is all-reduced every step instead.
* torch elastic starts each worker in its own session, so `kill -9` on the launcher's process group
  left the training processes running. They now get SIGTERM when their launcher dies (PDEATHSIG),
  checkpoint at the next step and exit.
"""
from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys

import torch
import torch.distributed as dist

PR_SET_PDEATHSIG = 1


def signal_number(name: str) -> signal.Signals:
    try:
        return signal.Signals[name if name.startswith("SIG") else f"SIG{name}"]
    except KeyError:
        raise ValueError(f"trainer.stop_signals: unknown signal {name!r} (e.g. SIGTERM, SIGUSR1)") from None


class StopRequest:
    """Set by a stop signal in the training process; `agreed()` all-reduces it so every rank sees the
    same answer at the same step. The all-reduce runs on a CPU (gloo) group: no GPU sync in the step."""

    def __init__(self, signals: list[str]):
        self.signals = [signal_number(s) for s in signals]
        self.received: signal.Signals | None = None
        self._group = None
        if dist.is_available() and dist.is_initialized():
            self._group = dist.new_group(backend="gloo") if dist.get_backend() != "gloo" else dist.group.WORLD

    def install(self) -> "StopRequest":
        for sig in self.signals:
            signal.signal(sig, self._handle)
        _die_with_launcher()
        return self

    def _handle(self, signum, frame) -> None:
        if self.received is None:
            self.received = signal.Signals(signum)
            print(f"[ldm] {self.received.name} received: stopping after this step to checkpoint", flush=True)

    def agreed(self) -> bool:
        """True on every rank as soon as any rank got a stop signal (a collective: call it on all ranks)."""
        flag = torch.tensor([0 if self.received is None else int(self.received)], dtype=torch.int32)
        if self._group is not None:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._group)
        if flag.item() and self.received is None:  # another rank was signalled: name its signal here too
            self.received = signal.Signals(int(flag.item()))
        return bool(flag.item())

    @property
    def exit_code(self) -> int:
        """128 + signal number, the shell's convention for 'ended by a signal': not a completed run."""
        return 128 + int(self.received) if self.received is not None else 0


def _die_with_launcher() -> None:
    """Under torch elastic (`accelerate launch`, `torchrun`), ask the kernel for SIGTERM when the launcher
    dies: the run then checkpoints and exits instead of racing a rerun in the same run directory."""
    if "TORCHELASTIC_RUN_ID" not in os.environ or not sys.platform.startswith("linux"):
        return
    parent = os.getppid()
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
    except (OSError, AttributeError):  # not glibc: the launcher's own shutdown still signals us
        return
    if os.getppid() != parent:  # the launcher died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)


def requeue_slurm_job() -> bool:
    """`scontrol requeue $SLURM_JOB_ID`: the job goes back to the queue and its rerun resumes from the
    checkpoint just written. SLURM kills the job's processes as it requeues, often before `scontrol` has
    returned here, so the line is printed first. A plain `scancel` also signals the run and (measured on
    slurm 22.05) the requeue is still accepted: cancel a second time once the job is PENDING, or train
    with trainer.requeue=false. Returns whether SLURM accepted it."""
    job = os.environ.get("SLURM_ARRAY_JOB_ID") and os.environ.get("SLURM_ARRAY_TASK_ID") and \
        f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}" or os.environ.get("SLURM_JOB_ID")
    if not job:
        return False
    print(f"[ldm] requeueing SLURM job {job}: it resumes from this checkpoint when it starts again", flush=True)
    try:
        proc = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        print(f"[ldm] could not requeue SLURM job {job}: {e}", flush=True)
        return False
    if proc.returncode != 0:
        print(f"[ldm] SLURM refused to requeue job {job}: {proc.stderr.strip() or proc.stdout.strip()}", flush=True)
        return False
    return True
