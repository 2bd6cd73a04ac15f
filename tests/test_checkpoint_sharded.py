"""Sharded checkpoints (`trainer.checkpoint_format=sharded`) through the real CLI: every rank writes its
shards; a run resumes on another process count (and under FSDP) and ends where a straight run ends;
train/consolidate.py and train/sample.py read it; a damaged shard or a planted pickle is refused in one
line; a background save completes, a failed one stops the run in one line, and a kill during one leaves the
previous checkpoint the latest."""
import json
import pickle
import shutil
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from ldm.errors import CheckpointError
from ldm.training.checkpoint_files import list_checkpoints, resolve_resume, verify_checkpoint, write_manifest
from ldm.training.consolidate import read_sharded_weights
from tests.launch import ENV, ROOT, launch_cmd, run

SHARDED = ["trainer.checkpoint_format=sharded"]


def args(shards, first_stage, run_dir, *extra):
    return ["model=ldm_txt2img_tiny", "model.task.sample_steps=2", "data=shapes", f"data.shards='{shards['train']}'",
            f"data.val_shards='{shards['val']}'", "data.image_size=32", "trainer=debug", "trainer.ckpt_every=1000",
            "logger=none", f"model.first_stage.ckpt={first_stage}", f"run_dir={run_dir}", *extra]


def weights(checkpoint: Path, name: str = "model"):
    """A checkpoint's weights (or EMA) as single-file tensors, whatever its format."""
    if (checkpoint / ".metadata").is_file():
        model, ema = read_sharded_weights(checkpoint)
        return model if name == "model" else ema
    return load_file(checkpoint / f"{name}.safetensors")


def max_diff(a, b):
    assert a.keys() == b.keys(), set(a) ^ set(b)
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a if not k.endswith("_extra_state"))


def failed_line(proc):
    """A clean failure: non-zero exit, no traceback; the last line of stderr."""
    assert proc.returncode != 0, proc.stdout[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return proc.stderr.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def sharded_run(shapes_shards, tiny_autoencoder, tmp_path_factory):
    """2 processes, sharded checkpoints at steps 1 and 2."""
    run_dir = tmp_path_factory.mktemp("sharded") / "run"
    run(launch_cmd(2, *args(shapes_shards, tiny_autoencoder, run_dir, *SHARDED, "trainer.max_steps=2",
                            "trainer.ckpt_every=1", "trainer.keep_last=0")))
    return run_dir


def test_every_rank_writes_its_shards_and_the_manifest_lists_them(sharded_run):
    step = sharded_run / "checkpoints/step_00000002"
    state, manifest = verify_checkpoint(step), json.loads((step / "manifest.json").read_text())
    assert state["format"] == "sharded" and state["world_size"] == 2
    on_disk = {p.name for p in step.iterdir()} - {"manifest.json", "state.json"}
    assert set(manifest["files"]) == on_disk >= {".metadata", "__0_0.distcp", "__1_0.distcp", "rank_0.pt",
                                                 "rank_1.pt", "training.pt"}
    # DDP: each replicated tensor is written by one rank, not by both (two shards ~ one copy of the state)
    shards = [(step / f"__{r}_0.distcp").stat().st_size for r in (0, 1)]
    model, ema = read_sharded_weights(step)
    state_bytes = sum(t.numel() * t.element_size() for t in [*model.values(), *ema.values()])
    assert min(shards) > 0.25 * sum(shards) and sum(shards) < 2.5 * state_bytes  # + Adam's 2 moments: ~2x, not 4x


def test_flipped_byte_in_a_shard_is_refused_in_one_line(shapes_shards, tiny_autoencoder, sharded_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(sharded_run, run_dir)
    shard = run_dir / "checkpoints/step_00000002/__1_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    proc = run(launch_cmd(1, *args(shapes_shards, tiny_autoencoder, run_dir, *SHARDED,
                                   f"trainer.resume={shard.parent}", "trainer.max_steps=3")), check=False)
    line = failed_line(proc)
    assert line.startswith("[ldm] ") and f"{shard} does not match its checksum" in line, line
    assert resolve_resume("latest", run_dir).name == "step_00000001"  # `latest` falls back, as for full ones
    # sampling names it too
    proc = run([sys.executable, "train/sample.py", f"run_dir={run_dir}", f"checkpoint={shard.parent}", "prompts=[a]"],
               check=False)
    assert f"{shard} does not match its checksum" in failed_line(proc)


def test_planted_pickle_in_the_shard_index_never_runs(sharded_run, tmp_path):
    step = tmp_path / "step_00000002"
    shutil.copytree(sharded_run / "checkpoints/step_00000002", step)
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    (step / ".metadata").write_bytes(pickle.dumps(Payload()))
    write_manifest(step, 2)  # a consistent manifest: the allow-list, not the checksum, must stop it
    with pytest.raises(CheckpointError, match=r"\.metadata cannot be loaded safely .*not allowed"):
        verify_checkpoint(step)
    assert not marker.exists()


