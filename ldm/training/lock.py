"""One live run per run directory.

Two runs on one run directory would interleave checkpoints, rotate each other's away and resume from
a mix. `run_dir/run.lock` is held with a POSIX record lock (fcntl/lockf) by the launching process (rank 0
only: the ranks of one job must not refuse each other). The kernel releases it when its holder dies, even
by SIGKILL, so a stale lock is taken over without asking; the file records pid, host and SLURM job id for
the message. A POSIX lock, not flock(2): forked DataLoader workers inherit an flock and kept a killed run's
lock alive for seconds; record locks belong to the process alone (and work over NFS through lockd).
Where the filesystem has no locks at all (some Lustre mounts), the recorded pid is checked instead.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
from pathlib import Path

from ldm.errors import RunLockedError


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class RunLock:
    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir) / "run.lock"
        self._fd: int | None = None

    def _holder(self) -> dict:
        try:
            value = json.loads(self.path.read_text() or "{}")
            return value if isinstance(value, dict) else {}
        except (OSError, ValueError):
            return {}

    def acquire(self) -> "RunLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = {"pid": os.getpid(), "host": socket.gethostname(), "slurm_job": os.environ.get("SLURM_JOB_ID")}
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        holder = self._holder()
        try:  # (never open the file again while holding it: closing ANY fd of it drops a POSIX lock)
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno in (errno.EACCES, errno.EAGAIN):
                os.close(fd)
                raise RunLockedError(self._refusal(holder)) from None
            if e.errno not in (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL):
                raise
            # no locks on this filesystem: judge by the recorded pid on this host
            if holder.get("host") == me["host"] and holder.get("pid") not in (None, me["pid"]) \
                    and _alive(int(holder["pid"])):
                os.close(fd)
                raise RunLockedError(self._refusal(holder)) from None
        if holder.get("pid") not in (None, me["pid"]):
            print(f"[ldm] taking over the stale lock {self.path} (pid {holder.get('pid')} on "
                  f"{holder.get('host')} is no longer running)", flush=True)
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode(), 0)
        self._fd = fd
        return self

    def _refusal(self, holder: dict) -> str:
        who = f"pid {holder.get('pid')} on {holder.get('host')}" + (
            f" (SLURM job {holder['slurm_job']})" if holder.get("slurm_job") else "")
        return (f"another run ({who}) is using {self.path.parent}: two runs on one run directory would overwrite "
                f"each other's checkpoints. Wait for it to finish, stop it, or choose another run_dir")

    def release(self) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)  # a clean exit leaves no holder: only a crashed run's record reads as stale
            os.close(self._fd)  # closing drops the lock; the empty file stays (reused next time)
            self._fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
