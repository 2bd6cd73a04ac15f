"""Experiment tracking: W&B or TensorBoard through Accelerate's trackers, plus a CSV log and PNG grids
in the run directory (train/report.py turns those into one HTML page).

W&B with no API key raises at `wandb.init`, and with a key but no network it hangs ~100 s; we pick
offline mode up front when no key is configured (saying so in one line), and fall back to offline if an
online start fails, so tracking never stops or stalls training. TensorBoard (`logger=tensorboard`) needs
no account or network, for air-gapped clusters: event files go to run_dir/tensorboard.
"""
from __future__ import annotations

import csv
import netrc
import os
import uuid
from pathlib import Path

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


def tracker_for(cfg):
    """What `Accelerator(log_with=...)` gets for `cfg.logger.kind`. TensorBoard is handed as Accelerate's
    own tracker object, built with its log directory, so the Accelerator needs no `project_dir`."""
    kind = cfg.logger.kind.value
    if kind == "tensorboard":
        from accelerate.tracking import TensorBoardTracker

        return TensorBoardTracker("tensorboard", cfg.run_dir)  # writes to run_dir/tensorboard
    return None if kind == "none" else kind


def flat_config(cfg) -> dict:
    """The resolved config as {"model.task.unet.model_channels": 64, ...}: TensorBoard's hparams take
    only scalars and strings."""
    def walk(node, prefix):
        for k, v in node.items():
            if isinstance(v, dict):
                yield from walk(v, f"{prefix}{k}.")
            else:
                yield f"{prefix}{k}", v if isinstance(v, (bool, int, float, str)) else str(v)

    return dict(walk(OmegaConf.to_container(cfg, resolve=True, enum_to_str=True), ""))


def init_tracking(accelerator, cfg, run_dir: Path) -> None:
    if cfg.logger.kind.value == "none" or not accelerator.is_main_process:
        return
    if cfg.logger.kind.value == "tensorboard":
        accelerator.init_trackers(cfg.logger.project, config=flat_config(cfg))
        print(f"[ldm] TensorBoard: logging to {run_dir}/tensorboard (`tensorboard --logdir {run_dir}`)")
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


def log_images(accelerator, step: int, images: dict, run_dir: Path) -> None:
    """Save each grid (a `[-1,1]` batch, or a `Panel` with captions) as a readable PNG under
    run_dir/images and send it to the trackers."""
    import numpy as np

    from ldm.visualize import Panel, captioned_grid

    if not accelerator.is_main_process:
        return
    out = run_dir / "images"
    out.mkdir(exist_ok=True)
    grids = {}
    for name, panel in images.items():
        panel = panel if isinstance(panel, Panel) else Panel(panel)
        grid = captioned_grid(panel.images, panel.captions, group=panel.group)
        grid.save(out / f"{name}_{step:08d}.png")
        grids[name] = np.asarray(grid)
    for tracker in accelerator.trackers:
        if tracker.name == "wandb":
            import wandb

            tracker.log({k: wandb.Image(g) for k, g in grids.items()}, step=step)
        elif tracker.name == "tensorboard":
            tracker.log_images({k: g[None] for k, g in grids.items()}, step=step, dataformats="NHWC")
            tracker.writer.flush()
