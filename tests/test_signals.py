"""Stop signals and launchers through the real CLI (no SLURM needed): a SIGTERM to one rank ends
`accelerate launch` with 143 (not 1 and a ChildFailedError traceback), and `accelerate launch
--num_processes 2` without `--multi_gpu` on this GPU-less host trains 2 processes, never 1 silently."""
import json
import os
import signal
import sys
from pathlib import Path

import pytest

from tests.launch import children, env_of, free_port, launch_cmd, run, start, wait_for
from tests.test_scaleout import stage2_args


def steps_done(run_dir: Path) -> int:
    path = run_dir / "trace_rank0.txt"
    lines = path.read_text().splitlines() if path.is_file() else []
    return max((int(line.split()[0]) for line in lines if line[:1].isdigit()), default=-1) + 1


@pytest.mark.slow
def test_sigterm_to_one_rank_ends_the_launcher_with_143(shapes_shards, tiny_autoencoder, tmp_path):
    run_dir, log = tmp_path / "run", tmp_path / "launch.log"
    proc = start(launch_cmd(2, *stage2_args(shapes_shards, tiny_autoencoder, run_dir, "trainer.max_steps=400",
                                            "data.num_workers=1")), log)
    wait_for(lambda: steps_done(run_dir) >= 2, 300, "training steps", proc, log)
    rank1 = next(p for p in children(proc.pid) if env_of(p).get("RANK") == "1")
    os.kill(rank1, signal.SIGTERM)
    assert proc.wait(timeout=180) == 143, log.read_text()[-4000:]
    text = log.read_text()
    assert "ChildFailedError" not in text and "Traceback" not in text, text[-4000:]
    ckpt = sorted((run_dir / "checkpoints").glob("step_*[0-9]"))[-1]
    assert {"rank_0.pt", "rank_1.pt", "model.safetensors"} <= {p.name for p in ckpt.iterdir()}
    assert 2 <= json.loads((ckpt / "state.json").read_text())["step"] < 400


@pytest.mark.slow
def test_num_processes_without_multi_gpu_runs_two_processes(shapes_shards, tiny_autoencoder, tmp_path):
    """The command the README warns about, run as typed: 2 synchronised processes, said in one line."""
    run_dir = tmp_path / "run"
    proc = run([sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2",
                "--main_process_port", str(free_port()), "train/main.py",
                *stage2_args(shapes_shards, tiny_autoencoder, run_dir, "trainer.max_steps=2", "data.num_workers=0")])
    out = proc.stdout + proc.stderr
    assert "relaunching with --multi_gpu" in out and "2 process(es)" in out, out[-3000:]
    state = json.loads((sorted((run_dir / "checkpoints").glob("step_*"))[-1] / "state.json").read_text())
    assert state["world_size"] == 2 and state["step"] == 2, state
    assert (run_dir / "trace_rank1.txt").is_file()
