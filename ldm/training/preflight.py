"""Checks of a composed training config that need no data, no weights and no run directory, so a mistake
is one `[ldm] config error: …` line before anything is created or loaded.

train/main.py runs them from a Hydra callback (`Preflight`, named in conf/train.yaml) at the start of a run,
before Hydra makes the run directory, and again inside the job (sweeps: once per job).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import NoReturn

from hydra.experimental.callback import Callback
from hydra.utils import get_object
from omegaconf import OmegaConf

from ldm.config import ConfigError, check_targets, check_trainer
from ldm.training.exits import exit_with_error

# What trainer=default (conf/trainer/default.yaml) sizes for GPUs; on a CPU each must be chosen on purpose.
GPU_DEFAULTS = ("mixed_precision", "batch_size", "max_steps")


def preflight(cfg, *, trainer_choice: str | None = None, overrides=(), cuda: bool | None = None, make_run_dir: bool = False) -> None:
    """Raise ConfigError naming the key for a config that cannot run. `trainer_choice` and `overrides` are
    Hydra's (the trainer group picked, the command-line overrides); `make_run_dir` also creates the run
    directory, so a read-only `paths.runs` is named here instead of failing in Hydra."""
    check_trainer(cfg)
    check_targets(cfg.model.task, "model.task")
    _check_first_stage(cfg)
    _check_strategy(cfg)
    _check_data(cfg)
    _check_device(cfg, trainer_choice, overrides, cuda)
    if make_run_dir:
        _check_run_dir(cfg)


def _check_first_stage(cfg) -> None:
    first = cfg.model.get("first_stage")
    if first is None:
        return
    if OmegaConf.is_missing(first, "ckpt"):
        raise ConfigError(f"model.first_stage.ckpt is not set: model={cfg.model.name} trains over a first-stage "
                          f"autoencoder; give the autoencoder.safetensors stage 1 wrote (e.g. model.first_stage.ckpt="
                          f"{cfg.paths.runs}/autoencoder_kl_demo-{cfg.data.name}/autoencoder.safetensors) or a "
                          f"pretrained VAE (docs/convert.md)")
    if not os.path.exists(first.ckpt):
        raise ConfigError(f"model.first_stage.ckpt={first.ckpt}: no such file or folder; give the "
                          f"autoencoder.safetensors stage 1 wrote (train one with `python train/main.py "
                          f"model=autoencoder_kl_demo`), an SD checkpoint (.safetensors/.ckpt) or a diffusers folder")


def _check_strategy(cfg) -> None:
    if cfg.trainer.strategy.value != "fsdp":
        return
    from ldm.tasks.base import Task

    target = get_object(cfg.model.task._target_)  # check_targets has imported it
    if getattr(target, "shard_units", Task.shard_units) is Task.shard_units:
        raise ConfigError(f"trainer.strategy=fsdp: model={cfg.model.name} ({target.__name__}) names no modules "
                          f"to shard; it trains with trainer.strategy=ddp (stage 1: autoencoder + discriminator)")


def _check_data(cfg) -> None:
    from ldm.data.buckets import parse_buckets
    from ldm.data.decode import Augment

    d = cfg.data
    for key in ("shards", "val_shards"):
        value = d.get(key)
        if value and os.path.isdir(os.path.expanduser(str(value))):
            folder = str(value).rstrip("/")
            tars = sorted(Path(folder).glob("*.tar"))
            if tars:
                raise ConfigError(f"data.{key}={value} is a folder: name its shards, e.g. data.{key}='{folder}/"
                                  f"{'train-*.tar' if any(p.name.startswith('train-') for p in tars) else '*.tar'}'")
            raise ConfigError(f"data.{key}={value} is a folder, not shards: make shards from a folder of images "
                              f"with `python -m data.make_shards {folder} --out {folder}-shards --val-fraction 0.1`, "
                              f"then data.shards='{folder}-shards/train-*.tar' "
                              f"data.val_shards='{folder}-shards/val-*.tar'")
    try:
        parse_buckets(d.get("buckets"), d.image_size, d.get("bucket_step", 64), d.get("bucket_max_ratio", 2.0))
    except ValueError as exn:
        raise ConfigError(str(exn)) from None
    a = d.get("augment")
    if a is None:
        return
    try:
        augment = Augment(flip=float(a.flip), crop=str(getattr(a.crop, "value", a.crop)), scale=tuple(a.scale),
                          ratio=tuple(a.ratio))
    except (TypeError, ValueError) as exn:
        raise ConfigError(str(exn)) from None
    if augment.random and d.get("latents"):
        raise ConfigError(f"data.latents={d.latents} with data.augment (flip {augment.flip}, crop {augment.crop}): a "
                          f"latent cache holds one centre-cropped encoding per image; train from the image shards "
                          f"to augment, or drop data.augment")


def _check_device(cfg, trainer_choice, overrides, cuda) -> None:
    if trainer_choice != "default":
        return
    if cuda is None:
        import torch

        cuda = torch.cuda.is_available()
    if cuda:
        return
    given = {str(o).split("=", 1)[0].lstrip("+~") for o in overrides}
    unset = [k for k in GPU_DEFAULTS if f"trainer.{k}" not in given]
    if unset:
        t = cfg.trainer
        raise ConfigError(f"no GPU here, and trainer=default is sized for GPUs (mixed_precision={t.mixed_precision.value}, "
                          f"batch_size={t.batch_size}, max_steps={t.max_steps}; bf16 autocast is many times slower on "
                          f"CPUs): add trainer=cpu (fp32, batch 16, 2000 steps), or set "
                          f"{', '.join('trainer.' + k for k in unset)} yourself")


def _check_run_dir(cfg) -> None:
    run_dir = Path(str(cfg.run_dir))
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        if not os.access(run_dir, os.W_OK):
            raise PermissionError("not writable")
    except OSError as exn:
        reason = exn.strerror or str(exn)
        raise ConfigError(f"cannot write the run directory {run_dir} ({reason}): set paths.runs= (or run_dir=) to a "
                          f"writable folder") from None


class Preflight(Callback):
    """Hydra callback: `preflight` before Hydra creates the run directory (single runs; sweeps check each
    job inside train/main.py). Only rank 0 prints the line; every rank exits 1."""

    def on_run_start(self, config, **kwargs) -> None:
        try:
            preflight(config, trainer_choice=config.hydra.runtime.choices.get("trainer"),
                      overrides=list(config.hydra.overrides.task), make_run_dir=True)
        except ConfigError as exn:
            refuse(exn)


def refuse(exn: ConfigError) -> NoReturn:
    """Exit on a config error: every rank has the same config, so rank 0 says it, once (ldm/training/exits.py:
    under a launcher too, with no ChildFailedError report)."""
    exit_with_error(f"[ldm] config error: {exn}", same_on_every_rank=True)
