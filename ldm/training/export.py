"""Export a trained run to a diffusers folder (`python train/export.py RUN_DIR OUT_DIR`).

Writes `unet/`, `vae/` (config.json + diffusion_pytorch_model.safetensors, diffusers names, see
ldm/convert/keymap.py), `scheduler/scheduler_config.json` (our noise schedule, parameterisation and sampler),
and, when the run's conditioner is a Hugging Face model (FrozenHFTextEncoder), `text_encoder/`, `tokenizer/`
and `model_index.json`, so `StableDiffusionPipeline.from_pretrained(OUT_DIR)` loads it. Jointly trained text
encoders (ours) have no diffusers class: the UNet, VAE and scheduler are still written, without
`model_index.json`.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file
from torch import nn

from ldm.convert import arch as archs
from ldm.convert.export import WEIGHTS, scheduler_config, unet_to_diffusers, vae_to_diffusers
from ldm.data.integrity import with_checksum
from ldm.errors import CheckpointWriteError, write_error_message
from ldm.training.runs import load_run


def _write_model(folder: Path, config: Mapping[str, Any], state: Mapping[str, torch.Tensor]) -> None:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    state = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    # the tensors' CRC-32 in the metadata: ldm.convert verifies it when the folder is loaded (diffusers ignores it)
    save_file(state, str(folder / WEIGHTS), metadata=with_checksum(state, {"format": "pt"}))


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
    except (OSError, SafetensorError) as e:  # disk full, read-only, permissions: the OS's reason and the path
        reason = write_error_message(e, tmp, f"nothing was left behind and {out} was not created")
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointWriteError(reason) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def export_run(run_dir: str | os.PathLike, out_dir: str | os.PathLike, checkpoint: str = "latest",
               use_ema: bool = True) -> Path:
    """Export a stage-2 run directory (its latest checkpoint, EMA weights when kept) to `out_dir`."""
    from omegaconf import OmegaConf

    cfg, task, ckpt = load_run(Path(run_dir), checkpoint, use_ema=use_ema)
    if not task.generates_images:
        raise ValueError(f"{run_dir} is a {cfg.model.name} run without a UNet: only stage-2 (latent diffusion) runs "
                         "export to diffusers; a stage-1 autoencoder loads with ldm.convert.load_autoencoder")
    schedule = OmegaConf.to_container(cfg.model.task.get("schedule") or {}, resolve=True)
    latent_size = cfg.data.image_size // task.first_stage.downsample_factor
    out = export_task(task, out_dir, schedule, latent_size)
    print(f"[ldm] exported {ckpt} ({'EMA' if use_ema else 'raw'} weights) to {out}")
    return out
