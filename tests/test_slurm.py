"""SLURM for real, on the two-node cluster of `slurm/start_cluster.sh` (nodes n1, n2 on this host; `.ci/run`
starts it): the 2-node CPU sbatch job trains the tiny LDM at world size 2; the signal paths mean what the
user meant (time limit: checkpoint, requeue, resume bit-identical without the 2-minute hold; `scancel`:
checkpoint and stop; preemption with and without grace time: checkpoint and come back; a signal after the
last step: COMPLETED); a 2x2 Hydra sweep runs through hydra-submitit-launcher. Skipped, with the reason,
where there is no SLURM or the cluster is not up."""
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.launch import ENV, ROOT
from tests.test_scaleout import stage2_args

pytestmark = pytest.mark.slurm


@pytest.fixture(scope="module")
def cluster():
    if shutil.which("sinfo") is None or shutil.which("sbatch") is None:
        pytest.skip("SLURM is not installed (no sinfo/sbatch): run slurm/start_cluster.sh as root")
    proc = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %t"], capture_output=True, text=True, timeout=30)
    up = [line.split()[0] for line in proc.stdout.splitlines() if re.match(r"\S+ (idle|mix|alloc)", line)]
    if proc.returncode != 0 or len(up) < 2:
        pytest.skip(f"SLURM cluster not up (need 2 nodes idle; sinfo said: {proc.stdout.strip() or proc.stderr.strip()})"
                    ": run slurm/start_cluster.sh as root")
    return up


def sbatch(out: Path, *args, nodes=2, script="slurm/train_cpu.sbatch", options=(), env=None) -> str:
    """`sbatch --nodes N slurm/train_cpu.sbatch ARGS` from the repo root; the job runs this venv's python
    and this checkout's `ldm`."""
    env = {**ENV, "PY": sys.executable, **(env or {})}
    proc = subprocess.run(["sbatch", "--parsable", "--chdir", str(ROOT), "--nodes", str(nodes),
                           "--output", str(out / "slurm-%j.out"), *options, script, *args],
                          env=env, capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().split(";")[0]


def job(job_id: str) -> dict[str, str]:
    out = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True, timeout=30).stdout
    return dict(item.split("=", 1) for item in out.split() if "=" in item)


