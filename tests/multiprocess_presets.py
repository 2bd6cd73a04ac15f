"""Trains every stage-2 preset for 2 steps, one after the other, in the SAME processes: tests/test_scaleout.py
runs it under `accelerate launch --num_processes 2`, so the presets share one process start-up.

    accelerate launch --multi_gpu --num_processes 2 tests/multiprocess_presets.py OUT FIRST_STAGE SHAPES_TRAIN \
        SHAPES_VAL MNIST_TRAIN MNIST_VAL TEXT_ENCODER_DIR
"""
import sys
from pathlib import Path

from hydra import compose, initialize_config_dir

from ldm.config import register_configs
from ldm.training.loop import train

CONF = str(Path(__file__).resolve().parents[1] / "conf")
UNET = ["model.task.unet.model_channels=16", "model.task.unet.channel_mult=[1,2]", "model.task.unet.num_res_blocks=1",
        "model.task.unet.attention_resolutions=[2]", "++model.task.unet.norm_groups=8", "model.task.sample_steps=3"]
HEADS = ["++model.task.unet.num_head_channels=8"]
TEXT = ["model.task.conditioner.vocab_size=300", "model.task.conditioner.max_length=16",
        "model.task.conditioner.dim=32", "model.task.conditioner.depth=1", "model.task.conditioner.heads=2"]


def presets(text_encoder: str) -> dict[str, list[str]]:
    frozen = [f"model.task.conditioner.name_or_path={text_encoder}", "model.task.conditioner.max_length=16"]
    return {
        "ldm_txt2img": UNET + ["model.task.unet.num_heads=2"] + TEXT,  # cross-attention, jointly trained encoder
        "ldm_txt2img_tiny": UNET + HEADS,
        "ldm_txt2img_demo": UNET + HEADS,
        "ldm_class": UNET + HEADS + ["model.task.conditioner.num_classes=10", "model.task.conditioner.dim=32"],
        "ldm_uncond": UNET + HEADS,
        "ldm_sr": UNET + HEADS,  # concat conditioning
        "sd_v1": UNET + ["model.task.unet.num_heads=2"] + frozen,  # frozen Hugging Face text encoder
        "sd_v2": UNET + ["model.task.unet.num_head_channels=8"] + frozen,
    }


def main(out, first_stage, shapes_train, shapes_val, mnist_train, mnist_val, text_encoder):
    register_configs()
    _keep_process_group()
    for name, extra in presets(text_encoder).items():
        train_shards, val_shards, data = (mnist_train, mnist_val, "mnist") if name == "ldm_class" else \
            (shapes_train, shapes_val, "shapes")
        with initialize_config_dir(config_dir=CONF, version_base="1.3"):
            cfg = compose("train", overrides=[
                f"model={name}", f"data={data}", f"data.shards='{train_shards}'", f"data.val_shards='{val_shards}'",
                "data.image_size=32", "data.num_workers=1", "data.shuffle_buffer=16", "trainer=debug",
                "trainer.max_steps=2", "trainer.trace=true", "logger=none", f"model.first_stage.ckpt={first_stage}",
                f"run_dir={out}/{name}", *extra])
        train(cfg)


def _keep_process_group() -> None:
    # Accelerate's end_training() destroys the process group, and a second init in the same launch hangs
    # on the launcher's store: the presets share one group instead.
    import torch.distributed

    torch.distributed.destroy_process_group = lambda group=None: None


if __name__ == "__main__":
    main(*sys.argv[1:])
