"""Distributed from day one: `accelerate launch` with 2 CPU processes (gloo) trains the autoencoder;
the ranks read disjoint samples and end with identical weights."""
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_accelerate_launch_two_cpu_processes(shapes_shards, tmp_path):
    run_dir = tmp_path / "run"
    env = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}  # no GPU: ldm selects gloo itself
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
           "train/main.py", "model=autoencoder_kl_tiny", "data=shapes", f"data.shards='{shapes_shards['train']}'",
           f"data.val_shards='{shapes_shards['val']}'", "data.image_size=32", "data.num_workers=1",
           "trainer=debug", "trainer.max_steps=3", "trainer.trace=true", "logger=none", f"run_dir={run_dir}",
           "trainer.progress=true"]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "2 process(es) (ddp), global batch 4 = 2 x 2 x 1" in proc.stdout
    # Off a terminal (a pipe here, a file under SLURM): plain step lines instead of the tqdm bar, and every
    # [ldm] line once per job, not once per process.
    lines = proc.stdout.splitlines()
    steps = [line for line in lines if line.startswith("[ldm] step ")]
    assert [line.split()[2] for line in steps] == ["1/3", "2/3", "3/3"], steps
    assert all(" loss " in line and " img/s " in line and " data wait " in line and " ETA " in line for line in steps)
    assert "it/s]" not in proc.stderr and "\r" not in proc.stdout  # no bar redraws
    assert sum(line.startswith("[ldm] saved ") for line in lines) == 2  # step 2 (scheduled) and 3 (final)
    assert sum("process(es)" in line for line in lines) == 1 and sum("[ldm] meter:" in line for line in lines) >= 1
    assert len([line for line in lines if line.startswith("[ldm]")]) == len(set(line for line in lines
                                                                                 if line.startswith("[ldm]")))

    keys, checksums = [], []
    for rank in (0, 1):
        lines = (run_dir / f"trace_rank{rank}.txt").read_text().splitlines()
        keys.append({line.split()[1] for line in lines if not line.startswith("checksum")})
        checksums.append([line.split()[1] for line in lines if line.startswith("checksum")][-1])
    assert len(keys[0]) == len(keys[1]) == 3 * 2, keys  # 3 steps x micro-batch 2 on each rank
    assert not keys[0] & keys[1], f"ranks read the same samples: {keys[0] & keys[1]}"
    assert checksums[0] == checksums[1], f"weights differ across ranks: {checksums}"
    assert (run_dir / "checkpoints/step_00000003/rank_1.pt").is_file()
    assert (run_dir / "autoencoder.safetensors").is_file()


def test_hydra_multirun_sweep_gets_one_run_dir_per_job(shapes_shards, tmp_path):
    env = {**os.environ, "WANDB_MODE": "offline"}
    cmd = [sys.executable, "train/main.py", "--multirun", "model=autoencoder_kl_tiny", "data=shapes",
           f"data.shards='{shapes_shards['train']}'", f"data.val_shards='{shapes_shards['val']}'",
           "data.image_size=32", "data.num_workers=1", "trainer=debug", "logger=none",
           f"paths.runs={tmp_path}", "trainer.max_steps=1,2", "++model.task.loss.perceptual_weight=0"]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    sweep = tmp_path / "multirun-autoencoder_kl_tiny-shapes"
    runs = sorted(p for p in sweep.iterdir() if p.is_dir() and (p / "checkpoints").is_dir())
    assert [r.name for r in runs] == sorted(r.name for r in runs) and len(runs) == 2, runs
    steps = sorted(int((r / "final_metrics.json").read_text().split('"step": ')[1].split(",")[0]) for r in runs)
    assert steps == [1, 2]
