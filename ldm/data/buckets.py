"""Aspect-ratio buckets (`data.buckets`): train on whole images of many shapes instead of square crops.

Each bucket is a shape (height, width) in pixels with about the pixel count of the square image
(image_size**2, never more), both sides multiples of `step` (so that the autoencoder's and the UNet's
downsampling divide them), and an aspect ratio within 1:max_ratio .. max_ratio:1. An image goes to the
bucket whose aspect ratio is closest to its own (in log ratio), is resized to cover it and loses only
the overflow (ldm/data/decode.py). The training loader (ldm/data/order.py) fills each micro-batch from
one bucket, so a batch stacks into one tensor.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

Shape = tuple[int, int]  # (height, width) in pixels


def make_buckets(image_size: int, step: int = 64, max_ratio: float = 2.0) -> list[Shape]:
    """Every (height, width) with sides multiples of `step`, height * width <= image_size**2, the widest
    such width for each height, and an aspect ratio within `max_ratio` either way; sorted from tallest
    to widest. Always holds the square (image_size, image_size) when `step` divides image_size."""
    check_geometry(image_size, step, max_ratio)
    budget = image_size * image_size
    shapes = set()
    for height in range(step, budget // step + 1, step):
        width = budget // height // step * step
        if width >= step and max(height, width) <= max_ratio * min(height, width) + 1e-9:
            shapes.update({(height, width), (width, height)})  # both orientations: the list is symmetric
    return sorted(shapes, key=lambda s: (s[1] / s[0], s[0]))


def check_geometry(image_size: int, step: int, max_ratio: float) -> None:
    """ValueError naming the key for a pixel budget that cannot make buckets."""
    if step < 8 or step % 8:
        raise ValueError(f"data.bucket_step={step}: must be a positive multiple of 8 (bucket sides must divide by "
                         f"the autoencoder's downsampling factor; 64 suits f8 autoencoders with an SD-like UNet)")
    if image_size % step:
        raise ValueError(f"data.image_size={image_size} is not a multiple of data.bucket_step={step}: the square "
                         f"bucket must exist (pick a step that divides the image size)")
    if not max_ratio >= 1:
        raise ValueError(f"data.bucket_max_ratio={max_ratio}: must be >= 1 (2 allows 1:2 .. 2:1)")


def parse_buckets(spec, image_size: int, step: int = 64, max_ratio: float = 2.0) -> list[Shape] | None:
    """`data.buckets` -> the bucket shapes, or None (off: square resize + crop).

    null / false: off. true: generated (`make_buckets`). A list of [height, width] pairs: those shapes,
    each side a positive multiple of 8 (the step is not used). Raises ValueError naming the key."""
    if spec is None or spec is False:
        return None
    if spec is True:
        shapes = make_buckets(image_size, step, max_ratio)
        if len(shapes) == 1:  # the square alone: buckets would change nothing but constrain the batch layout
            raise ValueError(f"data.buckets=true makes only the {image_size}x{image_size} square with "
                             f"data.bucket_step={step} and data.bucket_max_ratio={max_ratio}: lower the step (e.g. "
                             f"{max(8, image_size // 4 // 8 * 8)}) or raise the ratio")
        return shapes
    if isinstance(spec, str) or not isinstance(spec, Sequence):  # (OmegaConf's ListConfig is a Sequence)
        raise ValueError(f"data.buckets={spec!r}: give true (generated from data.image_size, data.bucket_step and "
                         f"data.bucket_max_ratio), false/null (square crops), or a list of [height, width] pairs")
    shapes = []
    for item in spec:
        pair = list(item) if isinstance(item, Sequence) and not isinstance(item, str) else [item]
        ok = len(pair) == 2 and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 and v % 8 == 0
                                    for v in pair)
        if not ok:
            raise ValueError(f"data.buckets: {pair!r} is not a [height, width] pair of positive multiples of 8")
        shapes.append((pair[0], pair[1]))
    if not shapes:
        raise ValueError("data.buckets=[]: give at least one [height, width] pair, or false for square crops")
    if len(set(shapes)) != len(shapes):
        raise ValueError(f"data.buckets lists a shape twice: {shapes}")
    return sorted(shapes, key=lambda s: (s[1] / s[0], s[0]))


def nearest_bucket(width: int, height: int, buckets: list[Shape]) -> Shape:
    """The bucket whose aspect ratio is closest to width/height in log ratio (|log(w/h) - log(W/H)|); on a
    tie the larger bucket, then the first in the list: the choice depends on the image size only."""
    aspect = math.log(width / height)
    return min(buckets, key=lambda s: (round(abs(aspect - math.log(s[1] / s[0])), 12), -s[0] * s[1]))


def shape_name(shape: Shape) -> str:
    """(height, width) -> "HxW", the histogram's label."""
    return f"{shape[0]}x{shape[1]}"
