"""Sampling a trained stage-2 task outside the training loop: the device and precision choices, input images,
and `generate`, the one function that `train/sample.py`, `train/evaluate.py` and the demo call."""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Callable

import torch

DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device={name} but torch sees no CUDA GPU here; use device=cpu (or auto)")
    return torch.device(name)


def autocast(device: torch.device, precision: str):
    """Autocast of the sampling forward passes. `task.decode` (and the VAE encode of img2img/inpainting
    inputs) turns autocast off: an fp16 VAE overflows into NaN / black images."""
    dtype = PRECISIONS[precision]
    if dtype is None:
        return contextlib.nullcontext()
    if device.type == "cpu" and dtype == torch.float16:
        raise ValueError("precision=fp16 on the CPU: torch's CPU autocast does not run fp16; use bf16 or fp32")
    return torch.autocast(device.type, dtype=dtype)


def image_shape(task, height: int, width: int) -> tuple[int, int]:
    """The latent `(h, w)` for images of `height` x `width` pixels, or a ValueError naming what each side must
    be a multiple of: the autoencoder's factor f times the UNet's 2**(levels-1) (its skip connections need
    every level's side to halve exactly). Non-square is fine; nothing is padded, so the user picks the size."""
    f = task.first_stage.downsample_factor
    multiple = f * 2 ** (getattr(task.unet, "num_levels", 1) - 1)
    if height < 1 or width < 1 or height % multiple or width % multiple:
        raise ValueError(f"height={height} width={width}: each must be a positive multiple of {multiple} px for "
                         f"this model (autoencoder factor {f} x UNet factor {multiple // f})")
    return height // f, width // f


def _resize_crop(image, height: int, width: int, resample):
    """Scale so the image covers height x width (antialiased for RGB), then the centred crop. For a square
    size it is data.decode.resize_center_crop (shorter side -> size), the training transform."""
    scale = max(height / image.height, width / image.width)
    if scale != 1.0:
        image = image.resize((max(width, round(image.width * scale)), max(height, round(image.height * scale))),
                             resample)
    left, top = (image.width - width) // 2, (image.height - height) // 2
    return image.crop((left, top, left + width, top + height))


def load_image(path, size, mode: str = "RGB") -> torch.Tensor:
    """(1, C, H, W) for `size` = H = W or `size` = (H, W): resized to cover and centre-cropped as the
    training data; RGB in [-1, 1], or a mask (mode "L") in {0, 1} (white = 1 = inpaint; nearest-neighbour so
    it stays binary)."""
    import io

    import numpy as np
    from PIL import Image

    from ldm.data.decode import load_rgb, to_tensor

    height, width = (size, size) if isinstance(size, int) else size
    data = Path(path).read_bytes()
    if mode == "RGB":
        return to_tensor(_resize_crop(load_rgb(data), height, width, Image.Resampling.BICUBIC))[None]
    mask = _resize_crop(Image.open(io.BytesIO(data)).convert("L"), height, width, Image.Resampling.NEAREST)
    return torch.from_numpy(np.asarray(mask) > 127).float()[None, None]


def generate(task, items: list[dict], *, latent_size, batch_size: int, seed: int,
             progress: bool | Callable[[int], None] = False,
             init_image: torch.Tensor | None = None, image: torch.Tensor | None = None,
             mask: torch.Tensor | None = None, paste: bool = False, **opts) -> torch.Tensor:
    """Images `(N,3,H,W)` in [-1,1]. Image i starts from noise seeded by seed + i, so it depends on
    (seed, i, its condition) and not on the batch size (up to float rounding of batched kernels) nor on
    the device (the noise is drawn on the CPU). `init_image` (img2img) and `image` + `mask` (inpainting)
    are (1,3,H,W) / (1,1,H,W) tensors used for every item; `paste` copies `image` outside `mask` into the
    result. `progress`: True for a tqdm bar of sampler steps, or a function called with each batch's image
    count (plain progress lines). Runs on the task's device."""
    from tqdm.auto import tqdm

    from ldm.sampling import img2img_timesteps

    device = next(task.parameters()).device
    shape = (task.first_stage.latent_channels, *latent_size)
    steps = opts.get("steps") or task.sample_steps
    if init_image is not None:
        steps = len(img2img_timesteps(task.schedule.num_timesteps, steps, opts.get("strength", 1.0)))
    batches = range(0, len(items), batch_size)
    bar = tqdm(total=len(batches) * steps, unit="step", desc="sampling", disable=progress is not True, leave=False)
    opts["callback"] = lambda info: bar.update(1)
    out = []
    for start in batches:
        chunk = items[start:start + batch_size]
        batch = {}
        if "caption" in chunk[0]:
            batch["caption"] = [c["caption"] for c in chunk]
        if "negative_caption" in chunk[0]:
            batch["negative_caption"] = [c["negative_caption"] for c in chunk]
        if "label" in chunk[0]:
            batch["label"] = torch.tensor([c["label"] for c in chunk], device=device)
        if image is not None:
            batch["image"] = image.to(device).expand(len(chunk), -1, -1, -1)
            batch["mask"] = mask.to(device).expand(len(chunk), -1, -1, -1)
        batch.setdefault("caption", [""] * len(chunk))
        extra = {} if init_image is None else {"init_image": init_image.to(device).expand(len(chunk), -1, -1, -1)}
        noise = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(seed + start + i))
                             for i in range(len(chunk))])
        generator = torch.Generator().manual_seed(seed + start)  # stochastic samplers' per-step noise
        out.append(task.sample(batch, generator=generator, latent_size=latent_size, noise=noise, **extra,
                               **opts).float().cpu())
        if callable(progress):
            progress(len(chunk))
    bar.close()
    images = torch.cat(out)
    if paste and image is not None:
        images = torch.where(mask.cpu() > 0.5, images, image.float().cpu())
    return images
