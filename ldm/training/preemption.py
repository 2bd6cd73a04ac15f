"""Preemption: a signal ends the run in a checkpoint, on every rank at the same step; under SLURM the
job then comes back or not as the signal meant (`after_stop`).

What goes wrong without this (measured on `ldm` before, and a known fault of other frameworks):
* SLURM and `kill -TERM -<pgid>` signal EVERY process, DataLoader workers included. torch's worker
  handler dies on a SIGTERM that does not come from its parent, and the main process then fails with
  "DataLoader worker (pid …) is killed by signal". Workers must ignore the stop signals.
* A per-rank flag lets ranks stop at different steps: one waits in the checkpoint barrier while another
  runs a collective, and the job hangs. The flag is all-reduced every step instead.
* torch elastic starts each worker in its own session, so `kill -9` on the launcher's process group
  left the training processes running. They now get SIGTERM when their launcher dies (PDEATHSIG),
  checkpoint at the next step and exit.
* SLURM sends SIGTERM both when a user cancels a job and when it preempts one, so the signal cannot say
  what was meant. After the checkpoint, rank 0 asks SLURM what is happening to the job (`after_stop`).
* A rank that exits 143 makes torch elastic's agent end with a ChildFailedError traceback and exit 1.
  The ranks first signal their launcher (`tell_launcher`), which then ends as a signalled launcher does:
  128 + the signal.
"""
from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time

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
        self._launcher: int | None = None  # torch elastic's agent (our parent), told before we exit
        self._group, self._said = None, False
        if dist.is_available() and dist.is_initialized():
            self._group = dist.new_group(backend="gloo") if dist.get_backend() != "gloo" else dist.group.WORLD

    def install(self) -> "StopRequest":
        for sig in self.signals:
            signal.signal(sig, self._handle)
        self._launcher = _die_with_launcher()
        return self

    def _handle(self, signum, frame) -> None:
        if self.received is None:  # said by `agreed`, once per job (SLURM signals every rank)
            self.received = signal.Signals(signum)

    def agreed(self) -> bool:
        """True on every rank as soon as any rank got a stop signal (a collective: call it on all ranks)."""
        flag = torch.tensor([0 if self.received is None else int(self.received)], dtype=torch.int32)
        if self._group is not None:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._group)
        if flag.item() and self.received is None:  # another rank was signalled: name its signal here too
            self.received = signal.Signals(int(flag.item()))
        if flag.item() and not self._said and int(os.environ.get("RANK", "0")) == 0:
            # Said here, not in the handler: a launcher stopping its workers because a rank failed before
            # training is not a stop request, and that rank's own one-line error is the whole story.
            self._said = True
            print(f"[ldm] {self.received.name} received: stopping after this step to checkpoint", flush=True)
        return bool(flag.item())

    @property
    def exit_code(self) -> int:
        """128 + signal number, the shell's convention for 'ended by a signal': not a completed run."""
        return 128 + int(self.received) if self.received is not None else 0

    def tell_launcher(self) -> None:
        """Send the stop signal on to torch elastic's agent (`accelerate launch`, `torchrun`) before this
        process exits: the agent then stops its other workers and ends with 128 + signal, as when it is
        signalled itself. Call it on one process per node, before a barrier that all ranks pass before
        exiting, so the agent hears the signal before it sees a rank exit."""
        if self.received is None or self._launcher is None or os.getppid() != self._launcher:
            return
        handled = os.environ.get("TORCHELASTIC_SIGNALS_TO_HANDLE", "SIGTERM,SIGINT,SIGHUP,SIGQUIT")
        sig = self.received if self.received.name in handled.replace(" ", "").split(",") else signal.SIGTERM
        os.kill(self._launcher, sig)


