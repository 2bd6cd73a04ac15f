"""Faults as a user meets them, injected through the real CLI (train/main.py, accelerate launch,
train/sample.py) where the exit code and message matter, in-process where only the library's answer
does. docs/RELIABILITY.md maps each fault to its test here."""
import io
import json
import os
import pickle
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from hydra import compose, initialize_config_dir
from PIL import Image
from safetensors.torch import load_file, save_file

from ldm.training.checkpoint import Checkpointer, list_checkpoints, resolve_resume, verify_checkpoint, write_manifest
from ldm.config import ConfigError, check_targets, check_trainer, register_configs
from ldm.errors import CheckpointError, DataError, NonFiniteError
from ldm.training.lock import RunLock

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
register_configs()
AE = ["model=autoencoder_kl_tiny", "++model.task.loss.perceptual_weight=0"]  # PatchGAN on from step 0, no LPIPS
LDM = ["model=ldm_txt2img_tiny", "model.task.sample_steps=2"]
KEEP_ALL = ["trainer.max_steps=4", "trainer.ckpt_every=1", "trainer.keep_last=0"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def data_args(shards):
    return ["data=shapes", f"data.shards='{shards['train']}'", f"data.val_shards='{shards['val']}'",
            "data.image_size=32", "data.num_workers=1", "data.shuffle_buffer=16", "trainer=debug", "logger=none"]


def cli(shards, run_dir, *overrides, model=AE, procs=1, env=None, preexec_fn=None, timeout=600):
    """Run train/main.py (or `accelerate launch` of it with `procs` CPU processes); returns the CompletedProcess."""
    args = [*model, *data_args(shards), f"run_dir={run_dir}", *overrides]
    launch = [] if procs == 1 else ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(procs),
                                    "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                                    "--main_process_port", str(free_port())]
    env = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run([sys.executable, *launch, "train/main.py", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout, preexec_fn=preexec_fn)


def ok(proc):
    errors = [line for line in proc.stderr.splitlines() if "Error" in line][:5]  # the root cause, not torchrun's
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:] + "\nfirst errors:\n" + "\n".join(errors)
    return proc


def failed(proc):
    """A clean failure: non-zero exit, one `[ldm]` line at the end of stderr, no traceback."""
    assert proc.returncode not in (0, None), proc.stdout[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return proc.stderr.strip().splitlines()[-1]


def compose_cfg(*overrides):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("train", overrides=list(overrides))


def same_tree(a, b, where="") -> None:
    """Recursive bit-equality of checkpoint contents (tensors, numbers, lists, dicts)."""
    if torch.is_tensor(a):
        assert torch.is_tensor(b) and a.dtype == b.dtype and torch.equal(a, b), f"{where} differs"
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), f"{where}: keys {sorted(map(str, a))} vs {sorted(map(str, b))}"
        for k in a:
            same_tree(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"{where}: lengths differ"
        for i, (x, y) in enumerate(zip(a, b)):
            same_tree(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def assert_same_checkpoint(a: Path, b: Path) -> None:
    """Weights, EMA, optimizer and schedule, per-rank RNG and data position: all bit-identical."""
    names = sorted(p.name for p in a.iterdir() if p.suffix in (".safetensors", ".pt"))
    assert names == sorted(p.name for p in b.iterdir() if p.suffix in (".safetensors", ".pt"))
    for name in names:
        if name.endswith(".safetensors"):
            same_tree(load_file(a / name), load_file(b / name), name)
        else:
            same_tree(torch.load(a / name, weights_only=True), torch.load(b / name, weights_only=True), name)


@pytest.fixture(scope="module")
def ae_run(shapes_shards, tmp_path_factory):
    """An uninterrupted tiny-autoencoder run through the CLI: checkpoints at steps 1-4 + autoencoder.safetensors."""
    run_dir = tmp_path_factory.mktemp("faults") / "ae"
    ok(cli(shapes_shards, run_dir, *KEEP_ALL))
    return run_dir


def copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("wandb", "images"))
    return dst


# ------------------------------------------------------------------------------ SIGKILL mid-save -> resume
def kill_and_resume(shards, reference: Path, run_dir: Path, kill: str, *extra, model=AE, procs=1):
    """Run with a SIGKILL at crash point `kill`, rerun the same command, compare its last checkpoint to
    `reference`'s (an uninterrupted run of the same command)."""
    args = [*KEEP_ALL, *extra]
    killed = cli(shards, run_dir, *args, model=model, procs=procs, env={"LDM_TEST_KILL": kill})
    assert killed.returncode != 0, "the crash point was not reached"
    resumed = ok(cli(shards, run_dir, *args, model=model, procs=procs))
    if procs == 1:  # (with 2, torchrun ends rank 0 with SIGTERM: its lock is released cleanly)
        assert "taking over the stale lock" in resumed.stdout  # the killed run's lock did not block the rerun
    assert_same_checkpoint(reference / "checkpoints/step_00000004", run_dir / "checkpoints/step_00000004")
    return resumed


@pytest.mark.slow
def test_sigkill_mid_save_autoencoder_one_process(shapes_shards, ae_run, tmp_path):
    resumed = kill_and_resume(shapes_shards, ae_run, tmp_path / "run", "model:3:0")
    assert "resuming step_00000002" in resumed.stdout


@pytest.mark.slow
def test_sigkill_mid_save_ldm_one_process_and_resave_window(shapes_shards, ae_run, tmp_path):
    first_stage = f"model.first_stage.ckpt={ae_run / 'autoencoder.safetensors'}"
    reference, run_dir = tmp_path / "reference", tmp_path / "run"
    args = ["trainer.keep_last=1", first_stage]
    ok(cli(shapes_shards, reference, *KEEP_ALL, *args, model=LDM))
    resumed = kill_and_resume(shapes_shards, reference, run_dir, "model:3:0", *args, model=LDM)
    assert "resuming step_00000002" in resumed.stdout
    # Rerunning the finished run re-saves step 4; a kill between its two renames (old copy set aside, new
    # one not yet in place) used to leave nothing, and keep_last=1 made the rerun start again from step 0.
    args = [*KEEP_ALL, *args]
    killed = cli(shapes_shards, run_dir, *args, model=LDM, env={"LDM_TEST_KILL": "swap:4:0"})
    assert killed.returncode != 0 and not (run_dir / "checkpoints/step_00000004").exists()
    assert [p.name for p in list_checkpoints(run_dir)] == ["step_00000004.old"]
    again = ok(cli(shapes_shards, run_dir, *args, model=LDM))
    assert "resuming step_00000004.old" in again.stdout
    assert [p.name for p in list_checkpoints(run_dir)] == ["step_00000004"]
    assert_same_checkpoint(reference / "checkpoints/step_00000004", run_dir / "checkpoints/step_00000004")


@pytest.mark.slow
def test_sigkill_mid_save_two_processes(shapes_shards, ae_run, tmp_path):
    """2 processes: rank 1 killed after writing its part of step 3 (torchrun tears the job down)."""
    reference = tmp_path / "reference"
    ok(cli(shapes_shards, reference, *KEEP_ALL, procs=2))
    resumed = kill_and_resume(shapes_shards, reference, tmp_path / "run", "rank:3:1", procs=2)
    assert "resuming step_00000002" in resumed.stdout


@pytest.mark.slow
def test_sigkill_mid_save_ldm_two_processes(shapes_shards, ae_run, tmp_path):
    """In the default suite on purpose (the issue asks for the 2-process LDM case in CI): ~30 s."""
    first_stage = [f"model.first_stage.ckpt={ae_run / 'autoencoder.safetensors'}"]
    reference = tmp_path / "reference"  # multi-process stage 2 fits its own tokenizer now (test_scaleout)
    ok(cli(shapes_shards, reference, *KEEP_ALL, *first_stage, model=LDM, procs=2))
    resumed = kill_and_resume(shapes_shards, reference, tmp_path / "run", "model:3:0", *first_stage, model=LDM,
                              procs=2)
    assert "resuming step_00000002" in resumed.stdout


# ------------------------------------------------------------------------------------------ NaN guard
@pytest.mark.slow
def test_nan_loss_skips_steps_then_stops_and_keeps_finite_state(shapes_shards, ae_run, tmp_path):
    """A healthy run resumed with kl_weight=1e38: every step is skipped (weights unchanged), the run stops
    after max_bad_steps with a non-zero exit, and autoencoder.safetensors keeps its finite scale_factor."""
    run_dir = copy_run(ae_run, tmp_path / "run")
    before = (run_dir / "autoencoder.safetensors").read_bytes()
    line = failed(cli(shapes_shards, run_dir, "trainer.max_steps=20", "trainer.ckpt_every=1", "trainer.keep_last=1",
                      "trainer.max_bad_steps=3", "model.task.loss.kl_weight=1e38"))
    assert "3 steps in a row had a non-finite loss" in line and "trainer.max_bad_steps=3" in line
    assert (run_dir / "autoencoder.safetensors").read_bytes() == before
    # steps 5, 6 skipped and saved (unhealthy); step 7 stopped the run; keep_last=1 still keeps the newest
    # healthy checkpoint, step 4, and the message names it
    assert "newest healthy checkpoint, step_00000004" in line
    last = list_checkpoints(run_dir)
    assert [p.name for p in last] == ["step_00000004", "step_00000006"]
    verify_checkpoint(last[1])
    same_tree(load_file(ae_run / "checkpoints/step_00000004/model.safetensors"),
              load_file(last[1] / "model.safetensors"), "weights after skipped steps")
    rows = [r.split(",") for r in (run_dir / "metrics.csv").read_text().splitlines()[1:]]
    assert [float(v) for _, k, v in rows if k == "train/skipped_steps"][-1] == 2


@pytest.mark.slow  # ~11 s; the kl_weight=1e38 test covers the default suite
def test_huge_learning_rate_stops_without_writing_nan(shapes_shards, tmp_path):
    run_dir = tmp_path / "run"
    line = failed(cli(shapes_shards, run_dir, "trainer.max_steps=30", "trainer.ckpt_every=1", "trainer.max_bad_steps=3",
                      "model.optim.autoencoder.lr=1e6", "model.optim.discriminator.lr=1e6"))
    assert "non-finite" in line
    assert not (run_dir / "autoencoder.safetensors").exists()
    for ckpt in list_checkpoints(run_dir):
        assert all(torch.isfinite(t).all() for t in load_file(ckpt / "model.safetensors").values())


@pytest.mark.slow  # ~40 s (two runs, three rewinds); the kl_weight=1e38 test covers healthy rotation by default
def test_finite_blow_up_keeps_the_healthy_checkpoint_and_names_it(shapes_shards, tmp_path):
    """A healthy run to step 6, resumed with lr=1e6: step 7 is a finite update that blows the weights up
    (the NaN guard cannot see it). The run must end non-zero, rotation (keep_last=2) must keep step 6
    bit-identical, and the stop message must name it."""
    run_dir = tmp_path / "run"
    every = ["trainer.ckpt_every=2", "trainer.keep_last=2"]
    ok(cli(shapes_shards, run_dir, "trainer.max_steps=6", *every))
    healthy = shutil.copytree(run_dir / "checkpoints/step_00000006", tmp_path / "step6")
    proc = cli(shapes_shards, run_dir, "trainer.max_steps=24", *every, "model.optim.autoencoder.lr=1e6",
               "model.optim.discriminator.lr=1e6")
    line = failed(proc)
    assert "step_00000006" in line and "trainer.spike.max_rewinds=3" in line, line
    assert proc.stdout.count("rewinding to step_00000006") == 3  # skipped steps, then 3 rewinds, then the stop
    assert_same_checkpoint(healthy, run_dir / "checkpoints/step_00000006")
    assert (run_dir / "checkpoints/step_00000006/state.json").read_bytes() == (healthy / "state.json").read_bytes()


def test_guard_decision_is_shared_by_all_ranks():
    """Another rank's NaN (the all-reduced flag is 1 here while this rank's numbers are finite) skips here too;
    buffers written by the bad forward pass are restored."""
    from ldm.training.guard import NAN_ROW, StepGuard

    module = torch.nn.BatchNorm1d(2)
    guard = StepGuard(2, all_reduce_sum=lambda t: t + 1, main_process=False, module=module)
    module.running_mean.fill_(float("nan"))
    assert guard.update(torch.tensor(1.0), {"g": torch.tensor(1.0)}) == 1  # a device flag, not a bool
    assert torch.equal(module.running_mean, torch.zeros(2)) and guard.check(step=1) is None and guard.skipped == 1
    guard.update(torch.tensor(1.0), {"g": torch.tensor(1.0)})
    with pytest.raises(NonFiniteError, match="2 steps in a row"):
        guard.check(step=2)
    alone = StepGuard(2, all_reduce_sum=lambda t: t)
    assert alone.update(torch.tensor(float("inf")), {}) == 1 and alone.update(torch.tensor(1.0), {}) == 0
    assert alone.check(step=2) is None and alone.skipped == 1 and alone.counts[NAN_ROW] == 0  # none in a row now
    # Two skips in a row between two checks stop the run even if a good step followed them.
    for loss in (float("nan"), float("nan"), 1.0):
        alone.update(torch.tensor(loss), {})
    with pytest.raises(NonFiniteError, match="2 steps in a row"):
        alone.check(step=5)


def _spike_on_one_rank(rank: int, port: int, out: str) -> None:
    import torch.distributed as dist
    from omegaconf import OmegaConf

    from ldm.config import SpikeConfig
    from ldm.training.guard import StepGuard

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)

    def all_reduce_sum(t):
        dist.all_reduce(t)
        return t

    spike = OmegaConf.structured(SpikeConfig(window=8, max_in_row=2))
    guard, flags = StepGuard(20, all_reduce_sum, rank == 0, spike=spike, world_size=2), []
    for step in range(12):
        # rank 1's loss jumps 1000x at steps 6, 9 and 10; rank 0's stays where it was (finite everywhere)
        loss = 1.0 + 0.01 * step + (1000.0 if rank == 1 and step in (6, 9, 10) else 0.0)
        flags.append(float(guard.update(torch.tensor(loss), {"g": torch.tensor(2.0)})))
        if step in (7, 11):
            flags.append(guard.check(step + 1))
    torch.save({"flags": flags, "history": guard.history}, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


def test_spike_on_one_rank_is_skipped_on_every_rank(tmp_path):
    """2 processes (gloo): a loss spike on rank 1 alone skips the step on both ranks, both keep the same
    running statistics, and two spikes in a row ask both for a rewind at the same check."""
    torch.multiprocessing.spawn(_spike_on_one_rank, args=(free_port(), str(tmp_path)), nprocs=2)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert ranks[0]["flags"] == ranks[1]["flags"]
    flags = ranks[0]["flags"]  # steps 0-7, check at 8, steps 8-11, check at 12
    assert flags[:8] == [0, 0, 0, 0, 0, 0, 1, 0] and flags[8] is None
    assert flags[9:13] == [0, 1, 1, 0] and flags[13] == "rewind"
    assert torch.equal(ranks[0]["history"].nan_to_num(-1), ranks[1]["history"].nan_to_num(-1))


def test_non_finite_weights_are_never_written(tmp_path):
    from ldm.models.autoencoder import AutoencoderKL, save_autoencoder

    ae = AutoencoderKL(embed_dim=4, ch=32, ch_mult=[1, 2], num_res_blocks=1, z_channels=4, resolution=32)
    path = tmp_path / "autoencoder.safetensors"
    save_autoencoder(ae, path, {"_target_": "ldm.models.autoencoder.AutoencoderKL"})
    before = path.read_bytes()
    ae.scale_factor.fill_(float("nan"))
    with pytest.raises(NonFiniteError, match="scale_factor.*existing file is untouched"):
        save_autoencoder(ae, path, {"_target_": "ldm.models.autoencoder.AutoencoderKL"})
    assert path.read_bytes() == before
    with pytest.raises(NonFiniteError, match="refusing to write checkpoint"):
        Checkpointer(tmp_path, task=ae, optimizers={}, schedulers={}, ema=None, loader=None, guard=None, meta={},
                     rank=0, world_size=1, barrier=lambda: None, keep_last=1, spike=None).save(1, "test")
    assert not (tmp_path / "checkpoints").exists()


# ------------------------------------------------------------------------------------- safe loading
class Payload:
    """Unpickling this runs `touch MARKER` (how a hostile checkpoint would run code)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.slow
def test_planted_pickle_payload_never_runs(shapes_shards, ae_run, tmp_path):
    """Payloads in training.pt (step 4) and rank_0.pt (step 3), with manifests recomputed so only the safe
    loader stands in the way: nothing runs, both are named, resume falls back to step 2 and ends identical."""
    run_dir = copy_run(ae_run, tmp_path / "run")
    marker = tmp_path / "PWNED"
    for step, name in ((4, "training.pt"), (3, "rank_0.pt")):
        ckpt = run_dir / f"checkpoints/step_{step:08d}"
        (ckpt / name).write_bytes(pickle.dumps({"optimizers": Payload(marker)}))
        write_manifest(ckpt, step)
    resumed = ok(cli(shapes_shards, run_dir, *KEEP_ALL))
    assert not marker.exists(), "a pickled payload ran"
    for bad in ("step_00000004/training.pt", "step_00000003/rank_0.pt"):
        assert bad in resumed.stdout and "cannot be loaded safely" in resumed.stdout
    assert "resuming step_00000002" in resumed.stdout
    assert_same_checkpoint(ae_run / "checkpoints/step_00000004", run_dir / "checkpoints/step_00000004")
    named = run_dir / "checkpoints/step_00000002"  # named explicitly: refused with its path, nothing runs
    (named / "training.pt").write_bytes(pickle.dumps(Payload(marker)))
    write_manifest(named, 2)
    with pytest.raises(CheckpointError, match=re.escape(f"{named / 'training.pt'} cannot be loaded safely")):
        resolve_resume(str(named), run_dir)
    assert not marker.exists()


@pytest.mark.parametrize("config", [
    {"_target_": "builtins.open", "file": "VICTIM", "mode": "w"},
    {"_target_": "ldm.models.autoencoder.AutoencoderKL", "embed_dim": {"_target_": "builtins.open", "file": "VICTIM",
                                                                       "mode": "w"}},
])
def test_hostile_target_in_autoencoder_file_is_refused_before_anything_is_built(tmp_path, config):
    from ldm.convert import load_autoencoder
    from ldm.models.autoencoder import CONFIG_METADATA_KEY

    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    config = json.loads(json.dumps(config).replace("VICTIM", str(victim)))
    crafted = tmp_path / "first_stage.ckpt"
    save_file({"w": torch.zeros(1)}, crafted, metadata={CONFIG_METADATA_KEY: json.dumps(config)})
    with pytest.raises(ValueError, match=re.escape(str(crafted)) + ".*(not an autoencoder class|nested)"):
        load_autoencoder(crafted)
    assert victim.read_text() == "precious"


# ------------------------------------------------------------------------------------------ integrity
def _flip(path: Path, at: float = 0.6):
    data = bytearray(path.read_bytes())
    i = int(len(data) * at)
    data[i] ^= 0xFF
    path.write_bytes(bytes(data))


DAMAGE = {
    "flipped byte in model.safetensors": lambda c: _flip(c / "model.safetensors"),
    "flipped byte in training.pt": lambda c: _flip(c / "training.pt"),
    "corrupt safetensors header": lambda c: _flip(c / "model.safetensors", at=0.0001),
    "truncated model.safetensors": lambda c: (c / "model.safetensors").write_bytes(
        (c / "model.safetensors").read_bytes()[:1000]),
    "empty rank_0.pt": lambda c: (c / "rank_0.pt").write_bytes(b""),
    "broken state.json": lambda c: (c / "state.json").write_text('{"step": 4, "wor'),
    "missing manifest": lambda c: (c / "manifest.json").unlink(),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_corrupt_checkpoint_is_named_and_latest_falls_back(ae_run, tmp_path, capsys, damage):
    run_dir = tmp_path / "run"
    shutil.copytree(ae_run / "checkpoints", run_dir / "checkpoints")
    bad = run_dir / "checkpoints/step_00000004"
    DAMAGE[damage](bad)
    assert resolve_resume("latest", run_dir) == run_dir / "checkpoints/step_00000003"
    out = capsys.readouterr().out
    assert f"not resuming from {bad}" in out and "resuming from" in out and "step_00000003" in out
    with pytest.raises(CheckpointError, match=re.escape(f"trainer.resume={bad} names a checkpoint that does not")):
        resolve_resume(str(bad), run_dir)  # named explicitly: never a fallback


@pytest.mark.slow  # ~5 s
def test_no_good_checkpoint_is_an_error_not_a_restart(shapes_shards, ae_run, tmp_path):
    run_dir = copy_run(ae_run, tmp_path / "run")
    for ckpt in list_checkpoints(run_dir):
        _flip(ckpt / "model.safetensors")
    line = failed(cli(shapes_shards, run_dir, "trainer.max_steps=6"))
    assert "verifies" in line and "nothing was loaded" in line and "trainer.resume=never" in line


def test_changed_optimizer_settings_take_effect_and_are_named(shapes_shards, ae_run, tmp_path):
    run_dir = copy_run(ae_run, tmp_path / "run")
    out = ok(cli(shapes_shards, run_dir, "trainer.max_steps=5", "model.optim.autoencoder.lr=2e-3",
                 "model.optim.discriminator.betas=[0.0,0.99]", "++model.optim.autoencoder.weight_decay=0.05")).stdout
    assert "autoencoder.lr 0.001 -> 0.002" in out and "discriminator.betas (0.5, 0.9) -> (0.0, 0.99)" in out
    assert "autoencoder.weight_decay 0.0 -> 0.05" in out
    groups = torch.load(run_dir / "checkpoints/step_00000005/training.pt", weights_only=True)["optimizers"]
    assert groups["autoencoder"]["param_groups"][0]["lr"] == 2e-3
    assert groups["autoencoder"]["param_groups"][0]["weight_decay"] == 0.05
    assert tuple(groups["discriminator"]["param_groups"][0]["betas"]) == (0.0, 0.99)


# --------------------------------------------------------------------------------- lock, disk, perms
def test_second_live_run_is_refused(shapes_shards, tmp_path):
    run_dir = tmp_path / "run"
    with RunLock(run_dir):  # this (live) process holds the run directory
        line = failed(cli(shapes_shards, run_dir))
    assert f"pid {os.getpid()}" in line and "another run" in line and str(run_dir) in line
    assert not (run_dir / "checkpoints").exists()


def test_stale_lock_of_a_dead_process_is_taken_over(tmp_path, capsys):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (tmp_path / "run.lock").write_text(json.dumps({"pid": int(dead.stdout), "host": socket.gethostname()}))
    with RunLock(tmp_path):
        assert "taking over the stale lock" in capsys.readouterr().out
    with RunLock(tmp_path):  # a clean release leaves no holder: no note the next time
        assert "stale" not in capsys.readouterr().out


def _file_size_limit(limit):
    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


@pytest.mark.slow  # ~8 s
def test_disk_full_while_saving_names_the_path_and_what_was_kept(shapes_shards, ae_run, tmp_path):
    """RLIMIT_FSIZE makes every write past 1 MB fail like a full disk (EFBIG instead of ENOSPC)."""
    run_dir = copy_run(ae_run, tmp_path / "run")
    line = failed(cli(shapes_shards, run_dir, "trainer.max_steps=6", "trainer.ckpt_every=1", "trainer.keep_last=0",
                      preexec_fn=_file_size_limit(1 << 20)))
    assert f"could not write checkpoint step 5 into {run_dir / 'checkpoints/step_00000005.tmp'}" in line
    assert "File too large" in line and "step_00000004) are untouched" in line
    assert not (run_dir / "checkpoints/step_00000005.tmp").exists()
    verify_checkpoint(run_dir / "checkpoints/step_00000004")


@pytest.mark.slow  # ~7 s
def test_read_only_checkpoint_dir_names_the_path(shapes_shards, ae_run, tmp_path):
    run_dir = copy_run(ae_run, tmp_path / "run")
    checkpoints = run_dir / "checkpoints"
    if subprocess.run(["chattr", "+i", str(checkpoints)], capture_output=True).returncode != 0:
        pytest.skip("chattr +i unavailable (needs root on ext4/xfs): root ignores chmod")
    try:
        line = failed(cli(shapes_shards, run_dir, "trainer.max_steps=5"))
    finally:
        subprocess.run(["chattr", "-i", str(checkpoints)])
    assert f"could not write checkpoint step 5 into {checkpoints / 'step_00000005.tmp'}" in line
    assert "Operation not permitted" in line and "untouched" in line


# ------------------------------------------------------------------------------------------------ data
def _tar(path: Path, rows):
    with wds.TarWriter(str(path), encoder=False) as sink:
        for row in rows:
            sink.write(row)


def _png(seed: int, fmt="PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(buf, format=fmt)
    return buf.getvalue()


def test_no_usable_sample_stops_with_one_line_instead_of_hanging(tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    for s in range(2):
        _tar(bad / f"train-{s}.tar", [{"__key__": f"k{s}{i}", "png": b"not a png", "txt": b"x"} for i in range(4)])
    shards = {"train": str(bad / "train-{0..1}.tar"), "val": str(bad / "train-{0..1}.tar")}
    line = failed(cli(shards, tmp_path / "run", timeout=120))
    # (training reads one lane per shard here: the first lane to find nothing usable says so)
    assert "no usable sample in a whole pass over the 1 shard(s) of lane" in line and "read 4 sample(s)" in line
    assert "'decode_error': 4" in line and "first reason: decode_error in" in line


def test_missing_caption_field_is_an_error_not_a_hang(shapes_shards):
    from ldm.data.webdataset import build_loader

    loader = build_loader(shapes_shards["val"], batch_size=4, image_size=32, num_workers=1,
                          caption_field="json:nope")
    with pytest.raises(DataError, match=r"skipped \{'missing_caption': 32\}; first reason: missing_caption"
                                        r".*no string field 'nope'"):
        next(iter(loader))


def test_bad_shards_are_skipped_with_named_reasons(tmp_path, caplog):
    """Corrupt PNG, corrupt JPEG, caption-less sample, zero-byte tar, empty tar, a truncated tar and a shard
    deleted after start-up: training data still flows, each fault is counted and named."""
    from ldm.data.webdataset import build_loader

    good = [{"__key__": f"good{i}", "png": _png(i), "txt": b"ok"} for i in range(4)]
    _tar(tmp_path / "s-0.tar", [*good, {"__key__": "badpng", "png": _png(9)[:40], "txt": b"x"},
                                {"__key__": "badjpg", "jpg": _png(9, "JPEG")[:100], "txt": b"x"},
                                {"__key__": "nocap", "png": _png(8)}])
    (tmp_path / "s-1.tar").write_bytes(b"")
    _tar(tmp_path / "s-2.tar", [])
    _tar(tmp_path / "s-3.tar", good)
    (tmp_path / "s-3.tar").write_bytes((tmp_path / "s-3.tar").read_bytes()[:1500])
    _tar(tmp_path / "s-4.tar", good)
    loader = build_loader(str(tmp_path / "s-{0..4}.tar"), batch_size=1, image_size=8, num_workers=0, epochs=1)
    (tmp_path / "s-4.tar").unlink()  # deleted mid-run: after the shard list was checked
    keys = [k for batch in loader for k in batch["key"]]
    assert {f"good{i}" for i in range(4)} <= set(keys)
    assert loader.skipped["decode_error"] == 2 and loader.skipped["missing_caption"] == 1
    assert loader.skipped["shard_error"] >= 2  # the truncated and the deleted shard (zero-byte/empty: no samples)
    messages = " ".join(r.getMessage() for r in caplog.records)
    assert "No such file or directory" in messages and "s-4.tar" in messages  # not a bare errno


def test_hostile_shard_keys_stay_data(tmp_path):
    from ldm.data.webdataset import build_loader

    keys = ["../../../etc/evil", "key with spaces", "ünïcødé-ключ", "$(touch PWNED)"]
    _tar(tmp_path / "s-0.tar", [{"__key__": k, "png": _png(i), "txt": b"x"} for i, k in enumerate(keys)])
    loader = build_loader(str(tmp_path / "s-0.tar"), batch_size=4, image_size=8, num_workers=0, epochs=1)
    assert sorted(k for b in loader for k in b["key"]) == sorted(keys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s-0.tar"]


# ----------------------------------------------------------------------------------------- config edges
@pytest.mark.parametrize("override,message", [
    ("trainer.ckpt_every=0", "trainer.ckpt_every=0: must be >= 1"),
    ("trainer.log_every=0", "trainer.log_every=0: must be >= 1"),
    ("trainer.max_steps=-5", "trainer.max_steps=-5: must be >= 1"),
    ("trainer.batch_size=0", "trainer.batch_size=0: must be >= 1"),
    ("trainer.max_bad_steps=0", "trainer.max_bad_steps=0: must be >= 1"),
    ("trainer.eval_every=-1", "trainer.eval_every=-1: must be >= 0"),
    ("trainer.mixed_precision=fp16", "fp16 with 2 optimizers"),
])
def test_nonsense_trainer_values_are_refused(override, message):
    cfg = compose_cfg("model=autoencoder_kl_tiny", "data=shapes", "trainer=debug", override)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        check_trainer(cfg)


def test_nonsense_values_fail_through_the_cli_before_compute(shapes_shards, tmp_path):
    line = failed(cli(shapes_shards, tmp_path / "run", "trainer.max_steps=-5"))
    assert line == "[ldm] config error: trainer.max_steps=-5: must be >= 1"
    assert not (tmp_path / "run/checkpoints").exists()  # (Hydra's log is there already)


def test_sequence_fields_are_type_checked():
    cfg = compose_cfg("model=autoencoder_kl_tiny", "data=shapes", "model.task.autoencoder.ch_mult=5")
    with pytest.raises(ConfigError, match=r"model.task.autoencoder.ch_mult: expected .*Sequence\[int\].*5"):
        check_targets(cfg.model.task, "model.task")
    cfg = compose_cfg("model=autoencoder_kl_tiny", "data=shapes", "model.task.autoencoder.ch_mult=[1,two]")
    with pytest.raises(ConfigError, match="ch_mult"):
        check_targets(cfg.model.task, "model.task")


def test_sample_options_are_validated_before_loading():
    from omegaconf import OmegaConf

    from train.sample import SampleConfig, check_options

    for override, message in (({"repeats": 0}, "repeats=0: images per prompt/label must be an integer >= 1"),
                              ({"sampler": "euler"}, "sampler='euler': choose one of ['ddim', 'ddpm', 'dpmpp_2m', "
                                                     "'plms']")):
        cfg = OmegaConf.merge(OmegaConf.structured(SampleConfig), {"run_dir": "x", "out_dir": "y", **override})
        with pytest.raises(ValueError, match=re.escape(message)):
            check_options(cfg)


@pytest.mark.slow  # ~6 s each
@pytest.mark.parametrize("override,message", [("sampler=euler", "sampler='euler': choose one of "
                                                                  "['ddim', 'ddpm', 'dpmpp_2m', 'plms']"),
                                              ("repeats=0", "repeats=0: images per prompt/label must be")])
def test_sample_cli_validates_options(tmp_path, override, message):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "train/sample.py", f"run_dir={tmp_path}", f"out_dir={tmp_path / 'out'}",
                           "prompts=[x]", override], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert failed(proc).startswith(f"[ldm] {message}")


# -------------------------------------------------------------------------- verified reads, clear OS errors
def _flip_exponent_of_each(directory: Path, member: str) -> int:
    """Flip bit 30 (the top exponent bit) of the last float32 of every `member` in the tars of `directory`,
    in place (tar headers untouched): a value near 1 becomes ~1e38, finite. Returns how many were hit."""
    import tarfile

    hits = 0
    for tar in sorted(directory.glob("*.tar")):
        with tarfile.open(tar) as archive:
            offsets = [m.offset_data + m.size - 1 for m in archive.getmembers() if m.name.endswith("." + member)]
        data = bytearray(tar.read_bytes())
        for at in offsets:
            data[at] ^= 0x40
        tar.write_bytes(bytes(data))
        hits += len(offsets)
    return hits


@pytest.mark.slow
def test_damaged_latent_cache_is_named_not_trained_on(shapes_shards, tiny_autoencoder, tmp_path):
    """One exponent byte flipped in each cached mean.npy: the run stops with a line naming a shard and the
    checksum, instead of training to the end on latents of 1e38."""
    from ldm.training.cache_latents import build_cache
    from train.cache_latents import compose_train_config

    cache = tmp_path / "latents"
    stage2 = [*LDM, f"model.first_stage.ckpt={tiny_autoencoder}"]
    build_cache(compose_train_config([*stage2, *data_args(shapes_shards)]), cache, batch_size=64)
    assert _flip_exponent_of_each(cache, "mean.npy") == 192
    proc = cli(shapes_shards, tmp_path / "run", "trainer.max_steps=2", f"data.latents={cache}", model=stage2)
    line = failed(proc)
    assert "checksum_error" in line and re.search(r"latents-0000\d\d\.tar key \S+: mean\.npy does not match", line)
    assert not (tmp_path / "run/checkpoints").exists()


def test_one_damaged_cache_shard_is_skipped_counted_and_named(shapes_shards, tiny_autoencoder, tmp_path, caplog):
    from ldm.data.latent_cache import LatentSampleDecoder, cache_shards
    from ldm.data.webdataset import build_loader
    from ldm.training.cache_latents import build_cache
    from train.cache_latents import compose_train_config

    cache = tmp_path / "latents"
    stage2 = [*LDM, f"model.first_stage.ckpt={tiny_autoencoder}"]
    build_cache(compose_train_config([*stage2, *data_args(shapes_shards)]), cache, batch_size=64)
    one = tmp_path / "one"
    one.mkdir()
    os.replace(cache / "latents-000003.tar", one / "latents-000003.tar")
    assert _flip_exponent_of_each(one, "mean.npy") == 24
    os.replace(one / "latents-000003.tar", cache / "latents-000003.tar")
    loader = build_loader(cache_shards(cache), batch_size=8, image_size=32, num_workers=0, epochs=1,
                          decoder=LatentSampleDecoder(32, "txt", None))
    means = torch.cat([batch["latent_mean"] for batch in loader])
    assert means.shape[0] == 192 - 24 and means.abs().max() < 1e3  # the other shards, none of the damage
    assert loader.skipped["checksum_error"] == 24 and sum(loader.skipped.values()) == 24
    assert any("latents-000003.tar" in r.getMessage() and "checksum_error" in r.getMessage() for r in caplog.records)


def _flip_bytes(path: Path, count: int = 4) -> None:
    """Flip `count` bytes spread over the tensor data of a safetensors file (its JSON header untouched)."""
    data = bytearray(path.read_bytes())
    start = 8 + int.from_bytes(data[:8], "little")
    for k in range(count):
        data[start + (len(data) - start) * (2 * k + 1) // (2 * count)] ^= 0x10
    path.write_bytes(bytes(data))


def test_damaged_autoencoder_file_is_named_through_the_cli(shapes_shards, tiny_autoencoder, tmp_path):
    from ldm.data.integrity import TENSORS_CHECKSUM_KEY, safetensors_metadata

    bad = tmp_path / "autoencoder.safetensors"
    shutil.copy(tiny_autoencoder, bad)
    assert TENSORS_CHECKSUM_KEY in safetensors_metadata(bad)
    _flip_bytes(bad)
    line = failed(cli(shapes_shards, tmp_path / "run", "trainer.max_steps=1",
                      model=[*LDM, f"model.first_stage.ckpt={bad}"]))
    assert line.startswith("[ldm]") and f"{bad} is corrupt" in line and "checksum" in line
    assert not (tmp_path / "run/checkpoints").exists()


def test_files_without_a_checksum_still_load_and_exports_are_verified(tiny_autoencoder, tmp_path):
    """Older and foreign files (no checksum in the metadata) load as before; an exported diffusers folder
    carries one, and a flipped byte in it is named by ldm.convert."""
    from ldm.convert import load_autoencoder as load_converted
    from ldm.convert.export import vae_to_diffusers
    from ldm.data.integrity import TENSORS_CHECKSUM_KEY
    from ldm.models.autoencoder import read_autoencoder_file as load_autoencoder
    from ldm.training.export import _write_model

    state = load_file(tiny_autoencoder)
    with __import__("safetensors").safe_open(str(tiny_autoencoder), "pt") as f:
        metadata = {k: v for k, v in f.metadata().items() if k != TENSORS_CHECKSUM_KEY}
    save_file(state, str(tmp_path / "old.safetensors"), metadata=metadata)
    model = load_autoencoder(tmp_path / "old.safetensors")
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    _write_model(tmp_path / "vae", *vae_to_diffusers(model))
    load_converted(tmp_path / "vae")  # verifies
    _flip_bytes(tmp_path / "vae/diffusion_pytorch_model.safetensors", count=1)
    with pytest.raises(CheckpointError, match=re.escape(str(tmp_path / "vae/diffusion_pytorch_model.safetensors"))
                       + " is corrupt"):
        load_converted(tmp_path / "vae")


def test_odd_headed_single_file_is_refused_not_guessed(tmp_path):
    """A CompVis-layout UNet file with 4 heads and 8 GroupNorm groups (SD has 8 and 32), and one with linear
    projections 32 channels wide (SD-2's 64-channel heads do not fit): the shapes identify no released layout,
    so loading without a config asks for it; with the config it is exact."""
    from ldm.convert import arch as archs
    from ldm.convert import load_unet
    from ldm.models.unet import UNetModel

    torch.manual_seed(0)
    odd = UNetModel(4, 4, 32, 1, [1], [1, 2], num_heads=4, context_dim=24, norm_groups=8).eval()
    save_file({"model.diffusion_model." + k: v for k, v in odd.state_dict().items()}, str(tmp_path / "odd.safetensors"))
    with pytest.raises(archs.ArchitectureError) as error:
        load_unet(tmp_path / "odd.safetensors")
    message = str(error.value)
    assert str(tmp_path / "odd.safetensors") in message and "not a layout ldm knows" in message
    assert "YAML" in message and "num_heads" in message and "norm_groups" in message and "\n" not in message
    with pytest.raises(archs.ArchitectureError, match="norm_groups"):  # the heads alone are still half a guess
        load_unet(tmp_path / "odd.safetensors", config={"num_heads": 4})
    x, t, context = torch.randn(2, 4, 8, 8), torch.tensor([10, 700]), torch.randn(2, 5, 24)
    with torch.no_grad():
        given = load_unet(tmp_path / "odd.safetensors", config={"num_heads": 4, "norm_groups": 8})
        assert torch.equal(given(x, t, context), odd(x, t, context))

    narrow = UNetModel(4, 4, 32, 1, [1], [1, 2], num_head_channels=8, context_dim=24, use_linear_in_transformer=True,
                       norm_groups=8)
    save_file({"model.diffusion_model." + k: v for k, v in narrow.state_dict().items()},
              str(tmp_path / "narrow.safetensors"))
    with pytest.raises(archs.ArchitectureError, match="not a layout ldm knows"):  # was a bare ZeroDivisionError
        load_unet(tmp_path / "narrow.safetensors")
    with pytest.raises(archs.ArchitectureError, match="does not split 32 channels into whole heads"):
        load_unet(tmp_path / "narrow.safetensors", config={"num_head_channels": 64, "norm_groups": 8})


def test_odd_first_stage_file_is_one_line_through_the_cli(shapes_shards, tmp_path):
    from ldm.models.autoencoder import AutoencoderKL

    vae = AutoencoderKL(embed_dim=4, ch=32, ch_mult=[1, 2], num_res_blocks=1, z_channels=4, norm_groups=8)
    save_file({"first_stage_model." + k: v for k, v in vae.state_dict().items()}, str(tmp_path / "vae.safetensors"))
    line = failed(cli(shapes_shards, tmp_path / "run", "trainer.max_steps=1",
                      model=[*LDM, f"model.first_stage.ckpt={tmp_path / 'vae.safetensors'}"]))
    assert f"{tmp_path / 'vae.safetensors'}: its autoencoder" in line and "not a layout ldm knows" in line
    assert "norm_groups" in line and "save_autoencoder" in line


def test_known_first_stage_layouts_are_the_compvis_presets():
    """KNOWN_AUTOENCODERS (loaded from single files without a config) are conf/model's CompVis first stages."""
    from ldm.convert import arch as archs

    for name, layout in archs.KNOWN_AUTOENCODERS.items():
        preset = compose_cfg(f"model=autoencoder_{name.split()[0].lower().replace('-', '_')}").model.task.autoencoder
        assert {k: (list(v) if k in ("ch_mult", "attn_resolutions") else v) for k, v in preset.items() if k in layout} \
            == layout and preset.resolution == 256, name


WRITES = """
import sys, torch
from ldm.errors import RunError, write_error_message
from ldm.models.autoencoder import AutoencoderKL, save_autoencoder
out = sys.argv[1]
try:  # safetensors quotes the errno
    save_autoencoder(AutoencoderKL(embed_dim=4, ch=32, ch_mult=[1, 2], num_res_blocks=1, z_channels=4),
                     out + "/autoencoder.safetensors", {"_target_": "ldm.models.autoencoder.AutoencoderKL"})
except RunError as e:
    print("autoencoder:", e)
try:  # torch.save drops it ("inline_container.cc ... unexpected pos"): read off the filesystem
    torch.save({"w": torch.zeros(1 << 20)}, out + "/training.pt")
except RuntimeError as e:
    print("torch:", str(e).splitlines()[0], "->", write_error_message(e, out + "/training.pt"))
"""


def _limited(limit, *args, **kwargs):
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"},
                          preexec_fn=_file_size_limit(limit), **kwargs)


def test_file_size_limit_in_saves_and_the_cache_names_the_reason_and_path(shapes_shards, tiny_autoencoder, tmp_path):
    """RLIMIT_FSIZE (works with or without root): every write past the limit fails with EFBIG, as a full disk
    fails with ENOSPC. The message is the OS's reason and the path, never torch's `inline_container.cc`."""
    out = _limited(1 << 16, "-c", WRITES, str(tmp_path)).stdout
    assert f"autoencoder: could not write {tmp_path / 'autoencoder.safetensors'}: File too large (EFBIG)" in out
    assert "no file was written" in out and not list(tmp_path.glob("autoencoder.safetensors*"))
    torch_line = next(line for line in out.splitlines() if line.startswith("torch:"))
    assert "inline_container" in torch_line  # what torch says ...
    assert torch_line.endswith(f"-> could not write {tmp_path / 'training.pt'}: File too large (EFBIG): this process "
                               "may write files of at most 65536 bytes (ulimit -f)")  # ... and what we say

    cache = tmp_path / "latents"  # batch 1: the loader worker's shared-memory batches stay under the limit too
    proc = _limited(1 << 15, "train/cache_latents.py", *LDM, f"model.first_stage.ckpt={tiny_autoencoder}",
                    *data_args(shapes_shards), "--out", str(cache), "--batch-size", "1")
    line = failed(proc)
    assert re.fullmatch(rf"\[ldm\] could not write {re.escape(str(cache))}/latents-000000\.tar\.\d+\.tmp: "
                        r"File too large \(EFBIG\): this process may write files of at most 32768 bytes "
                        r"\(ulimit -f\); the shards recorded so far are kept: rerun .*", line), line
    assert not list(cache.glob("*.tmp"))


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 1 MiB tmpfs (a real full disk: ENOSPC) and a read-only one (EROFS). Mounting needs CAP_SYS_ADMIN;
    without it these faults are only reachable by the RLIMIT test above."""
    mounts = {"full": tmp_path / "full", "ro": tmp_path / "ro"}
    done = []
    try:
        for name, options in (("full", "size=1m"), ("ro", "ro,size=1m")):
            mounts[name].mkdir()
            if subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(mounts[name])],
                              capture_output=True).returncode:
                pytest.skip("cannot mount a tmpfs here (needs CAP_SYS_ADMIN); the RLIMIT_FSIZE test covers the "
                            "messages")
            done.append(mounts[name])
        yield mounts
    finally:
        for mount in done:
            subprocess.run(["umount", "-l", str(mount)])


def test_full_and_read_only_disks_are_named(small_tmpfs, tiny_autoencoder):
    from ldm.errors import CheckpointWriteError, write_error_message
    from ldm.models.autoencoder import read_autoencoder_file as load_autoencoder, save_autoencoder
    from ldm.training.export import _write_model

    model = load_autoencoder(tiny_autoencoder)
    config = {"_target_": "ldm.models.autoencoder.AutoencoderKL", "embed_dim": 4}
    full, read_only = small_tmpfs["full"], small_tmpfs["ro"]
    (full / "filler").write_bytes(b"\0" * ((1 << 20) - (64 << 10)))  # 64 KiB left
    with pytest.raises(CheckpointWriteError, match=re.escape(f"could not write {full / 'ae.safetensors'}: "
                                                             "No space left on device (ENOSPC); no file was written")):
        save_autoencoder(model, full / "ae.safetensors", config)
    with pytest.raises(RuntimeError) as error:
        torch.save({"w": torch.zeros(1 << 18)}, full / "training.pt")
    assert "inline_container" in str(error.value)
    assert write_error_message(error.value, full / "training.pt").endswith("No space left on device (ENOSPC)")
    with pytest.raises(CheckpointWriteError, match=re.escape(f"could not write {read_only / 'ae.safetensors'}: "
                                                             "Read-only file system (EROFS)")):
        save_autoencoder(model, read_only / "ae.safetensors", config)
    with pytest.raises(OSError) as error:
        _write_model(read_only / "vae", {}, {})
    assert write_error_message(error.value, read_only / "vae").endswith("Read-only file system (EROFS)")
