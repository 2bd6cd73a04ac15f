"""Pretrained weights in and out: CompVis/Stability single files and diffusers folders <-> our models.

    from ldm.convert import load_unet, load_autoencoder
    unet = load_unet("sd-v1-5.safetensors")            # or a diffusers folder: load_unet("/models/sd15")
    vae = load_autoencoder("/models/sd15")              # scale_factor from vae/config.json
    vae = load_autoencoder("runs/…/autoencoder.safetensors")  # ours, from stage 1: the same function

Key maps: ldm/convert/keymap.py; architectures: ldm/convert/arch.py; our modules in diffusers' terms:
ldm/convert/export.py. Writing a trained run as a diffusers folder is the run layer's job
(ldm/training/export.py, `python train/export.py RUN_DIR OUT_DIR`); docs/convert.md.
"""
from ldm.convert.load import (CheckpointMismatchError, apply_init_from, load_autoencoder, load_unet, read_unet_weights,
                              read_vae_weights)

__all__ = ["CheckpointMismatchError", "apply_init_from", "load_autoencoder", "load_unet", "read_unet_weights",
           "read_vae_weights"]