def _die_with_launcher() -> int | None:
    """Under torch elastic (`accelerate launch`, `torchrun`), ask the kernel for SIGTERM when the launcher
    dies: the run then checkpoints and exits instead of racing a rerun in the same run directory.
    Returns the launcher's pid (None when there is no torch elastic launcher)."""
    if "TORCHELASTIC_RUN_ID" not in os.environ or not sys.platform.startswith("linux"):
        return None
    parent = os.getppid()
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
    except (OSError, AttributeError):  # not glibc: the launcher's own shutdown still signals us
        return parent
    if os.getppid() != parent:  # the launcher died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)
    return parent


def report_outcome(outcome: str) -> None:
    """`completed` or `stopped <exit code>` into $LDM_OUTCOME (set by slurm/launch_node.sh): the node's
    exit code then says what the training did, not what the launcher saw. SLURM signals the launcher
    too, and a launcher signalled after the last step ends 143 although the run completed."""
    path = os.environ.get("LDM_OUTCOME")
    if path:
        with open(path, "w") as f:
            f.write(outcome + "\n")


def slurm_job_id() -> str | None:
    array, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    return f"{array}_{task}" if array and task else os.environ.get("SLURM_JOB_ID")


def slurm_job_state(job: str, tries: int = 5) -> dict[str, str] | None:
    """`scontrol show job -o JOB` as a dict (JobState, Restarts, ...); None when SLURM does not answer.
    (Right after a preemption, slurmctld may answer with nothing for a moment: asked again.)"""
    for attempt in range(tries):
        try:
            proc = subprocess.run(["scontrol", "show", "job", "-o", job], capture_output=True, text=True, timeout=30)
            fields = dict(item.split("=", 1) for item in proc.stdout.split() if "=" in item)
            if proc.returncode == 0 and "JobState" in fields:
                return fields
        except (OSError, subprocess.TimeoutExpired):
            pass
        time.sleep(1 + attempt)
    return None


def after_stop(requeue: bool) -> str:
    """Rank 0, after the signal's checkpoint: what happens to the SLURM job now. SLURM sends the same
    SIGTERM for a user's `scancel` and for a preemption, so the job asks slurmctld:
    * Restarts went up: SLURM is requeueing the job itself (preemption without grace time, an admin's
      `scontrol requeue`). Nothing to do: it resumes from this checkpoint.
    * RUNNING: nobody is ending the job. The time limit's warning (`--signal=USR1@...`), a preemption in
      its grace time, or `scancel --signal=...`: requeue it (`trainer.requeue`), or it would end for good.
    * anything else (COMPLETING, CANCELLED): the user cancelled it (or its time ran out): stop, no requeue.
    Returns one of "requeued", "requeued by SLURM", "stopped" (also: not under SLURM, or no answer)."""
    job = slurm_job_id()
    if not job:
        return "stopped"
    info = slurm_job_state(job)
    if info is None:
        print(f"[ldm] SLURM did not say what happens to job {job}: stopping without a requeue", flush=True)
        return "stopped"
    state, restarts = info["JobState"], int(info.get("Restarts", "0"))
    if restarts > int(os.environ.get("SLURM_RESTART_COUNT", "0")):
        print(f"[ldm] SLURM is requeueing job {job} (preempted): it resumes from this checkpoint", flush=True)
        return "requeued by SLURM"
    if state != "RUNNING":
        print(f"[ldm] job {job} is ending ({state}: cancelled, or out of time): stopping, no requeue; "
              "submit the same command again to resume", flush=True)
        return "stopped"
    if not requeue:
        print(f"[ldm] trainer.requeue=false: job {job} stops here; submit the same command again to resume", flush=True)
        return "stopped"
    return "requeued" if requeue_slurm_job(job) else "stopped"


def requeue_slurm_job(job: str) -> bool:
    """`scontrol requeue JOB`: the job goes back to the queue and its rerun resumes from the checkpoint
    just written. SLURM kills the job's processes as it requeues, often before `scontrol` has returned
    here, so the line is printed first. Returns whether SLURM accepted it."""
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
