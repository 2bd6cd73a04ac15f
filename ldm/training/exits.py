"""Ending a process on an error with one `[ldm]` line and a non-zero exit, also under a launcher.

Under torch elastic (`accelerate launch`, `torchrun`), a rank that exits non-zero makes the agent print a
ChildFailedError report (a traceback, then a block per rank: 40+ lines for 3 processes) and exit 1, so the
one line drowns. A signalled agent instead stops its workers and ends quietly with 128 + the signal. So a
failing rank tells its own agent (SIGTERM, one of the signals torch elastic handles) before it exits: the
job ends 143 with the one line. Under SLURM, slurm/launch_node.sh turns that into the exit code reported
in $LDM_OUTCOME (here 1), so a failed job does not look preempted.

No torch import here: the config check runs before anything heavy is loaded.
"""
from __future__ import annotations

import os
import signal
import sys
import time
from typing import NoReturn

# How long a rank that told its agent waits to be stopped by it before exiting on its own: the agent must
# hear the signal before it sees a worker exit, or it reports the exit as a failure.
AGENT_GRACE_S = 10.0


def _under_agent() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ and sys.platform.startswith("linux")


def exit_with_error(message: str, *, same_on_every_rank: bool = False) -> NoReturn:
    """Print `message` (once per job when `same_on_every_rank`, e.g. a config error: global rank 0 says it)
    and exit 1. Never returns."""
    rank = int(os.environ.get("RANK", "0"))
    if rank == 0 or not same_on_every_rank:
        print(message, file=sys.stderr, flush=True)
    path = os.environ.get("LDM_OUTCOME")
    if path and rank == 0:
        with open(path, "w") as f:
            f.write("stopped 1\n")
    if _under_agent():
        # Each node's first rank tells that node's agent (every rank does for a rank's own error); the
        # others are stopped by their agent. Default SIGTERM so the agent's stop ends this process at once.
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        if (not same_on_every_rank or int(os.environ.get("LOCAL_RANK", "0")) == 0) and _first_to_tell_agent():
            os.kill(os.getppid(), signal.SIGTERM)
        time.sleep(AGENT_GRACE_S)
    raise SystemExit(1)


def _first_to_tell_agent() -> bool:
    """Whether no other rank of this node has told the agent yet. The agent must get ONE signal: a second one
    arrives while it logs or stops its workers after the first, and it prints that signal's traceback. The
    ranks of a node share the agent's per-attempt directory (TORCHELASTIC_ERROR_FILE is
    <log dir>/<run>/attempt_<n>/<local rank>/error.json), so the first to create a file there tells."""
    error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not error_file:
        return True
    marker = os.path.join(os.path.dirname(os.path.dirname(error_file)), "ldm_told_agent")
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    except OSError:  # the directory is gone or read-only: telling twice beats not telling
        return True
    return True
