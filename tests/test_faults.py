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

from ldm.training.checkpoint import list_checkpoints, resolve_resume, save_checkpoint, verify_checkpoint, write_manifest
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


def test_sigkill_mid_save_autoencoder_one_process(shapes_shards, ae_run, tmp_path):
    resumed = kill_and_resume(shapes_shards, ae_run, tmp_path / "run", "model:3:0")
    assert "resuming step_00000002" in resumed.stdout


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


def test_sigkill_mid_save_two_processes(shapes_shards, ae_run, tmp_path):
    """2 processes: rank 1 killed after writing its part of step 3 (torchrun tears the job down)."""
    reference = tmp_path / "reference"
    ok(cli(shapes_shards, reference, *KEEP_ALL, procs=2))
    resumed = kill_and_resume(shapes_shards, reference, tmp_path / "run", "rank:3:1", procs=2)
    assert "resuming step_00000002" in resumed.stdout


def test_sigkill_mid_save_ldm_two_processes(shapes_shards, ae_run, tmp_path):
    """In the default suite on purpose (the issue asks for the 2-process LDM case in CI): ~30 s."""
    first_stage = [f"model.first_stage.ckpt={ae_run / 'autoencoder.safetensors'}"]
    reference = tmp_path / "reference"  # multi-process stage 2 fits its own tokenizer now (test_scaleout)
    ok(cli(shapes_shards, reference, *KEEP_ALL, *first_stage, model=LDM, procs=2))
    resumed = kill_and_resume(shapes_shards, reference, tmp_path / "run", "model:3:0", *first_stage, model=LDM,
                              procs=2)
    assert "resuming step_00000002" in resumed.stdout


# ------------------------------------------------------------------------------------------ NaN guard
def test_nan_loss_skips_steps_then_stops_and_keeps_finite_state(shapes_shards, ae_run, tmp_path):
    """A healthy run resumed with kl_weight=1e38: every step is skipped (weights unchanged), the run stops
    after max_bad_steps with a non-zero exit, and autoencoder.safetensors keeps its finite scale_factor."""
    run_dir = copy_run(ae_run, tmp_path / "run")
    before = (run_dir / "autoencoder.safetensors").read_bytes()
    line = failed(cli(shapes_shards, run_dir, "trainer.max_steps=20", "trainer.ckpt_every=1", "trainer.keep_last=1",
                      "trainer.max_bad_steps=3", "model.task.loss.kl_weight=1e38"))
    assert "3 steps in a row had a non-finite loss" in line and "trainer.max_bad_steps=3" in line
    assert (run_dir / "autoencoder.safetensors").read_bytes() == before
    last = list_checkpoints(run_dir)
    assert [p.name for p in last] == ["step_00000006"]  # steps 5, 6 skipped and saved; step 7 stopped the run
    verify_checkpoint(last[0])
    same_tree(load_file(ae_run / "checkpoints/step_00000004/model.safetensors"),
              load_file(last[0] / "model.safetensors"), "weights after skipped steps")
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


def test_guard_decision_is_shared_by_all_ranks():
    """Another rank's NaN (the all-reduced flag is 1 here while this rank's numbers are finite) skips here too;
    buffers written by the bad forward pass are restored."""
    from ldm.training.guard import StepGuard

    module = torch.nn.BatchNorm1d(2)
    guard = StepGuard(2, all_reduce_sum=lambda t: t + 1, main_process=False, module=module)
    module.running_mean.fill_(float("nan"))
    assert guard.update(torch.tensor(1.0), {"g": torch.tensor(1.0)}) == 1  # a device flag, not a bool
    assert torch.equal(module.running_mean, torch.zeros(2)) and guard.check(step=1) == 1
    guard.update(torch.tensor(1.0), {"g": torch.tensor(1.0)})
    with pytest.raises(NonFiniteError, match="2 steps in a row"):
        guard.check(step=2)
    alone = StepGuard(2, all_reduce_sum=lambda t: t)
    assert alone.update(torch.tensor(float("inf")), {}) == 1 and alone.update(torch.tensor(1.0), {}) == 0
    assert alone.check(step=2) == 1 and alone.counts[1] == 0  # none in a row now
    # Two skips in a row between two checks stop the run even if a good step followed them.
    for loss in (float("nan"), float("nan"), 1.0):
        alone.update(torch.tensor(loss), {})
    with pytest.raises(NonFiniteError, match="2 steps in a row"):
        alone.check(step=5)


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
        save_checkpoint(tmp_path, 1, task=ae, optimizers={}, schedulers={}, ema=None, loader=None, meta={}, rank=0,
                        world_size=1, barrier=lambda: None, keep_last=1)
    assert not (tmp_path / "checkpoints").exists()


# ------------------------------------------------------------------------------------- safe loading
class Payload:
    """Unpickling this runs `touch MARKER` (how a hostile checkpoint would run code)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


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
    from ldm.models.autoencoder import CONFIG_METADATA_KEY, load_autoencoder

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
