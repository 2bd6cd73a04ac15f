"""Load a trained run (config + weights) for evaluation and sampling."""
from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf
from safetensors.torch import load_file

from ldm.training.checkpoint import check_task_weights, resolve_resume
from ldm.config import TrainConfig
from ldm.training.build import build_task
from ldm.training.consolidate import checkpoint_format, read_sharded_weights


def load_run(run_dir: Path, checkpoint: str = "latest", use_ema: bool = True, check=None):
    """(cfg, task, checkpoint path) of a run written by train/main.py, weights loaded, in eval mode.

    With `use_ema` the EMA weights (when the run keeps them) replace the EMA target's (the UNet).
    `check(cfg, task)`, when given, runs after the task is built and before its weights are read: a caller
    refuses a run it cannot use (e.g. a stage-1 run for sampling) without waiting for an SD-size load.
    """
    run_dir = Path(run_dir)
    cfg_file = run_dir / "config.yaml"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{cfg_file} not found: is {run_dir} a run directory written by train/main.py?")
    raw = OmegaConf.load(cfg_file)
    unet = OmegaConf.select(raw, "model.task.unet")
    if unet is not None and "use_checkpoint" in unet:  # runs from before trainer.activation_checkpointing
        del unet["use_checkpoint"]
    cfg = OmegaConf.merge(OmegaConf.structured(TrainConfig), raw)
    ckpt = resolve_resume(checkpoint, run_dir)
    if ckpt is None:
        raise FileNotFoundError(f"no checkpoint in {run_dir / 'checkpoints'}: train first (train/main.py)")
    task = build_task(cfg).task
    if check is not None:
        check(cfg, task)
    if checkpoint_format(ckpt) == "sharded":  # joined here, in memory; train/consolidate.py writes it once
        print(f"[ldm] {ckpt} is sharded: consolidating its weights in memory (python train/consolidate.py "
              f"{ckpt} writes them once)", flush=True)
        weights, ema = read_sharded_weights(ckpt)
    else:
        ema_file = ckpt / "ema.safetensors"
        weights = load_file(ckpt / "model.safetensors")
        ema = load_file(ema_file) if use_ema and ema_file.is_file() else None
    check_task_weights(task, weights, ckpt)
    task.load_state_dict(weights, strict=False)
    if use_ema and ema is not None:
        shadow = {k.removeprefix("shadow."): v for k, v in ema.items() if k.startswith("shadow.")}
        task.ema_target().load_state_dict(shadow)
    return cfg, task.eval(), ckpt
