"""Validation prompts (`trainer.validation`): the user's own prompts, sampled with the EMA weights during
training, as one captioned grid `validation` (run_dir/images/validation_<step>.png, W&B, TensorBoard and
report.html, through `log_images`).

Prompt i starts from the same noise at every validation (seeded by `seed + i` and drawn on the CPU, as
`ldm.inference.generate` does), so a change between two grids is the training, not the noise. Sampling runs
under a forked RNG, so it never shifts the training stream: a resumed run stays bit-identical. Every rank
samples the same prompts (a sharded FSDP forward is a collective); only the main process writes.
"""
from __future__ import annotations

from pathlib import Path

import torch

from ldm.config import validation_prompts
from ldm.inference import generate
from ldm.training.tracking import log_images
from ldm.visualize import Panel

GRID = "validation"  # grid name: run_dir/images/validation_<step>.png
BATCH = 16  # prompts per sampling batch (noise does not depend on it: see generate)


def validation_due(step: int, trainer) -> bool:
    """A step of the loop at which to sample the prompts; the last step is covered by the end of the run."""
    every = trainer.validation.every
    return bool(every) and step % every == 0 and step < trainer.max_steps


@torch.no_grad()
@torch.random.fork_rng()  # sampling must not shift the training RNG stream (bit-identical resume)
def validate(task, cfg, accelerator, step: int, run_dir: Path, ema=None) -> None:
    """Sample `trainer.validation.prompts` with the EMA weights (when the model keeps an EMA) and log the
    captioned grid at `step`. Nothing to do when no prompts are set."""
    prompts, negatives = validation_prompts(cfg)
    if not prompts:
        return
    if ema is not None:
        with ema.swapped_into(task.ema_target()):
            return validate(task, cfg, accelerator, step, run_dir)
    v = cfg.trainer.validation
    items = [{"caption": p, **({"negative_caption": negatives[i]} if negatives else {})}
             for i, p in enumerate(prompts)]
    size = cfg.data.image_size // task.first_stage.downsample_factor
    was_training = task.training
    task.eval()
    with accelerator.autocast():
        images = generate(task, items, latent_size=(size, size), batch_size=BATCH, seed=v.seed, steps=v.steps,
                          guidance_scale=v.guidance)
    task.train(was_training)
    log_images(accelerator, step, {GRID: Panel(images, prompts)}, run_dir)
