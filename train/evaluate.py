"""Evaluate a trained run on its held-out shards.

    python train/evaluate.py runs/autoencoder_kl_demo-photos [--checkpoint latest] [--batches 0]

Prints the task's metrics (stage 1: PSNR, SSIM, LPIPS, codebook usage for VQ) averaged over the
held-out set (all of it with --batches 0) and writes them to <run_dir>/eval.json.
"""
import argparse
import json
from pathlib import Path

import torch

from ldm.training.build import build_eval_loader
from ldm.training.runs import load_run


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