@pytest.mark.slow
def test_two_processes_resume_on_one_then_two_fsdp_equal_a_straight_run_and_sample(shapes_shards, tiny_autoencoder,
                                                                                    tmp_path):
    """2 processes (DDP) -> 1 process -> 2 processes (FSDP), resharding at each resume, against one process
    going straight to step 6 with full checkpoints; then consolidate and sample."""
    reference, elastic = tmp_path / "reference", tmp_path / "elastic"
    run(launch_cmd(1, *args(shapes_shards, tiny_autoencoder, reference, "trainer.max_steps=6")))
    for procs, steps, extra in ((2, 2, []), (1, 4, []), (2, 6, ["trainer.strategy=fsdp"])):
        proc = run(launch_cmd(procs, *args(shapes_shards, tiny_autoencoder, elastic, *SHARDED,
                                           f"trainer.max_steps={steps}", *extra)))
        if steps > 2:
            assert f"written by {2 if procs == 1 else 1} processes on {procs}" in proc.stdout, proc.stdout[-2000:]
    checkpoint = list_checkpoints(elastic)[-1]
    assert verify_checkpoint(checkpoint)["strategy"] == "fsdp"
    a, b = reference / "checkpoints/step_00000006", checkpoint
    # the tolerances of the scale-out tests: 1e-6 after a DDP process-count change, 1e-5 under FSDP
    assert max_diff(weights(a), weights(b)) <= 1e-5
    assert max_diff(weights(a, "ema"), weights(b, "ema")) <= 1e-5

    sampled = run([sys.executable, "train/sample.py", f"run_dir={elastic}", "prompts=[a red circle]", "seed=0"])
    assert sampled.stdout.count("consolidating its weights in memory") == 1
    assert (elastic / "samples/grid.png").is_file()
    consolidated = run([sys.executable, "train/consolidate.py", str(elastic)])
    out = elastic / "consolidated/step_00000006"
    assert f"-> {out}" in consolidated.stdout
    assert verify_checkpoint(out)["format"] == "consolidated"
    assert max_diff(load_file(out / "model.safetensors"), weights(b)) == 0
    assert max_diff(load_file(out / "ema.safetensors"), weights(b, "ema")) == 0
    again = run([sys.executable, "train/sample.py", f"run_dir={elastic}", f"checkpoint={out}", "prompts=[a red circle]",
                 "seed=0", f"out_dir={elastic / 'samples2'}"])
    assert "consolidating" not in again.stdout
    assert (elastic / "samples2/grid.png").read_bytes() == (elastic / "samples/grid.png").read_bytes()
    assert "already one file" in failed_line(run([sys.executable, "train/consolidate.py", str(a)], check=False))


@pytest.mark.slow
def test_background_saves_complete_and_a_kill_during_one_keeps_the_previous(shapes_shards, tiny_autoencoder, tmp_path):
    """trainer.checkpoint_async: at 2 processes every checkpoint completes, verifies and equals the foreground
    run's; a SIGKILL after the shards of step 3 are written but before the swap leaves step 2 the latest,
    and rerunning the command ends where the uninterrupted run ends."""
    every = [*SHARDED, "trainer.max_steps=4", "trainer.ckpt_every=1", "trainer.keep_last=0"]
    foreground, background = tmp_path / "foreground", tmp_path / "background"
    run(launch_cmd(2, *args(shapes_shards, tiny_autoencoder, foreground, *every)))
    proc = run(launch_cmd(2, *args(shapes_shards, tiny_autoencoder, background, *every,
                                   "trainer.checkpoint_async=true")))
    assert "in the background; training goes on" in proc.stdout and "saved" in proc.stdout
    assert [p.name for p in list_checkpoints(background)] == [f"step_0000000{s}" for s in (1, 2, 3, 4)]
    for s in (1, 2, 3, 4):
        b, f = background / f"checkpoints/step_0000000{s}", foreground / f"checkpoints/step_0000000{s}"
        verify_checkpoint(b)
        assert max_diff(weights(b), weights(f)) == 0 and max_diff(weights(b, "ema"), weights(f, "ema")) == 0

    killed_dir = tmp_path / "killed"
    cmd = launch_cmd(1, *args(shapes_shards, tiny_autoencoder, killed_dir, *every, "trainer.checkpoint_async=true"))
    killed = run(cmd, check=False, env={**ENV, "LDM_TEST_KILL": "shards:3:0"})
    assert killed.returncode != 0, "the crash point was not reached"
    assert [p.name for p in list_checkpoints(killed_dir)] == ["step_00000001", "step_00000002"]
    assert (killed_dir / "checkpoints/step_00000003.tmp/__0_0.distcp").is_file()  # written, never swapped in
    resumed = run(cmd)
    assert "resuming step_00000002" in resumed.stdout
    one = tmp_path / "one"  # the uninterrupted 1-process run
    run(launch_cmd(1, *args(shapes_shards, tiny_autoencoder, one, *every)))
    a, b = one / "checkpoints/step_00000004", killed_dir / "checkpoints/step_00000004"
    assert max_diff(weights(a), weights(b)) == 0 and max_diff(weights(a, "ema"), weights(b, "ema")) == 0


