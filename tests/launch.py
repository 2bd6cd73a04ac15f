"""Helpers for tests that run the real CLI in subprocesses (`accelerate launch`, `python train/main.py`)."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
       "PYTHONPATH": str(ROOT), "HYDRA_FULL_ERROR": "1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_cmd(num_processes: int, *args, port: int | None = None, machines: tuple[int, int] | None = None,
               script: str = "train/main.py") -> list[str]:
    """`accelerate launch` with the flags a CPU run needs (`--multi_gpu`: several gloo processes).
    `machines=(num_machines, machine_rank)` emulates nodes on loopback (num_processes counts all machines').
    One process on one machine is plain `python train/main.py`."""
    if num_processes == 1 and machines is None:
        return [sys.executable, script, *args]
    nodes = ["--num_machines", "1"] if machines is None else \
        ["--num_machines", str(machines[0]), "--machine_rank", str(machines[1]), "--main_process_ip", "127.0.0.1"]
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(num_processes),
            "--mixed_precision", "no", "--dynamo_backend", "no", *nodes, "--main_process_port",
            str(port or free_port()), script, *args]


def run(cmd: list[str], timeout: float = 600, check: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, env=env or ENV, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    if check:
        assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
    return proc


def start(cmd: list[str], log: Path) -> subprocess.Popen:
    """Start `cmd` in its own process group (as a shell job is), output to `log`."""
    return subprocess.Popen(cmd, env=ENV, cwd=ROOT, stdout=log.open("w"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def wait_for(predicate, timeout: float, what: str, proc: subprocess.Popen | None = None, log: Path | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process ended (exit {proc.returncode}) before {what}\n"
                                 + (log.read_text()[-4000:] if log else ""))
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}\n" + (log.read_text()[-4000:] if log else ""))


def children(pid: int) -> list[int]:
    """Direct children of `pid` (from /proc)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def env_of(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(item.decode(errors="replace").split("=", 1) for item in raw if b"=" in item)


def kill_group(proc: subprocess.Popen, sig=signal.SIGKILL) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass
