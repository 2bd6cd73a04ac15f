"""Random inpainting masks (paper §4.5; the LaMa-style mix of boxes and free-form strokes that LDM and
SD-inpainting train on). Convention: 1 = the region to inpaint (white in a mask file), 0 = keep.

A sample's mask is a pure function of (its WebDataset key, the seed, the size): the same image gets the
same mask on every worker, rank and resume, and two runs with different seeds get different masks.
"""
from __future__ import annotations

import zlib

import numpy as np
import torch
from PIL import Image, ImageDraw


def mask_rng(key: str, seed: int) -> np.random.Generator:
    """A generator seeded from the sample key (crc32, stable across processes, unlike hash()) and the seed."""
    return np.random.default_rng([zlib.crc32(str(key).encode("utf-8")), int(seed)])


def _boxes(draw: ImageDraw.ImageDraw, rng: np.random.Generator, size: int) -> None:
    for _ in range(rng.integers(1, 4)):
        w, h = rng.integers(size // 8, size // 2 + 1, size=2)
        x, y = rng.integers(0, size - w + 1), rng.integers(0, size - h + 1)
        draw.rectangle([int(x), int(y), int(x + w - 1), int(y + h - 1)], fill=255)


def _strokes(draw: ImageDraw.ImageDraw, rng: np.random.Generator, size: int) -> None:
    for _ in range(rng.integers(1, 4)):
        width = int(rng.integers(max(1, size // 16), max(2, size // 6) + 1))
        points = [tuple(rng.integers(0, size, size=2).tolist())]
        for _ in range(rng.integers(2, 6)):  # a random walk of straight segments
            angle, length = rng.uniform(0, 2 * np.pi), rng.uniform(size / 8, size / 3)
            x, y = points[-1]
            points.append((int(np.clip(x + length * np.cos(angle), 0, size - 1)),
                           int(np.clip(y + length * np.sin(angle), 0, size - 1))))
        draw.line(points, fill=255, width=width, joint="curve")
        for x, y in points:  # round the joints and ends
            r = width // 2
            draw.ellipse([x - r, y - r, x + r, y + r], fill=255)


MASK_KINDS = {"box": _boxes, "stroke": _strokes}


def random_mask(size, rng: np.random.Generator, kinds=("box", "stroke"),
                max_coverage: float = 0.75) -> torch.Tensor:
    """(1, size, size) float mask in {0, 1}: boxes and/or strokes, never empty, never covering more than
    `max_coverage` of the image (redrawn, up to a few times, then cut back to one box).

    `size` = (H, W) with H != W (an aspect-ratio bucket): the square mask of the longer side, resized
    nearest-neighbour to H x W, so a square size draws exactly the masks it always did."""
    if not isinstance(size, int):
        height, width = size
        if height != width:
            square = random_mask(max(height, width), rng, kinds, max_coverage)
            mask = torch.from_numpy(np.asarray(Image.fromarray(square[0].numpy().astype(np.uint8) * 255)
                                               .resize((width, height), Image.NEAREST)) > 127).float()[None]
            if 0 < mask.mean() <= max_coverage:
                return mask
            mask.zero_()  # a stroke thinned away (or coverage grew): one centred box of a quarter of the area
            mask[:, height // 4: height // 4 + height // 2, width // 4: width // 4 + width // 2] = 1
            return mask
        size = height
    unknown = set(kinds) - set(MASK_KINDS)
    if not kinds or unknown:
        raise ValueError(f"random_mask: kinds must be a non-empty subset of {sorted(MASK_KINDS)}, got {list(kinds)}")
    for _ in range(8):
        image = Image.new("L", (size, size), 0)
        draw = ImageDraw.Draw(image)
        MASK_KINDS[kinds[int(rng.integers(len(kinds)))]](draw, rng, size)
        mask = torch.from_numpy(np.asarray(image) > 127).float()
        if 0 < mask.mean() <= max_coverage:
            return mask[None]
    mask = torch.zeros(1, size, size)  # fallback: one centred box of a quarter of the area
    mask[:, size // 4: size // 4 + size // 2, size // 4: size // 4 + size // 2] = 1
    return mask


def masks_for_keys(keys, size, seed: int, kinds=("box", "stroke")) -> torch.Tensor:
    """(B, 1, H, W) masks (`size` = H = W, or (H, W)) for a batch of sample keys; deterministic in (key, seed)."""
    return torch.stack([random_mask(size, mask_rng(k, seed), tuple(kinds)) for k in keys])


def masked_image(image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The image with the region to inpaint set to 0 (mid-grey in [-1, 1]), as SD-inpainting does."""
    return image * (mask < 0.5).to(image.dtype)
