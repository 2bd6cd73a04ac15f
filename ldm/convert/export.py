"""Export a trained run to a diffusers folder: `python -m ldm.convert to-diffusers RUN_DIR OUT_DIR`.

Writes `unet/`, `vae/` (config.json + diffusion_pytorch_model.safetensors, diffusers names, see keymap.py),
`scheduler/scheduler_config.json` (our noise schedule, parameterisation and sampler), and, when the run's
conditioner is a Hugging Face model (FrozenHFTextEncoder), `text_encoder/`, `tokenizer/` and `model_index.json`,
so `StableDiffusionPipeline.from_pretrained(OUT_DIR)` loads it. Jointly trained text encoders (ours) have no
diffusers class: the UNet, VAE and scheduler are still written, without `model_index.json`.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors.torch import save_file
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


def _write_model(folder: Path, config: Mapping[str, Any], state: Mapping[str, torch.Tensor]) -> None:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(folder / WEIGHTS),
              metadata={"format": "pt"})


def export_task(task: nn.Module, out_dir: str | os.PathLike, schedule: Mapping[str, Any],
                latent_size: int = 64) -> Path:
    """Write `task` (a LatentDiffusionTask) as a diffusers folder; nothing is left behind on failure and an
    existing `out_dir` is never overwritten."""
    from ldm.modules.hf_text import FrozenHFTextEncoder

    out = Path(out_dir)
    if out.exists():
        raise FileExistsError(f"{out} exists; choose a new output folder (nothing was written)")
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        _write_model(tmp / "unet", *unet_to_diffusers(task.unet, latent_size))
        _write_model(tmp / "vae", *vae_to_diffusers(task.first_stage))
        sched = scheduler_config(schedule, task.parameterization, task.sampler)
        (tmp / "scheduler").mkdir()
        (tmp / "scheduler" / "scheduler_config.json").write_text(json.dumps(sched, indent=2) + "\n")
        conditioner = task.conditioner
        if isinstance(conditioner, FrozenHFTextEncoder):
            conditioner.model.save_pretrained(tmp / "text_encoder")
            conditioner.tokenizer.model_max_length = conditioner.max_length  # the pipeline pads to this
            conditioner.tokenizer.save_pretrained(tmp / "tokenizer")
            index = {"_class_name": "StableDiffusionPipeline", "_diffusers_version": archs.DIFFUSERS_VERSION,
                     "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
                     "scheduler": ["diffusers", sched["_class_name"]],
                     "text_encoder": ["transformers", type(conditioner.model).__name__],
                     "tokenizer": ["transformers", type(conditioner.tokenizer).__name__],
                     "safety_checker": [None, None], "feature_extractor": [None, None],
                     "image_encoder": [None, None], "requires_safety_checker": False}
            (tmp / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
            if conditioner.output != "last_hidden_state":
                print(f"[ldm] note: the text encoder's output is {conditioner.output!r}; diffusers' pipeline "
                      "uses the last hidden state unless called with clip_skip=1")
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def export_run(run_dir: str | os.PathLike, out_dir: str | os.PathLike, checkpoint: str = "latest",
               use_ema: bool = True) -> Path:
    """Export a stage-2 run directory (its latest checkpoint, EMA weights when kept) to `out_dir`."""
    from omegaconf import OmegaConf

    from ldm.training.runs import load_run

    cfg, task, ckpt = load_run(Path(run_dir), checkpoint, use_ema=use_ema)
    if not hasattr(task, "unet"):
        raise ValueError(f"{run_dir} is a {cfg.model.name} run without a UNet: only stage-2 (latent diffusion) runs "
                         "export to diffusers; a stage-1 autoencoder loads with ldm.convert.load_autoencoder")
    schedule = OmegaConf.to_container(cfg.model.task.get("schedule") or {}, resolve=True)
    latent_size = cfg.data.image_size // task.first_stage.downsample_factor
    out = export_task(task, out_dir, schedule, latent_size)
    print(f"[ldm] exported {ckpt} ({'EMA' if use_ema else 'raw'} weights) to {out}")
    return out
