"""Our models and schedules in diffusers' terms: each function maps a module to (config.json, state dict
in diffusers names) or our schedule to a scheduler config. Writing folders is the run layer's job
(ldm/training/export.py)."""
from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

from ldm.convert import arch as archs
from ldm.convert import keymap
from ldm.convert.load import VAE_STATE_BUFFERS
from ldm.diffusion.schedule import DEFAULT_BETA_RANGE

# Our sampler -> the diffusers scheduler that runs the same update; our kind / parameterisation -> theirs.
SCHEDULER_CLASSES = {"ddim": "DDIMScheduler", "ddpm": "DDPMScheduler", "plms": "PNDMScheduler",
                     "dpmpp_2m": "DPMSolverMultistepScheduler"}
BETA_SCHEDULES = {"linear": "linear", "scaled_linear": "scaled_linear", "cosine": "squaredcos_cap_v2"}
PREDICTION_TYPES = {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}
WEIGHTS = "diffusion_pytorch_model.safetensors"


def unet_to_diffusers(unet: nn.Module, sample_size: int = 64) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(diffusers config.json, state dict in diffusers names) of our UNet."""
    arch = archs.unet_arch_from_model(unet)
    config = archs.diffusers_unet_config(arch, sample_size)
    state = keymap.rename_state(unet.state_dict(), lambda k: keymap.unet_key_to_diffusers(k, arch["num_res_blocks"]))
    return config, state


def vae_to_diffusers(vae: nn.Module) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(diffusers config.json, state dict in diffusers names) of our AutoencoderKL; `scale_factor` becomes
    `scaling_factor`."""
    from ldm.models.autoencoder import AutoencoderKL

    if not isinstance(vae, AutoencoderKL):
        raise archs.ArchitectureError(f"only a KL autoencoder maps onto diffusers' AutoencoderKL, got "
                                      f"{type(vae).__name__}")
    arch = archs.vae_arch_from_model(vae)
    config = archs.diffusers_vae_config(arch, float(vae.scale_factor))
    weights = {k: v for k, v in vae.state_dict().items() if k not in VAE_STATE_BUFFERS}
    levels = len(arch["ch_mult"])
    state = keymap.rename_state(weights, lambda k: keymap.vae_key_to_diffusers(k, levels),
                                keymap.vae_tensor_to_diffusers)
    return config, state


def scheduler_config(schedule: Mapping[str, Any], parameterization: str, sampler: str) -> dict[str, Any]:
    """diffusers scheduler config for our schedule (`model.task.schedule`), with our samplers' defaults:
    trailing timestep spacing, no offset, no clipping (ldm/sampling.py)."""
    kind = schedule.get("kind", "scaled_linear")
    start, end = DEFAULT_BETA_RANGE.get(kind, DEFAULT_BETA_RANGE["scaled_linear"])
    class_name = SCHEDULER_CLASSES.get(sampler, "DDIMScheduler")
    zero_snr = bool(schedule.get("zero_terminal_snr", False))
    config = {"_class_name": class_name, "_diffusers_version": archs.DIFFUSERS_VERSION,
              "num_train_timesteps": schedule.get("num_timesteps", 1000),
              "beta_start": schedule.get("beta_start") or start, "beta_end": schedule.get("beta_end") or end,
              "beta_schedule": BETA_SCHEDULES[kind], "prediction_type": PREDICTION_TYPES[parameterization],
              # steps_offset only shifts "leading" spacing; 1 keeps diffusers from warning that the config is old.
              "timestep_spacing": "trailing", "steps_offset": 1, "trained_betas": None}
    if class_name == "PNDMScheduler":
        if zero_snr:
            raise ValueError("diffusers' PNDMScheduler has no zero-terminal-SNR option; export with sampler=ddim")
        config.update(skip_prk_steps=True, set_alpha_to_one=False)
    else:
        config["rescale_betas_zero_snr"] = zero_snr
    if class_name == "DDIMScheduler":
        config.update(clip_sample=False, set_alpha_to_one=True)
    elif class_name == "DDPMScheduler":
        config.update(clip_sample=False, variance_type="fixed_small")
    elif class_name == "DPMSolverMultistepScheduler":
        config.update(algorithm_type="dpmsolver++", solver_order=2, lower_order_final=True,
                      final_sigmas_type="zero")
    return config
