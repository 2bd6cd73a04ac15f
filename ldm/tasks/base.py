"""The task contract (docs/architecture.md) as a base class: the optional hooks have no-op defaults, so
the training loop calls them on every task and never probes a task for attributes."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from torch import nn


@dataclass
class RunContext:
    """What a task's hooks may use: facts of the run, never the Accelerator, Hydra or W&B objects."""

    run_dir: Path
    is_main: bool  # rank 0: the one process that writes shared files
    barrier: Callable[[], None]  # wait for every rank
    device: torch.device
    data: Any  # cfg.data: shards, caption_field, …
    task_config: dict  # cfg.model.task, resolved (stage 1 stores it beside its weights)
    statistics_batches: Callable[[], Iterable[dict]]  # deterministic batches of the training shards, on device


class Task(nn.Module):
    """Base of the stage tasks. Subclasses implement forward(batch, step) -> (loss, logs), param_groups(),
    ema_target(), visualize(batch), evaluate(batch); the hooks below are optional."""

    frozen_prefixes: tuple[str, ...] = ()  # state-dict prefixes rebuilt from their own files, not checkpointed
    # Facts the entry points read instead of probing the task for attributes:
    generates_images: bool = False  # has `sample(batch, …)` (stage 2): sampling, export, generation metrics
    trains_on_latents: bool = False  # trains on a frozen first stage's latents, so a latent cache can feed it

    def on_train_start(self, run: RunContext) -> None:
        """Before the first step and before a checkpoint is loaded (e.g. fit a tokenizer on the captions)."""

    def on_train_end(self, run: RunContext) -> None:
        """After the last step, before the final checkpoint (e.g. stage 1 measures its latents and writes
        the file stage 2 loads). Called on every rank: collectives are allowed."""

    def reconstruct(self, batch: dict) -> torch.Tensor | None:
        """The model's reconstructions of batch["image"] in [-1, 1] (stage 1; for rFID), or None."""
        return None

    def step_phase(self, step: int) -> object:
        """Steps with equal phases cost the same FLOPs; the throughput meter counts them once per phase."""
        return 0

    def shard_units(self) -> list[nn.Module]:
        """Sub-modules to shard with FSDP (`trainer.strategy=fsdp`), innermost first; each becomes one
        all-gather unit. A task that returns none cannot be sharded."""
        return []

    def blocks(self) -> list[nn.Module]:
        """The trainable model's repeated blocks (ResBlocks, transformer blocks), none inside another:
        `trainer.activation_checkpointing` and `trainer.compile` act on these (ldm/training/blocks.py)."""
        return []
