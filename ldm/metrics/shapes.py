"""Prompt alignment on the coloured-shapes data (`python -m data shapes`): the attribute vocabulary and a
reader that recovers (colour, shape, position, background) from pixels, so text-to-image samples can be
scored for prompt faithfulness (`score`). Used by train/evaluate.py and the demo."""
from __future__ import annotations

import numpy as np
from PIL import Image
from scipy import ndimage

COLOURS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255),
           "yellow": (255, 255, 0), "cyan": (0, 255, 255), "magenta": (255, 0, 255)}
BACKGROUNDS = {"white": (255, 255, 255), "black": (0, 0, 0), "gray": (128, 128, 128)}
SHAPES = ("circle", "square", "triangle")
# Position -> (x, y) of the shape's bounding-box centre as a fraction of the image side.
POSITIONS = {"left": (0.25, 0.5), "right": (0.75, 0.5), "top": (0.5, 0.25), "bottom": (0.5, 0.75),
             "center": (0.5, 0.5)}


def _to_float_hwc(image) -> np.ndarray:
    """PIL | uint8 HWC array | float HWC array in [0,1] | torch (3,H,W) tensor in [-1,1] -> float HWC [0,1]."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.float64) / 255.0
    if hasattr(image, "detach"):  # torch tensor, the model's output convention
        array = image.detach().float().cpu().numpy()
        if array.ndim != 3 or array.shape[0] != 3:
            raise ValueError(f"tensor image must be (3, H, W) in [-1, 1], got shape {tuple(array.shape)}")
        return np.clip((array.transpose(1, 2, 0) + 1.0) / 2.0, 0.0, 1.0)
    array = np.asarray(image)
    if array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"array image must be (H, W, 3), got shape {array.shape}")
    return array / 255.0 if array.dtype == np.uint8 else np.clip(array.astype(np.float64), 0.0, 1.0)


def _nearest(value: np.ndarray, palette: dict) -> str:
    names = list(palette)
    colours = np.array([palette[n] for n in names], dtype=np.float64) / 255.0
    return names[int(np.argmin(((colours - value) ** 2).sum(axis=1)))]


# Fill ratio (area / bounding-box area) -> shape: upright triangle 1/2, circle pi/4, square 1. Thresholds
# sit between the measured ranges: clean 32-128 px gives triangle <= 0.61, circle 0.77-0.80, square 1.0;
# Gaussian blur 1 px + noise 0.05 at 64 px gives triangle <= 0.61, circle >= 0.73, square >= 0.88.
FILL_THRESHOLDS = ((0.665, "triangle"), (0.85, "circle"), (float("inf"), "square"))


def _largest_blob(mask: np.ndarray) -> np.ndarray:
    labels, count = ndimage.label(mask)
    if count == 0:
        return mask
    sizes = ndimage.sum(mask, labels, index=range(1, count + 1))
    return ndimage.binary_fill_holes(labels == 1 + int(np.argmax(sizes)))


def foreground_mask(pixels: np.ndarray, background: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """(coverage, foreground colour): per-pixel fraction of the shape (0 outside its blob), the blob
    being the largest connected region past the 50 % contour, holes filled.

    Pass 1 takes pixels clearly off the background (distance > 0.3; palette contrasts are >= 0.87) to
    find the blob and its colour. Pass 2 measures each pixel's coverage as its position between the
    background and that colour (projection on their difference): area = sum of coverage is exact under
    anti-aliasing and blur, and the 50 % contour is where a blurred straight edge stays put, unlike a
    fixed distance threshold that swells the shape by the blur width."""
    blob = _largest_blob(np.sqrt(((pixels - background) ** 2).sum(axis=2)) > 0.3)
    if blob.sum() < 4:
        return blob, None
    core = ndimage.binary_erosion(blob)  # edge pixels are blends with the background
    colour = np.median(pixels[core if core.sum() >= 4 else blob], axis=0)
    contrast = colour - background
    fraction = ((pixels - background) @ contrast) / max(float(contrast @ contrast), 1e-6)
    blob = _largest_blob(fraction > 0.5)
    near_blob = ndimage.binary_dilation(blob, iterations=2)  # keep the anti-aliased rim, drop far noise
    return np.clip(fraction, 0.0, 1.0) * near_blob, colour


def analyze(image) -> dict:
    """Read (colour, shape, position, background) back from an image; None for what has no foreground.

    Background: median of the border frame (shapes never touch it), nearest palette entry. Foreground:
    see `foreground_mask`; colour: nearest palette colour to its median. Position: the blob's
    bounding-box centre -> nearest anchor. Shape: the fill ratio of its bounding box (upright shapes,
    as the generator draws them)."""
    pixels = _to_float_hwc(image)
    height, width, _ = pixels.shape
    frame = max(1, min(height, width) // 32)
    border = np.concatenate([pixels[:frame].reshape(-1, 3), pixels[-frame:].reshape(-1, 3),
                             pixels[:, :frame].reshape(-1, 3), pixels[:, -frame:].reshape(-1, 3)])
    background_colour = np.median(border, axis=0)
    background = _nearest(background_colour, BACKGROUNDS)
    result = {"colour": None, "shape": None, "position": None, "background": background}
    coverage, colour = foreground_mask(pixels, background_colour)
    if colour is None or coverage.sum() < 4:
        return result
    result["colour"] = _nearest(colour, COLOURS)
    ys, xs = np.nonzero(coverage > 0.5)
    centre = np.array([(xs.min() + xs.max() + 1) / 2 / width, (ys.min() + ys.max() + 1) / 2 / height])
    result["position"] = min(POSITIONS, key=lambda p: float(((np.array(POSITIONS[p]) - centre) ** 2).sum()))
    # Sub-pixel extents (sum of the per-column / per-row peak coverage) keep the fill ratio exact for
    # 6-pixel shapes, where a thresholded mask's bounding box is off by a pixel.
    fill = coverage.sum() / (coverage.max(axis=0).sum() * coverage.max(axis=1).sum())
    result["shape"] = next(shape for limit, shape in FILL_THRESHOLDS if fill < limit)
    return result


def score(images, attrs_list) -> dict:
    """Accuracy per attribute, `all_three` (colour+shape+position right) and `all` (also background)."""
    if len(images) != len(attrs_list):
        raise ValueError(f"{len(images)} images but {len(attrs_list)} attribute dicts")
    keys = ("colour", "shape", "position", "background")
    hits = {k: 0 for k in keys} | {"all_three": 0, "all": 0}
    for image, attrs in zip(images, attrs_list):
        read = analyze(image)
        right = {k: read[k] == attrs[k] for k in keys}
        for k in keys:
            hits[k] += right[k]
        hits["all_three"] += right["colour"] and right["shape"] and right["position"]
        hits["all"] += all(right.values())
    return {k: v / max(1, len(images)) for k, v in hits.items()}
