"""Sample images from a trained latent diffusion run: a PNG grid plus one PNG per image.

    python train/sample.py run_dir=runs/ldm_txt2img_demo-shapes prompts='["a red circle in the center on a white background"]'
    python train/sample.py run_dir=… prompts_file=prompts.txt sampler=dpmpp_2m steps=20 guidance_scale=2 seed=1
    python train/sample.py run_dir=runs/ldm_class-mnist labels='[0,1,2,3]'
    python train/sample.py run_dir=… device=cuda precision=bf16 prompts='[…]' negative_prompts='["blurry"]'
    python train/sample.py run_dir=… prompts='[…]' init_image=photo.png strength=0.6     # img2img (SDEdit)
    python train/sample.py run_dir=runs/ldm_inpaint-… image=photo.png mask=mask.png      # inpainting (white = fill)
    python train/sample.py run_dir=… prompts='[…]' height=48 width=64                    # non-square (pixels)
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from ldm.inference import DEVICES, PRECISIONS, autocast, generate, image_shape, load_image, resolve_device


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
    device: str = "auto"  # auto (cuda when there is one) | cpu | cuda | cuda:N
    precision: str = "fp32"  # fp32 | bf16 | fp16: autocast of the UNet and text encoder; the VAE stays fp32
    negative_prompts: List[str] = field(default_factory=list)  # one for all prompts, or one per prompt
    init_image: Optional[str] = None  # img2img: start from this image, noised to t = strength * T
    strength: float = 0.8  # img2img: 1 = ignore the image, -> 0 = keep it
    image: Optional[str] = None  # inpainting: the image ...
    mask: Optional[str] = None  # ... and the mask (white = inpaint, black = keep), same size
    paste: bool = False  # inpainting: copy the input's pixels outside the mask into the result (the decoder
    #                      sees the whole latent, so kept latents decode to slightly shifted pixels otherwise)
    progress: bool = True  # tqdm progress bar over the sampler steps
    height: Optional[int] = None  # pixels; None: the run's data.image_size (square). Each side a multiple of
    width: Optional[int] = None  #  the autoencoder factor x the UNet's 2**(levels-1), checked before loading


ConfigStore.instance().store(name="sample_schema", node=SampleConfig)


def read_prompts(cfg) -> list[str]:
    prompts = list(cfg.prompts)
    if cfg.prompts_file:
        path = Path(cfg.prompts_file)
        if not path.is_file():
            raise FileNotFoundError(f"prompts_file={path} not found")
        prompts += [line.strip() for line in path.read_text().splitlines() if line.strip()]
    return prompts


def check_options(cfg) -> None:
    """Fail before loading anything on an option that cannot work, naming it and the valid choices."""
    from ldm.sampling import SAMPLERS

    if not isinstance(cfg.repeats, int) or cfg.repeats < 1:
        raise ValueError(f"repeats={cfg.repeats!r}: images per prompt/label must be an integer >= 1")
    if cfg.sampler is not None and cfg.sampler not in SAMPLERS:
        raise ValueError(f"sampler={cfg.sampler!r}: choose one of {sorted(SAMPLERS)} (or leave it unset for the "
                         "model's default)")
    if cfg.steps is not None and cfg.steps < 1:
        raise ValueError(f"steps={cfg.steps}: must be >= 1")
    if cfg.batch_size < 1 or cfg.num_samples < 0:
        raise ValueError(f"batch_size={cfg.batch_size} must be >= 1 and num_samples={cfg.num_samples} >= 0")
    if cfg.device.split(":")[0] not in DEVICES:
        raise ValueError(f"device={cfg.device!r}: choose one of {list(DEVICES)} (or cuda:N)")
    if cfg.precision not in PRECISIONS:
        raise ValueError(f"precision={cfg.precision!r}: choose one of {list(PRECISIONS)}")
    for key in ("height", "width"):
        if cfg[key] is not None and (not isinstance(cfg[key], int) or cfg[key] < 1):
            raise ValueError(f"{key}={cfg[key]!r}: must be a positive number of pixels (or unset for the model's size)")
    if not 0.0 < cfg.strength <= 1.0:
        raise ValueError(f"strength={cfg.strength}: must be in (0, 1]")
    if (cfg.image is None) != (cfg.mask is None):
        raise ValueError("inpainting needs both image=… and mask=…")
    if cfg.init_image is not None and cfg.image is not None:
        raise ValueError("give either init_image=… (img2img) or image=… mask=… (inpainting), not both")
    for key in ("init_image", "image", "mask", "prompts_file"):
        if cfg[key] is not None and not Path(cfg[key]).is_file():
            raise FileNotFoundError(f"{key}={cfg[key]} not found")


def conditions(cfg) -> list[dict]:
    """One condition dict per image to generate."""
    prompts, labels = read_prompts(cfg), list(cfg.labels)
    if prompts:
        items = [{"caption": p} for p in prompts]
        negatives = list(cfg.negative_prompts)
        if negatives:
            if len(negatives) not in (1, len(prompts)):
                raise ValueError(f"negative_prompts has {len(negatives)} entries: give one for all prompts "
                                 f"or one per prompt ({len(prompts)})")
            for item, negative in zip(items, negatives * len(prompts) if len(negatives) == 1 else negatives):
                item["negative_caption"] = negative
    elif cfg.negative_prompts:
        raise ValueError("negative_prompts=… needs prompts=… (or prompts_file=…)")
    elif labels:
        items = [{"label": int(y)} for y in labels]
    elif cfg.num_samples:
        items = [{} for _ in range(cfg.num_samples)]
    elif cfg.image is not None or cfg.init_image is not None:
        items = [{}]
    else:
        raise ValueError("nothing to sample: give prompts=[…], prompts_file=…, labels=[…] or num_samples=N")
    return [item for item in items for _ in range(cfg.repeats)]


def check_run(cfg, train_cfg, task) -> None:
    """What the run must be for these options, checked before its weights are read."""
    if not task.generates_images:
        raise ValueError(f"{cfg.run_dir} is a {train_cfg.model.name} run, which does not generate images: "
                         f"sample from a stage-2 (latent diffusion) run")
    if task.conditioner.needs_mask and cfg.image is None:
        raise ValueError(f"{cfg.run_dir} is an inpainting model: give image=… and mask=… (white = fill in)")
    image_shape(task, *pixel_size(cfg, train_cfg))  # a height/width the model cannot take: refused here


def pixel_size(cfg, train_cfg) -> tuple[int, int]:
    """(height, width) in pixels: the options, each defaulting to the run's square data.image_size."""
    size = train_cfg.data.image_size
    return (cfg.height or size), (cfg.width or size)