def wait_job(job_id: str, out: Path, timeout=300, until=("COMPLETED",)) -> dict[str, str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = job(job_id)
        state = info.get("JobState")
        if state in until:
            return info
        if state in ("FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL"):
            break
        time.sleep(0.5)
    log = out / f"slurm-{job_id}.out"
    raise AssertionError(f"job {job_id} is {job(job_id).get('JobState')}, expected {until}\n"
                         + (log.read_text()[-5000:] if log.exists() else "(no output file)"))


def last_ckpt(run_dir: Path) -> Path:
    return sorted((run_dir / "checkpoints").glob("step_*"))[-1]


@pytest.mark.slow
@pytest.mark.parametrize("script", ["train_cpu", "train"])
def test_two_node_cpu_job_trains_at_world_size_two(cluster, shapes_shards, tiny_autoencoder, tmp_path, script):
    """The CPU script, and the GPU script's own path (common.sh, NCCL block, launch_node.sh) with one
    process per node on these GPU-less nodes (ldm falls back to CPU itself)."""
    run_dir = tmp_path / "run"
    gpu = dict(options=["--gpus-per-node=0", "--cpus-per-task=1"], env={"GPUS_PER_NODE": "1"}) if script == "train" else {}
    job_id = sbatch(tmp_path, *stage2_args(shapes_shards, tiny_autoencoder, run_dir, "trainer.max_steps=2",
                                            "data.num_workers=1"), script=f"slurm/{script}.sbatch", **gpu)
    info = wait_job(job_id, tmp_path)
    assert info["NumNodes"] == "2" and info["ExitCode"] == "0:0", info
    state = json.loads((last_ckpt(run_dir) / "state.json").read_text())
    assert state["world_size"] == 2 and state["step"] == 2, state
    assert (last_ckpt(run_dir) / "rank_1.pt").is_file()
    log = (tmp_path / f"slurm-{job_id}.out").read_text()
    assert "2 node(s) x 1 process(es)" in log
    assert shapes_shards["train"] in (run_dir / "config.yaml").read_text()  # the brace pattern arrived intact


def wait_training(job_id: str, out: Path, timeout=300) -> Path:
    """Until the job's training processes are up (any step < max works for a signal)."""
    log_path = out / f"slurm-{job_id}.out"
    deadline = time.monotonic() + timeout
    while not (log_path.exists() and "process(es) (ddp)" in log_path.read_text()):
        assert time.monotonic() < deadline and job(job_id).get("JobState") in ("PENDING", "RUNNING"), job(job_id)
        time.sleep(0.2)
    time.sleep(2)
    return log_path


def requeue_delay(job_id: str, timeout=300) -> float:
    """Seconds the job spends out of RUNNING between its first run and its rerun (PENDING, BeginTime hold)."""
    deadline, left = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        info = job(job_id)
        if left is None and info.get("JobState") != "RUNNING":
            left = time.monotonic()
        if left is not None and info.get("JobState") == "RUNNING" and info.get("Restarts") == "1":
            return time.monotonic() - left
        time.sleep(0.5)
    raise AssertionError(f"job {job_id} did not run again within {timeout} s: {job(job_id)}")


@pytest.mark.slow
def test_time_limit_signal_checkpoints_requeues_resumes_bit_identical(cluster, shapes_shards, tiny_autoencoder,
                                                                       tmp_path):
    """SIGUSR1, what `--signal=USR1@180` sends before the time limit (here `scancel --signal=USR1`): the job
    checkpoints, requeues itself, starts again within seconds (no 2-minute hold on this cluster:
    AuthInfo=cred_expire=10) and ends bit-identical to an uninterrupted job."""
    steps = ["trainer.max_steps=60", "data.num_workers=1"]
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    ref_id = sbatch(tmp_path, *stage2_args(shapes_shards, tiny_autoencoder, ref, *steps))
    cut_id = sbatch(tmp_path, *stage2_args(shapes_shards, tiny_autoencoder, cut, *steps))
    log_path = wait_training(cut_id, tmp_path)
    subprocess.run(["scancel", "--signal=USR1", cut_id], check=True, timeout=30)
    delay = requeue_delay(cut_id)
    info = wait_job(cut_id, tmp_path, timeout=400)
    wait_job(ref_id, tmp_path)
    log = log_path.read_text()
    assert info["Restarts"] == "1", info
    assert delay < 60, f"the requeued job waited {delay:.0f} s before running again"
    print(f"requeue delay (USR1 -> running again): {delay:.1f} s")
    # the signal's checkpoint, then the requeued job (restart 1: its own `scontrol requeue`) resumed from it
    assert "SIGUSR1 received" in log and "requeueing SLURM job" in log and "(restart 1)" in log, log[-3000:]
    assert "resuming step_" in log, log[-3000:]
    saved = sorted(p.name for p in (cut / "checkpoints").glob("step_*"))
    assert len(saved) == 2 and saved[-1] == "step_00000060", saved  # the signal's checkpoint, then the final one
    for name in ("model", "ema"):
        a, b = load_file(last_ckpt(ref) / f"{name}.safetensors"), load_file(last_ckpt(cut) / f"{name}.safetensors")
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), f"{name}: resumed job differs from the uninterrupted one"


@pytest.mark.slow
def test_plain_scancel_checkpoints_and_stops(cluster, shapes_shards, tiny_autoencoder, tmp_path):
    """A user's `scancel <job>`: one checkpoint, then the job ends CANCELLED and stays ended (no requeue,
    no second scancel needed)."""
    run_dir = tmp_path / "run"
    job_id = sbatch(tmp_path, *stage2_args(shapes_shards, tiny_autoencoder, run_dir, "trainer.max_steps=400",
                                            "data.num_workers=1"))
    log_path = wait_training(job_id, tmp_path)
    subprocess.run(["scancel", job_id], check=True, timeout=30)
    wait_job(job_id, tmp_path, timeout=120, until=("CANCELLED",))
    time.sleep(15)  # a requeue would show by now (the hold is 11 s here)
    info = job(job_id)
    assert info["JobState"] == "CANCELLED" and info["Restarts"] == "0", info
    log = log_path.read_text()
    assert "SIGTERM received" in log and "stopping, no requeue" in log, log[-3000:]
    assert "requeueing SLURM job" not in log, log[-3000:]
    step = json.loads((last_ckpt(run_dir) / "state.json").read_text())["step"]
    assert 0 < step < 400 and (last_ckpt(run_dir) / "rank_1.pt").is_file()