@pytest.mark.slow
def test_a_failed_background_save_stops_in_one_line_and_keeps_the_previous(shapes_shards, tiny_autoencoder, tmp_path):
    """Every write past 1 MiB fails (RLIMIT_FSIZE: EFBIG, as a full disk gives ENOSPC), so the background
    writer of step 3 fails while training goes on. The next save says so in one line, naming the checkpoint
    and what was kept; the partial directory is gone and step 2 is still the latest and verifies."""
    import resource
    import signal
    import subprocess

    def limit_file_size():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))

    every = [*SHARDED, "trainer.ckpt_every=1", "trainer.keep_last=0", "trainer.checkpoint_async=true"]
    run_dir = tmp_path / "run"
    run(launch_cmd(1, *args(shapes_shards, tiny_autoencoder, run_dir, *every, "trainer.max_steps=2")))
    cmd = [sys.executable, "train/main.py", *args(shapes_shards, tiny_autoencoder, run_dir, *every, "trainer.max_steps=4")]
    proc = subprocess.run(cmd, env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=600,
                          preexec_fn=limit_file_size)
    line = failed_line(proc)
    assert "could not write checkpoint step 3" in line, line
    assert "File too large" in line and "step_00000002" in line, line
    assert [p.name for p in list_checkpoints(run_dir)] == ["step_00000001", "step_00000002"]
    assert not (run_dir / "checkpoints/step_00000003.tmp").exists()
    verify_checkpoint(run_dir / "checkpoints/step_00000002")


def test_async_without_sharded_is_a_config_error():
    from hydra import compose, initialize_config_dir

    from ldm.config import ConfigError, check_trainer, register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(Path(__file__).resolve().parents[1] / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=["trainer.checkpoint_async=true"])
        sharded = compose("train", overrides=["trainer.checkpoint_async=true", *SHARDED])
    with pytest.raises(ConfigError, match="checkpoint_async=true needs trainer.checkpoint_format=sharded"):
        check_trainer(cfg)
    check_trainer(sharded)


@pytest.mark.slow
def test_export_and_evaluate_read_a_sharded_checkpoint_as_its_consolidated_copy(sharded_run, tmp_path):
    """train/export.py on the sharded run (consolidated in memory, said once) writes the UNet that exporting
    the train/consolidate.py copy writes; train/evaluate.py reads it too."""
    run_dir = tmp_path / "run"
    shutil.copytree(sharded_run, run_dir)
    direct = run([sys.executable, "train/export.py", str(run_dir), str(tmp_path / "direct")])
    assert direct.stdout.count("is sharded: consolidating its weights in memory") == 1
    run([sys.executable, "train/consolidate.py", str(run_dir / "checkpoints/step_00000002"), "--out",
         str(tmp_path / "joined")])
    via = run([sys.executable, "train/export.py", str(run_dir), str(tmp_path / "via"), "--checkpoint",
               str(tmp_path / "joined")])
    assert "consolidating" not in via.stdout
    a, b = (load_file(tmp_path / d / "unet/diffusion_pytorch_model.safetensors") for d in ("direct", "via"))
    assert max_diff(a, b) == 0
    evaluated = run([sys.executable, "train/evaluate.py", str(run_dir), "--batches", "1", "--no-fid"])
    assert "consolidating its weights in memory" in evaluated.stdout


def test_paper_scale_arithmetic():
    """benchmarks/scale_model.py: 860M x 16 B = 13.76 GB; 64 ranks on 8 nodes at 1 GB/s per node."""
    out = run([sys.executable, "benchmarks/scale_model.py", "--node-gbps", "1"]).stdout
    assert "| SD-v1 UNet (860M) | 13.8 GB | 64 (8) | 13.8 GB | 215 MB | 13.8 s | yes/yes | 1.7 s | yes/yes |" in out
    assert "| 2.6B UNet | 41.6 GB | 256 (32) | 41.6 GB | 162 MB | 41.6 s | yes/yes | 1.3 s | yes/yes |" in out


@pytest.mark.slow
def test_save_benchmark_runs_at_a_tiny_size():
    out = run([sys.executable, "benchmarks/checkpoint_save.py", "--channels", "32", "--repeats", "1"]).stdout
    assert "sharded/full: save time" in out and "async/full" in out
