"""Pretrained weights in and out: CompVis/Stability single files and diffusers folders <-> our models.

    from ldm.convert import load_unet, load_autoencoder
    unet = load_unet("sd-v1-5.safetensors")            # or a diffusers folder: load_unet("/models/sd15")
    vae = load_autoencoder("/models/sd15")              # scale_factor from vae/config.json

    python -m ldm.convert to-diffusers RUN_DIR OUT_DIR  # a folder StableDiffusionPipeline.from_pretrained loads

Key maps: ldm/convert/keymap.py; architectures: ldm/convert/arch.py; docs/convert.md.
"""
from ldm.convert.export import export_run, export_task
from ldm.convert.load import (CheckpointMismatchError, apply_init_from, load_autoencoder, load_first_stage, load_unet,
                              read_unet_weights, read_vae_weights)

__all__ = ["CheckpointMismatchError", "apply_init_from", "export_run", "export_task", "load_autoencoder",
           "load_first_stage", "load_unet", "read_unet_weights", "read_vae_weights"]