@pytest.mark.slow  # (about 2 min each on 2 shared cores; `make test-all`)
@pytest.mark.parametrize("partition", ["spot", "spot_grace"])
def test_preemption_checkpoints_and_the_job_comes_back(cluster, shapes_shards, tiny_autoencoder, tmp_path, partition):
    """A job of the higher-tier partition debug takes both nodes. spot (GraceTime=0): SLURM requeues the job
    itself; ldm checkpoints within KillWait and leaves the requeue to SLURM. spot_grace (GraceTime=60):
    SLURM only signals and would requeue at the end of the grace time, or not at all if the job has ended;
    ldm checkpoints and requeues the job itself. Either way it comes back and finishes."""
    run_dir = tmp_path / "run"
    job_id = sbatch(tmp_path, *stage2_args(shapes_shards, tiny_autoencoder, run_dir, "trainer.max_steps=40",
                                            "data.num_workers=1"), options=["--partition", partition])
    log_path = wait_training(job_id, tmp_path)
    urgent = subprocess.run(["sbatch", "--parsable", "--partition", "debug", "--nodes", "2", "--cpus-per-task",
                             str(cpus_per_node()), "--output", "/dev/null",
                             "--wrap", "sleep 1"], capture_output=True, text=True, timeout=60, check=True)
    info = wait_job(job_id, tmp_path, timeout=400)
    log = log_path.read_text()
    assert info["Restarts"] == "1", info
    assert "SIGTERM received" in log and "resuming step_" in log, log[-3000:]
    expect = "SLURM is requeueing job" if partition == "spot" else "requeueing SLURM job"
    assert expect in log, log[-3000:]
    assert json.loads((last_ckpt(run_dir) / "state.json").read_text())["step"] == 40
    assert job(urgent.stdout.strip().split(";")[0]).get("JobState") == "COMPLETED"


def cpus_per_node() -> int:
    out = subprocess.run(["sinfo", "-h", "-N", "-n", "n1", "-o", "%c"], capture_output=True, text=True, timeout=30)
    return int(out.stdout.split()[0])


@pytest.mark.slow
def test_signal_after_the_last_step_completes(cluster, shapes_shards, tiny_autoencoder, tmp_path):
    """SIGTERM while the job writes its final checkpoint and evaluates: the job ends COMPLETED, exit 0."""
    run_dir = tmp_path / "run"
    job_id = sbatch(tmp_path, *stage2_args(shapes_shards, tiny_autoencoder, run_dir, "trainer.max_steps=4",
                                            "data.num_workers=1"))
    log_path = tmp_path / f"slurm-{job_id}.out"
    deadline = time.monotonic() + 300
    while not (log_path.exists() and "(final)" in log_path.read_text()):
        assert time.monotonic() < deadline and job(job_id).get("JobState") in ("PENDING", "RUNNING"), job(job_id)
        time.sleep(0.05)
    subprocess.run(["scancel", "--signal=TERM", job_id], check=True, timeout=30)
    info = wait_job(job_id, tmp_path)
    log = log_path.read_text()
    assert "SIGTERM received" in log.split("(final)", 1)[1], log[-3000:]  # it did arrive after the last step
    assert info["ExitCode"] == "0:0" and info["Restarts"] == "0", info
    assert (run_dir / "final_metrics.json").is_file()
    assert json.loads((last_ckpt(run_dir) / "state.json").read_text())["step"] == 4


@pytest.mark.slow
def test_hydra_sweep_through_submitit(cluster, shapes_shards, tiny_autoencoder, tmp_path):
    sweep = tmp_path / "sweep"
    args = [a for a in stage2_args(shapes_shards, tiny_autoencoder, tmp_path / "unused") if not a.startswith("run_dir=")]
    proc = subprocess.run([sys.executable, "train/main.py", "--multirun", "hydra/launcher=slurm",
                           *args, "data.num_workers=1", f"hydra.sweep.dir={sweep}",
                           "trainer.max_steps=1,2", "trainer.seed=0,1"],
                          env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    for num, (max_steps, seed) in enumerate([(1, 0), (1, 1), (2, 0), (2, 1)]):
        run_dir = sweep / str(num)
        state = json.loads((last_ckpt(run_dir) / "state.json").read_text())
        assert state["step"] == max_steps, (num, state)
        assert f"seed: {seed}" in (run_dir / "config.yaml").read_text()
        assert (run_dir / "final_metrics.json").is_file()
