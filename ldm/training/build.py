"""Build the pieces of a run from its config: accelerator, task, optimizers, schedules, loaders.

Config names the class; this file supplies the facts (world size, derived batch sizes, the first-stage
autoencoder for stage 2).
"""
from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path
from typing import NamedTuple

import torch
from accelerate import Accelerator, PartialState
from hydra.utils import instantiate
from omegaconf import OmegaConf

from ldm.config import check_targets
from ldm.data.buckets import parse_buckets
from ldm.data.decode import SampleDecoder
from ldm.data.order import build_global_loader
from ldm.data.remote import RetryPolicy
from ldm.data.webdataset import build_loader, expand_urls
from ldm.training.tracking import tracker_for


def batch_geometry(global_batch: int, micro_batch: int | None, world_size: int) -> tuple[int, int]:
    """(micro_batch, accumulation) such that micro × world × accumulation == global batch.

    The global batch is what the user sets; nothing is rescaled behind their back when the number of
    processes changes (implicit LR scaling by GPU count is a known source of broken runs elsewhere).
    """
    micro = micro_batch or global_batch // world_size
    if micro < 1 or global_batch % (micro * world_size):
        raise ValueError(f"trainer.batch_size={global_batch} is not a multiple of micro_batch_size ({micro}) x "
                         f"processes ({world_size}); pick a global batch divisible by both")
    return micro, global_batch // (micro * world_size)


def build_accelerator(cfg) -> tuple[Accelerator, int, int]:
    # Several processes but no GPU: without cpu=True, Accelerate runs them as independent single-process
    # jobs (`accelerate launch` even resets ACCELERATE_USE_CPU in the children), silently unsynchronised.
    cpu = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()
    world = PartialState(cpu=cpu).num_processes
    micro, accum = batch_geometry(cfg.trainer.batch_size, cfg.trainer.micro_batch_size, world)
    log_with = tracker_for(cfg)  # None | "wandb" | a TensorBoard tracker writing to run_dir/tensorboard
    if torch.cuda.is_available():
        # fp32 matmuls and convolutions on tensor cores (TF32: 10-bit mantissa, fp32 range); bf16 runs are
        # unaffected. The legacy flags, as Accelerate sets them: torch.compile still reads them.
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    accelerator = Accelerator(cpu=cpu, mixed_precision=cfg.trainer.mixed_precision.value,
                              gradient_accumulation_steps=accum, log_with=log_with, step_scheduler_with_optimizer=False)
    return accelerator, micro, accum


class BuiltTask(NamedTuple):
    task: torch.nn.Module
    pretrained_ema: dict[str, torch.Tensor] | None  # EMA weights that `model.init_from` brought, if any


def build_task(cfg) -> BuiltTask:
    """Instantiate `model.task`; stage 2 additionally receives the frozen first-stage autoencoder, and
    `model.init_from` loads pretrained UNet weights (and hands back their EMA, for the EMA to start from)."""
    check_targets(cfg.model.task, "model.task")
    facts = {}
    if cfg.model.get("first_stage") is not None:
        from ldm.convert import load_autoencoder  # ours, an SD/CompVis file or a diffusers folder

        facts["first_stage"] = load_autoencoder(cfg.model.first_stage.ckpt)
    task, pretrained_ema = instantiate(cfg.model.task, **facts), None
    if cfg.model.get("init_from"):
        from ldm.convert import apply_init_from

        pretrained_ema = apply_init_from(task, cfg.model.init_from)
        if PartialState().is_main_process:  # once per job
            print(f"[ldm] UNet initialised from {cfg.model.init_from}"
                  + (" (EMA weights found: the EMA starts from them)" if pretrained_ema else ""), flush=True)
    groups = task.param_groups()
    if set(groups) != set(cfg.model.optim):
        raise ValueError(f"model.optim has groups {sorted(cfg.model.optim)} but {type(task).__name__} trains "
                         f"{sorted(groups)}; give one optimizer entry per group")
    return BuiltTask(task, pretrained_ema)


def build_optimizers(cfg, task) -> dict[str, torch.optim.Optimizer]:
    # fused: one kernel for all tensors, on CUDA and on CPU (4x faster than foreach for the demo's 330
    # tensors here, same weights to the bit: BENCHMARKS.md), and it takes the NaN guard's device flag as
    # `found_inf` (ldm/training/guard.py). Same update, so the choice is not a setting.
    return {name: torch.optim.AdamW(params, lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay, eps=o.eps,
                                    fused=True)
            for name, params in task.param_groups().items() for o in [cfg.model.optim[name]]}


def build_scheduler(trainer_cfg, optimizer) -> torch.optim.lr_scheduler.LambdaLR:
    warmup, total, kind = trainer_cfg.lr_warmup_steps, trainer_cfg.max_steps, trainer_cfg.lr_schedule.value

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if kind == "cosine":
            return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def build_train_loader(cfg, micro_batch: int, rank: int, world_size: int):
    """This rank's micro-batches of the one global sample order (ldm/data/order.py) over data.shards' images,
    or over the latent cache `data.latents` (a missing or incomplete cache fails here; whether it is stale is
    checked against the task: `check_cache`)."""
    d = cfg.data
    shards, decoder = d.shards, augmenting_decoder(cfg)
    if d.get("latents"):
        from ldm.data.latent_cache import LatentSampleDecoder, cache_shards

        shards = cache_shards(d.latents)
        decoder = LatentSampleDecoder(d.image_size, d.caption_field, d.label_field)
    policy = RetryPolicy(retries=d.retries, timeout=d.timeout, max_wait=d.max_wait)
    decoder = decoder or SampleDecoder(d.image_size, d.caption_field, d.label_field)
    buckets = parse_buckets(d.get("buckets"), d.image_size, d.get("bucket_step", 64), d.get("bucket_max_ratio", 2.0))
    if buckets is not None and not d.get("latents"):  # (a latent cache's samples keep the shapes they were cached at)
        decoder = dataclasses.replace(decoder, buckets=tuple(buckets))
    return build_global_loader(expand_urls(shards), decoder=decoder,
                               global_batch=cfg.trainer.batch_size, micro_batch=micro_batch, rank=rank,
                               world_size=world_size, num_workers=d.num_workers, seed=cfg.trainer.seed,
                               shuffle_buffer=d.shuffle_buffer, resample=d.resample, lanes=d.lanes,
                               pin_memory=torch.cuda.is_available(),  # page-locked: to_device copies without blocking
                               policy=policy, buckets=buckets)


def augmenting_decoder(cfg):
    """The training stream's image decoder with `data.augment` (None when it changes nothing)."""
    from ldm.data.decode import Augment, SampleDecoder

    a = cfg.data.get("augment")
    if a is None:
        return None
    augment = Augment(flip=float(a.flip), crop=str(getattr(a.crop, "value", a.crop)), scale=tuple(a.scale),
                      ratio=tuple(a.ratio))
    if not augment.random:
        return None
    return SampleDecoder(cfg.data.image_size, cfg.data.caption_field, cfg.data.label_field, augment=augment,
                         seed=cfg.trainer.seed)


def build_eval_loader(cfg, batch_size: int, shards: str | None = None):
    """One deterministic pass over the held-out shards (or the training shards if none are set)."""
    d = cfg.data
    return build_loader(shards or d.val_shards or d.shards, batch_size=batch_size, image_size=d.image_size,
                        num_workers=min(1, d.num_workers), seed=cfg.trainer.seed, shuffle_buffer=0,
                        caption_field=d.caption_field, label_field=d.label_field, epochs=1)


def save_config(cfg, run_dir: Path) -> None:
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
