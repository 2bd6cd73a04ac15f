"""Stage 2 end to end on real shards: text/class/unconditional/super-resolution LDMs train, resume,
sample; bad prompts and bad checkpoints are handled."""
import json
import shutil
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from ldm.config import register_configs

CONF = Path(__file__).resolve().parents[1] / "conf"
register_configs()
TINY_UNET = ["model.task.unet.model_channels=16", "model.task.unet.channel_mult=[1,2]",
             "model.task.unet.num_res_blocks=1", "model.task.unet.attention_resolutions=[2]",
             "++model.task.unet.num_head_channels=8", "++model.task.unet.norm_groups=8",
             "model.task.sample_steps=4"]


def compose_cfg(overrides):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("train", overrides=list(overrides))


def data_overrides(shards):
    return ["data=shapes", f"data.shards='{shards['train']}'", f"data.val_shards='{shards['val']}'",
            "data.image_size=32", "data.shuffle_buffer=16", "debug=default"]


def run(cfg):
    from ldm.training.loop import train

    return train(cfg)


@pytest.fixture(scope="module")
def first_stage(shapes_shards, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("ae") / "run"
    run(compose_cfg(["model=autoencoder_kl_tiny", *data_overrides(shapes_shards), "trainer.max_steps=2",
                     f"run_dir={run_dir}", "++model.task.loss.perceptual_weight=0"]))
    return run_dir / "autoencoder.safetensors"


def ldm_cfg(model, shards, first_stage, run_dir, *extra):
    return compose_cfg([f"model={model}", *data_overrides(shards), f"model.first_stage.ckpt={first_stage}",
                        f"run_dir={run_dir}", *extra])


@pytest.mark.slow
def test_txt2img_trains_resumes_and_samples(shapes_shards, first_stage, tmp_path):
    run_dir = tmp_path / "run"
    run(ldm_cfg("ldm_txt2img_tiny", shapes_shards, first_stage, run_dir, "trainer.max_steps=2"))
    assert (run_dir / "tokenizer.json").is_file()
    run(ldm_cfg("ldm_txt2img_tiny", shapes_shards, first_stage, run_dir, "trainer.max_steps=3"))
    state = json.loads((run_dir / "checkpoints/step_00000003/state.json").read_text())
    assert state["step"] == 3
    assert list((run_dir / "images").glob("samples_*.png"))

    from ldm.training.runs import load_run
    from ldm.inference import generate

    cfg, task, _ = load_run(run_dir)
    assert task.conditioner.is_fitted  # the tokenizer travelled inside the checkpoint
    items = [{"caption": "a red circle in the center on a white background"}, {"caption": ""}]
    a = generate(task, items, latent_size=(8, 8), batch_size=2, seed=3, sampler="ddim", steps=3)
    b = generate(task, items, latent_size=(8, 8), batch_size=1, seed=3, sampler="ddim", steps=3)
    assert a.shape == (2, 3, 32, 32) and torch.isfinite(a).all() and a.abs().max() <= 1
    again = generate(task, items, latent_size=(8, 8), batch_size=2, seed=3, sampler="ddim", steps=3)
    assert torch.equal(a, again), "DDIM eta=0 must be deterministic given the seed"
    torch.testing.assert_close(a, b, atol=1e-4, rtol=0)  # image i does not depend on the batching
    other = generate(task, items, latent_size=(8, 8), batch_size=2, seed=4, sampler="ddim", steps=3)
    assert not torch.allclose(a, other), "another seed must give other images"
    with pytest.warns(UserWarning, match="truncated"):  # a 500-word prompt: truncated, with a warning
        long = generate(task, [{"caption": " ".join(["red"] * 500)}], latent_size=(8, 8), batch_size=1, seed=0,
                        steps=2)
    assert long.shape == (1, 3, 32, 32) and torch.isfinite(long).all()


@pytest.mark.parametrize("model,extra", [
    ("ldm_class", ["data=mnist", "model.task.conditioner.num_classes=10", "model.task.conditioner.dim=32"]),
    ("ldm_uncond", []),
    ("ldm_sr", []),
])
def test_other_conditionings_train(model, extra, shapes_shards, first_stage, tmp_path):
    overrides = [*TINY_UNET, "trainer.max_steps=2"]
    if model == "ldm_class":  # class labels from the MNIST shards' json
        from data.mnist import write_mnist

        shards = write_mnist(str(tmp_path / "mnist"), seed=0)
        cfg = compose_cfg([f"model={model}", "data=mnist", f"data.shards='{shards['train']}'",
                           f"data.val_shards='{shards['val']}'", "data.num_workers=1", "data.shuffle_buffer=16",
                           "trainer=debug", "logger=none", f"model.first_stage.ckpt={first_stage}",
                           f"run_dir={tmp_path / 'run'}", *overrides, *extra[1:]])
    else:
        cfg = ldm_cfg(model, shapes_shards, first_stage, tmp_path / "run", *overrides)
    run(cfg)
    assert (tmp_path / "run/checkpoints/step_00000002/model.safetensors").is_file()


def test_missing_first_stage_says_how_to_train_one(shapes_shards, tmp_path):
    cfg = ldm_cfg("ldm_txt2img_tiny", shapes_shards, tmp_path / "nope.safetensors", tmp_path / "run")
    with pytest.raises(FileNotFoundError, match="train/main.py"):
        run(cfg)


def test_checkpoint_of_another_preset_is_refused(shapes_shards, first_stage, tmp_path):
    run_dir = tmp_path / "run"
    run(ldm_cfg("ldm_txt2img_tiny", shapes_shards, first_stage, run_dir, "trainer.max_steps=2"))
    before = {p: p.stat().st_mtime for p in (run_dir / "checkpoints").rglob("*")}
    with pytest.raises(ValueError, match="another model configuration"):
        run(ldm_cfg("ldm_txt2img_tiny", shapes_shards, first_stage, run_dir, "trainer.max_steps=3",
                    "model.task.unet.model_channels=16"))
    assert {p: p.stat().st_mtime for p in (run_dir / "checkpoints").rglob("*")} == before
