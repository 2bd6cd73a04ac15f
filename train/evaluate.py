"""Evaluate a trained run on its held-out shards.

    python train/evaluate.py runs/autoencoder_kl_demo-photos [--checkpoint latest] [--batches 0]

Prints the task's metrics (stage 1: PSNR, SSIM, LPIPS, codebook usage for VQ) averaged over the
held-out set (all of it with --batches 0) and writes them to <run_dir>/eval.json.
"""
import argparse
import json
from pathlib import Path

import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

from ldm.checkpoint import resolve_resume
from ldm.config import TrainConfig
from ldm.training.build import build_eval_loader, build_task


def load_run(run_dir: Path, checkpoint: str = "latest"):
    """(cfg, task, checkpoint path) of a finished or running run, weights loaded, in eval mode."""
    cfg_file = run_dir / "config.yaml"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{cfg_file} not found: is {run_dir} a run directory written by train/main.py?")
    cfg = OmegaConf.merge(OmegaConf.structured(TrainConfig), OmegaConf.load(cfg_file))
    ckpt = resolve_resume(checkpoint, run_dir)
    if ckpt is None:
        raise FileNotFoundError(f"no checkpoint in {run_dir / 'checkpoints'}: train first (train/main.py)")
    task = build_task(cfg)
    weights = load_file(ckpt / "model.safetensors")
    missing, unexpected = task.load_state_dict(weights, strict=False)
    skip = tuple(getattr(task, "frozen_prefixes", ()))
    missing = [k for k in missing if not (skip and k.startswith(skip))]
    if missing or unexpected:
        raise ValueError(f"{ckpt}: weights do not match the run's model (missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]})")
    return cfg, task.eval(), ckpt


@torch.no_grad()
def evaluate_run(run_dir: Path, checkpoint: str = "latest", batches: int = 0, batch_size: int = 16) -> dict:
    cfg, task, ckpt = load_run(run_dir, checkpoint)
    totals, count = {}, 0
    for i, batch in enumerate(build_eval_loader(cfg, batch_size)):
        if batches and i >= batches:
            break
        for k, v in task.evaluate(batch).items():
            totals[k] = totals.get(k, 0.0) + float(v) * len(batch["image"])
        count += len(batch["image"])
    if count == 0:
        raise RuntimeError(f"no held-out samples read from {cfg.data.val_shards or cfg.data.shards}")
    metrics = {k: v / count for k, v in totals.items()}
    metrics.update(images=count, checkpoint=str(ckpt))
    (run_dir / "eval.json").write_text(json.dumps(metrics, indent=1))
    return metrics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--checkpoint", default="latest", help="latest or a checkpoint directory")
    parser.add_argument("--batches", type=int, default=0, help="held-out batches to use (0 = all)")
    args = parser.parse_args()
    metrics = evaluate_run(args.run_dir, args.checkpoint, args.batches)
    for k, v in metrics.items():
        print(f"{k:>16}: {v:.4f}" if isinstance(v, float) else f"{k:>16}: {v}")


if __name__ == "__main__":
    main()
