"""End-to-end stage-1 training through train/main.py's loop on real generated shards."""
import json
import shutil
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from safetensors.torch import load_file

from ldm.config import register_configs

CONF = Path(__file__).resolve().parents[1] / "conf"
register_configs()


def tiny_cfg(shards, run_dir, *extra):
    overrides = ["model=autoencoder_kl_tiny", "data=shapes", f"data.shards='{shards['train']}'",
                 f"data.val_shards='{shards['val']}'", "data.image_size=32", "data.num_workers=1",
                 "data.shuffle_buffer=16", "trainer=debug", "logger=none", f"run_dir={run_dir}", *extra]
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("train", overrides=overrides)


def train(cfg):
    from ldm.training.loop import train as run

    return run(cfg)


@pytest.mark.slow
def test_trains_writes_everything_and_wandb_offline(shapes_shards, tmp_path, capsys, monkeypatch):
    # no W&B mode and no API key anywhere: offline, said in one line, no crash and no hang
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    run_dir = tmp_path / "run"
    train(tiny_cfg(shapes_shards, run_dir, "logger=wandb", "trainer.eval_every=2"))
    out = capsys.readouterr().out
    assert sum("W&B: no API key found, logging offline" in line for line in out.splitlines()) == 1
    ckpts = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert ckpts == ["step_00000002", "step_00000004"]
    state = json.loads((run_dir / "checkpoints/step_00000004/state.json").read_text())
    assert state["step"] == 4 and state["model"] == "autoencoder_kl_tiny"
    assert list(run_dir.glob("wandb/offline-run-*")), "no offline W&B run written"
    assert list((run_dir / "images").glob("reconstructions_*.png"))
    rows = (run_dir / "metrics.csv").read_text().splitlines()
    names = {r.split(",")[1] for r in rows[1:]}
    assert {"train/loss", "train/img_per_s", "val/psnr", "val/ssim", "val/lpips_random", "grad_norm/autoencoder",
            "lr/autoencoder"} <= names
    from ldm.convert import load_autoencoder

    ae = load_autoencoder(run_dir / "autoencoder.safetensors")
    assert 0.01 < float(ae.scale_factor) < 100 and float(ae.scale_factor) != 1.0
    assert ae.latent_std.shape == (4,) and (ae.latent_std > 0).all()

    # the evaluation command: metrics over the whole held-out split (32 images), from the checkpoint
    from train.evaluate import evaluate_run

    metrics = evaluate_run(run_dir)
    assert metrics["images"] == 32 and metrics["checkpoint"].endswith("step_00000004")
    assert 0 < metrics["psnr"] < 60 and -1 <= metrics["ssim"] <= 1 and metrics["lpips_random"] >= 0
    assert json.loads((run_dir / "eval.json").read_text())["psnr"] == metrics["psnr"]
    assert "val/psnr" in json.loads((run_dir / "final_metrics.json").read_text())


