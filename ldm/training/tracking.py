"""Experiment tracking: W&B through Accelerate's trackers, plus a CSV log in the run directory.

W&B with no API key raises at `wandb.init`, and with a key but no network it hangs ~100 s; we pick
offline mode up front when no key is configured (saying so in one line), and fall back to offline if an
online start fails, so tracking never stops or stalls training.
"""
from __future__ import annotations

import csv
import netrc
import os
import uuid
from pathlib import Path

import torch
from omegaconf import OmegaConf


def _has_wandb_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


def _run_id(run_dir: Path) -> str:
    """One W&B run per run directory: a resumed run keeps logging to the same W&B run."""
    path = run_dir / "wandb_id.txt"
    if not path.exists():
        path.write_text(uuid.uuid4().hex[:12])
    return path.read_text().strip()


def init_tracking(accelerator, cfg, run_dir: Path) -> None:
    if cfg.logger.kind.value == "none" or not accelerator.is_main_process:
        return
    mode = cfg.logger.mode or os.environ.get("WANDB_MODE")
    if mode is None and not _has_wandb_key():
        mode = "offline"
        print(f"[ldm] W&B: no API key found, logging offline to {run_dir}/wandb "
              f"(`wandb sync` uploads it later; logger=none turns W&B off)")
    import wandb

    kwargs = dict(dir=str(run_dir), id=_run_id(run_dir), resume="allow", name=run_dir.name,
                  entity=cfg.logger.entity, tags=list(cfg.logger.tags),
                  settings=wandb.Settings(init_timeout=30, silent=True))
    config = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    try:
        accelerator.init_trackers(cfg.logger.project, config=config, init_kwargs={"wandb": {**kwargs, "mode": mode}})
    except Exception as e:  # noqa: BLE001 - an unreachable server must not stop training
        print(f"[ldm] W&B: online start failed ({type(e).__name__}: {e}); logging offline instead")
        accelerator.trackers.clear()
        accelerator.init_trackers(cfg.logger.project, config=config,
                                  init_kwargs={"wandb": {**kwargs, "mode": "offline"}})


class CSVLog:
    """`metrics.csv` in the run directory: one row per (step, name, value), appended across resumes."""

    def __init__(self, run_dir: Path, enabled: bool):
        self.path = run_dir / "metrics.csv"
        self.enabled = enabled
        if enabled and not self.path.exists():
            self.path.write_text("step,name,value\n")

    def write(self, step: int, values: dict) -> None:
        if not self.enabled:
            return
        with self.path.open("a", newline="") as f:
            w = csv.writer(f)
            for k, v in values.items():
                w.writerow([step, k, f"{float(v):.6g}"])


def log_images(accelerator, step: int, images: dict[str, torch.Tensor], run_dir: Path) -> None:
    """Save each `[-1,1]` batch as a PNG grid under run_dir/images and send it to W&B."""
    from torchvision.utils import make_grid, save_image

    if not accelerator.is_main_process:
        return
    out = run_dir / "images"
    out.mkdir(exist_ok=True)
    grids = {}
    for name, x in images.items():
        grid = make_grid(((x.float().clamp(-1, 1) + 1) / 2).cpu(), nrow=min(8, len(x)))
        save_image(grid, out / f"{name}_{step:08d}.png")
        grids[name] = grid
    for tracker in accelerator.trackers:
        if tracker.name == "wandb":
            import wandb

            tracker.log({k: wandb.Image(g.permute(1, 2, 0).numpy()) for k, g in grids.items()}, step=step)
