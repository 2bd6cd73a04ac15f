"""Sample images from a trained latent diffusion run: a PNG grid plus one PNG per image.

    python train/sample.py run_dir=runs/ldm_txt2img_demo-shapes prompts='["a red circle in the center on a white background"]'
    python train/sample.py run_dir=… prompts_file=prompts.txt sampler=dpmpp_2m steps=20 guidance_scale=2 seed=1
    python train/sample.py run_dir=runs/ldm_class-mnist labels='[0,1,2,3]'
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

import hydra
import torch
from hydra.core.config_store import ConfigStore
from omegaconf import MISSING


@dataclass
class SampleConfig:
    run_dir: str = MISSING  # a stage-2 run directory written by train/main.py
    checkpoint: str = "latest"  # latest | a checkpoint directory
    prompts: List[str] = field(default_factory=list)
    prompts_file: Optional[str] = None  # one prompt per line
    labels: List[int] = field(default_factory=list)  # class-conditional models
    num_samples: int = 0  # unconditional models: how many images
    repeats: int = 1  # images per prompt / label
    sampler: Optional[str] = None  # ddpm | ddim | plms | dpmpp_2m (None: the model's default)
    steps: Optional[int] = None
    guidance_scale: Optional[float] = None
    eta: float = 0.0  # DDIM only
    seed: int = 0
    batch_size: int = 16
    use_ema: bool = True
    out_dir: str = MISSING


ConfigStore.instance().store(name="sample_schema", node=SampleConfig)


def read_prompts(cfg) -> list[str]:
    prompts = list(cfg.prompts)
    if cfg.prompts_file:
        path = Path(cfg.prompts_file)
        if not path.is_file():
            raise FileNotFoundError(f"prompts_file={path} not found")
        prompts += [line.strip() for line in path.read_text().splitlines() if line.strip()]
    return prompts


def conditions(cfg) -> list[dict]:
    """One condition dict per image to generate."""
    prompts, labels = read_prompts(cfg), list(cfg.labels)
    if prompts:
        items = [{"caption": p} for p in prompts]
    elif labels:
        items = [{"label": int(y)} for y in labels]
    elif cfg.num_samples:
        items = [{} for _ in range(cfg.num_samples)]
    else:
        raise ValueError("nothing to sample: give prompts=[…], prompts_file=…, labels=[…] or num_samples=N")
    return [item for item in items for _ in range(cfg.repeats)]


def generate(task, items: list[dict], *, latent_size, batch_size: int, seed: int, **opts) -> torch.Tensor:
    """Images `(N,3,H,W)` in [-1,1]. Image i starts from noise seeded by seed + i, so it depends on
    (seed, i, its condition) and not on the batch size (up to float rounding of batched kernels)."""
    device = next(task.parameters()).device
    shape = (task.first_stage.latent_channels, *latent_size)
    out = []
    for start in range(0, len(items), batch_size):
        chunk = items[start:start + batch_size]
        batch = {}
        if "caption" in chunk[0]:
            batch["caption"] = [c["caption"] for c in chunk]
        if "label" in chunk[0]:
            batch["label"] = torch.tensor([c["label"] for c in chunk], device=device)
        batch.setdefault("caption", [""] * len(chunk))
        noise = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(seed + start + i))
                             for i in range(len(chunk))])
        generator = torch.Generator().manual_seed(seed + start)  # stochastic samplers' per-step noise
        out.append(task.sample(batch, generator=generator, latent_size=latent_size, noise=noise, **opts).cpu())
    return torch.cat(out)


@hydra.main(version_base="1.3", config_path="../conf", config_name="sample")
def main(cfg) -> None:
    from torchvision.utils import save_image

    from ldm.visualize import captioned_grid

    from ldm.training.runs import load_run

    train_cfg, task, ckpt = load_run(Path(cfg.run_dir), cfg.checkpoint, cfg.use_ema)
    items = conditions(cfg)
    f = task.first_stage.downsample_factor
    latent_size = (train_cfg.data.image_size // f,) * 2
    opts = {k: v for k, v in dict(sampler=cfg.sampler, steps=cfg.steps, guidance_scale=cfg.guidance_scale).items()
            if v is not None}
    if (cfg.sampler or task.sampler) == "ddim":
        opts["eta"] = cfg.eta
    images = generate(task, items, latent_size=latent_size, batch_size=cfg.batch_size, seed=cfg.seed, **opts)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    images01 = (images + 1) / 2
    for i, (item, img) in enumerate(zip(items, images01)):
        name = re.sub(r"[^a-z0-9]+", "_", str(item.get("caption", item.get("label", "sample"))).lower()).strip("_")
        save_image(img, out / f"{i:04d}_{name[:60]}.png")
    captions = [item.get("caption") or (f"class {item['label']}" if "label" in item else "") for item in items]
    captioned_grid(images, captions).save(out / "grid.png")  # each prompt / label under its image
    print(f"[ldm] {len(images01)} samples from {ckpt} -> {out / 'grid.png'}")


if __name__ == "__main__":
    main()