@pytest.mark.slow
def test_resume_continues_with_identical_state(shapes_shards, tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train(tiny_cfg(shapes_shards, straight, "trainer.max_steps=4", "trainer.ckpt_every=2"))
    train(tiny_cfg(shapes_shards, resumed, "trainer.max_steps=2", "trainer.ckpt_every=2"))
    # the second half, started by re-running the same command with a larger budget, resumes at step 2
    train(tiny_cfg(shapes_shards, resumed, "trainer.max_steps=4", "trainer.ckpt_every=2"))
    a = load_file(straight / "checkpoints/step_00000004/model.safetensors")
    b = load_file(resumed / "checkpoints/step_00000004/model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after resume"
    oa = torch.load(straight / "checkpoints/step_00000004/training.pt", weights_only=False)
    ob = torch.load(resumed / "checkpoints/step_00000004/training.pt", weights_only=False)
    for name in oa["optimizers"]:
        sa, sb = oa["optimizers"][name]["state"], ob["optimizers"][name]["state"]
        assert sa.keys() == sb.keys()
        for i in sa:
            assert torch.equal(sa[i]["exp_avg"], sb[i]["exp_avg"]) and torch.equal(sa[i]["step"], sb[i]["step"])


@pytest.mark.slow
def test_resume_refuses_other_preset(shapes_shards, tmp_path):
    run_dir = tmp_path / "run"
    train(tiny_cfg(shapes_shards, run_dir, "trainer.max_steps=2"))
    before = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    with pytest.raises(ValueError, match="another model configuration"):
        train(tiny_cfg(shapes_shards, run_dir, "trainer.max_steps=4", "model.task.autoencoder.ch=64"))
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == before


def test_missing_checkpoint_path_is_clear(shapes_shards, tmp_path):
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        train(tiny_cfg(shapes_shards, tmp_path / "run", f"trainer.resume={tmp_path / 'nope'}"))


def test_missing_shards_fail_at_start(tmp_path):
    shards = {"train": str(tmp_path / "none-*.tar"), "val": str(tmp_path / "none-*.tar")}
    with pytest.raises(FileNotFoundError, match="none-"):
        train(tiny_cfg(shards, tmp_path / "run"))


def test_interrupted_save_leaves_previous_checkpoint_usable(shapes_shards, tmp_path):
    """A half-written checkpoint (process killed mid-save) is ignored by `latest`."""
    from ldm.training.checkpoint import resolve_resume

    run_dir = tmp_path / "run"
    train(tiny_cfg(shapes_shards, run_dir, "trainer.max_steps=2"))
    good = resolve_resume("latest", run_dir)
    partial = run_dir / "checkpoints/step_00000003.tmp"
    shutil.copytree(good, partial)
    (partial / "state.json").unlink()
    assert resolve_resume("latest", run_dir) == good


def test_lpips_and_adversarial_gradients_reach_decoder(shapes_shards):
    """After a few real training steps on shards, each loss term alone moves the decoder's last layer
    (LPIPS computed under no_grad elsewhere silently drops the perceptual gradient)."""
    from hydra.utils import instantiate

    from ldm.training.build import build_train_loader

    cfg = tiny_cfg(shapes_shards, "unused")
    torch.manual_seed(0)
    task = instantiate(cfg.model.task)
    opt = torch.optim.Adam([p for g in task.param_groups().values() for p in g], lr=1e-3)
    loader = build_train_loader(cfg, cfg.trainer.batch_size, 0, 1)
    batches = iter(loader)
    for step in range(3):
        loss, logs = task(next(batches), step)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(logs["d_weight"]) > 0, "adaptive GAN weight never switched on"
    batch = next(batches)
    last = task.autoencoder.last_layer()

    def decoder_grad(**weights):
        for k, v in weights.items():
            setattr(task.loss, k, v)
        task.zero_grad()
        loss, _ = task(batch, 10)
        loss.backward()
        return last.grad.detach().clone()

    full = decoder_grad(perceptual_weight=1.0, disc_factor=1.0)
    no_lpips = decoder_grad(perceptual_weight=0.0, disc_factor=1.0)
    no_gan = decoder_grad(perceptual_weight=1.0, disc_factor=0.0)
    assert full.abs().sum() > 0
    assert (full - no_lpips).abs().max() > 1e-6, "LPIPS gives no gradient to the decoder"
    assert (full - no_gan).abs().max() > 1e-6, "the adversarial loss gives no gradient to the decoder"


@pytest.mark.slow
def test_bad_samples_inside_a_shard_are_skipped_counted_and_logged(tmp_path):
    """A corrupt JPEG and a caption-less sample inside a shard: training goes on, the counts are logged."""
    import io

    import numpy as np
    import webdataset as wds
    from PIL import Image

    shard_dir = tmp_path / "shards"
    shard_dir.mkdir()
    rng = np.random.default_rng(0)
    for split, n in (("train", 24), ("val", 4)):
        with wds.TarWriter(str(shard_dir / f"{split}-000000.tar")) as sink:
            for i in range(n):
                buf = io.BytesIO()
                Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(buf, format="JPEG")
                sample = {"__key__": f"{split}{i:04d}", "jpg": buf.getvalue(), "txt": "a random picture"}
                if split == "train" and i == 3:
                    sample["jpg"] = buf.getvalue()[:200]  # truncated JPEG: undecodable
                if split == "train" and i == 7:
                    del sample["txt"]  # no caption
                sink.write(sample)
    shards = {"train": str(shard_dir / "train-000000.tar"), "val": str(shard_dir / "val-000000.tar")}
    run_dir = tmp_path / "run"
    # 22 good samples = 5 batches of 4 per epoch: 6 steps read the whole shard once
    train(tiny_cfg(shards, run_dir, "trainer.max_steps=6", "trainer.ckpt_every=3", "++model.task.loss.perceptual_weight=0"))
    rows = [r.split(",") for r in (run_dir / "metrics.csv").read_text().splitlines()[1:]]
    last = {name: float(value) for _, name, value in rows}
    # counted each time they are read (the second epoch has begun by step 6); nothing else was skipped
    assert last["data/skipped_decode_error"] >= 1 and last["data/skipped_missing_caption"] >= 1
    assert last["data/skipped_bad_mode"] == last["data/skipped_shard_error"] == 0
    assert (run_dir / "checkpoints/step_00000006").is_dir()
