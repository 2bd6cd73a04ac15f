"""Shared test setup: offline everything, small CPU thread count, tiny generated shards."""
import os

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def shapes_shards(tmp_path_factory):
    """A few hundred 32x32 demo shapes in real WebDataset shards: {"train": pattern, "val": pattern}."""
    from data.shapes import write_shapes

    out = tmp_path_factory.mktemp("shapes")
    return write_shapes(str(out), n_train=192, n_val=32, size=32, max_count=48, seed=0)


@pytest.fixture(scope="session")
def tiny_autoencoder(shapes_shards, tmp_path_factory):
    """A 2-step tiny KL autoencoder trained on the shapes shards: the first stage of stage-2 tests."""
    from hydra import compose, initialize_config_dir

    from ldm.config import register_configs
    from ldm.training.loop import train

    register_configs()
    run_dir = tmp_path_factory.mktemp("tiny_ae") / "run"
    conf = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "conf")
    with initialize_config_dir(config_dir=conf, version_base="1.3"):
        cfg = compose("train", overrides=[
            "model=autoencoder_kl_tiny", "data=shapes", f"data.shards='{shapes_shards['train']}'",
            f"data.val_shards='{shapes_shards['val']}'", "data.image_size=32", "data.num_workers=1",
            "trainer=debug", "trainer.max_steps=2", "logger=none", f"run_dir={run_dir}",
            "++model.task.loss.perceptual_weight=0"])
    train(cfg)
    return run_dir / "autoencoder.safetensors"


@pytest.fixture(scope="session")
def tiny_runs(shapes_shards, tmp_path_factory):
    """A 2-step tiny autoencoder run and a 2-step tiny text-to-image run over it: {"ae": dir, "ldm": dir}."""
    from pathlib import Path

    from hydra import compose, initialize_config_dir

    from ldm.config import register_configs
    from ldm.training.loop import train

    register_configs()

    def cfg(*overrides):
        conf = Path(__file__).resolve().parents[1] / "conf"
        with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
            return compose("train", overrides=["data=shapes", f"data.shards='{shapes_shards['train']}'",
                                               f"data.val_shards='{shapes_shards['val']}'", "data.image_size=32",
                                               "data.num_workers=0", "data.shuffle_buffer=16", "trainer=debug",
                                               "logger=none", *overrides])

    root = tmp_path_factory.mktemp("tiny_runs")
    train(cfg("model=autoencoder_kl_tiny", "trainer.max_steps=2", f"run_dir={root / 'ae'}"))
    train(cfg("model=ldm_txt2img_tiny", f"model.first_stage.ckpt={root / 'ae' / 'autoencoder.safetensors'}",
              "trainer.max_steps=2", f"run_dir={root / 'ldm'}"))
    return {"ae": root / "ae", "ldm": root / "ldm"}