@hydra.main(version_base="1.3", config_path="../conf", config_name="sample")
def main(cfg) -> None:
    from torchvision.utils import save_image

    from ldm.visualize import captioned_grid

    from ldm.errors import RunError
    from ldm.training.runs import load_run

    try:  # a bad option: one line naming it, before anything is loaded
        check_options(cfg)
        device = resolve_device(cfg.device)
        autocast(device, cfg.precision)  # (refuses fp16 on a CPU)
        items = conditions(cfg)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        raise SystemExit(f"[ldm] {e}") from None
    try:
        train_cfg, task, ckpt = load_run(Path(cfg.run_dir), cfg.checkpoint, cfg.use_ema,
                                         check=lambda train_cfg, task: check_run(cfg, train_cfg, task))
    except (FileNotFoundError, RunError, ValueError) as e:
        raise SystemExit(f"[ldm] {e}") from None
    task.to(device)
    size = pixel_size(cfg, train_cfg)
    latent_size = image_shape(task, *size)
    opts = {k: v for k, v in dict(sampler=cfg.sampler, steps=cfg.steps, guidance_scale=cfg.guidance_scale).items()
            if v is not None}
    if (cfg.sampler or task.sampler) == "ddim":
        opts["eta"] = cfg.eta
    if cfg.init_image:
        opts.update(init_image=load_image(cfg.init_image, size), strength=cfg.strength)
    if cfg.image:
        opts.update(image=load_image(cfg.image, size), mask=load_image(cfg.mask, size, mode="L"), paste=cfg.paste)
    with autocast(device, cfg.precision):
        images = generate(task, items, latent_size=latent_size, batch_size=cfg.batch_size, seed=cfg.seed,
                          progress=cfg.progress, **opts)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    images01 = (images + 1) / 2
    for i, (item, img) in enumerate(zip(items, images01)):
        name = re.sub(r"[^a-z0-9]+", "_", str(item.get("caption", item.get("label", "sample"))).lower()).strip("_")
        save_image(img, out / f"{i:04d}_{name[:60]}.png")
    captions = [item.get("caption") or (f"class {item['label']}" if "label" in item else "") for item in items]
    captioned_grid(images, captions).save(out / "grid.png")  # each prompt / label under its image
    print(f"[ldm] {len(images01)} samples from {ckpt} on {device} ({cfg.precision}) -> {out / 'grid.png'}")


if __name__ == "__main__":
    main()
