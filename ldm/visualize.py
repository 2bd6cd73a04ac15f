"""Image grids a person can read: small images upscaled to tiles of at least 128 px, each with its
prompt (or label) printed under it. Used by the training loop's sample/reconstruction grids,
train/sample.py and the demo.

Fonts come from installed Python packages, never from the fonts a cluster node happens to have:
DejaVu Sans as matplotlib ships it (Latin, Greek, Cyrillic), else Pillow's own scalable Aileron
(`ImageFont.load_default(size=...)`, Pillow >= 10.1, ASCII only: accents would print as boxes).
"""
from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import NamedTuple, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

MIN_TILE = 128  # px: below this, a 32-px sample is a smudge and its caption unreadable
PAD = 4  # px between tiles
GROUP_GAP = 12  # px of extra space between groups of tiles (input | reconstruction pairs)


class Panel(NamedTuple):
    """One grid a task's `visualize` returns: images with an optional caption for each."""
    images: torch.Tensor  # (N,3,H,W) in [-1,1]
    captions: list[str] | None = None
    group: int = 1  # >1: keep this many consecutive tiles together (input | reconstruction)


@functools.lru_cache(maxsize=8)
def caption_font(size: int) -> ImageFont.FreeTypeFont:
    try:
        import matplotlib

        return ImageFont.truetype(str(Path(matplotlib.__file__).parent / "mpl-data/fonts/ttf/DejaVuSans.ttf"), size)
    except (ImportError, OSError):
        return ImageFont.load_default(size=size)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """`(N,3,H,W)` in [-1,1] -> `(N,H,W,3)` uint8."""
    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"images must be (N, 1|3, H, W) in [-1, 1], got shape {tuple(images.shape)}")
    x = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()
    return x.expand(-1, 3, -1, -1).permute(0, 2, 3, 1).numpy()


def side_by_side(*batches: torch.Tensor) -> torch.Tensor:
    """Interleave equally sized batches: (a0, b0, a1, b1, ...), so each output sits beside its input."""
    if len({tuple(b.shape) for b in batches}) != 1:
        raise ValueError(f"side_by_side: batches differ in shape: {[tuple(b.shape) for b in batches]}")
    return torch.stack(batches, dim=1).flatten(0, 1)


def wrap(text: str, font: ImageFont.FreeTypeFont, width: int, max_lines: int = 4) -> list[str]:
    """Greedy word wrap to `width` pixels, at most `max_lines` lines (the last one ends in '…' when text
    is cut); a word wider than a line is broken where it overflows."""
    lines, line = [], ""
    for word in text.split():
        while len(word) > 1 and font.getlength(word) > width:
            cut = next(i for i in range(len(word) - 1, 0, -1) if font.getlength(word[:i]) <= width or i == 1)
            lines += [line] if line else []
            lines.append(word[:cut])
            line, word = "", word[cut:]
        candidate = f"{line} {word}".strip()
        if line and font.getlength(candidate) > width:
            lines.append(line)
            line = word
        else:
            line = candidate
    lines += [line] if line else []
    if len(lines) > max_lines:
        last = lines[max_lines - 1]
        while last and font.getlength(last + "…") > width:
            last = last[:-1]
        lines = lines[:max_lines - 1] + [last + "…"]
    return lines


def captioned_grid(images: torch.Tensor, captions: Sequence[str] | None = None, *, nrow: int | None = None,
                   min_tile: int = MIN_TILE, group: int = 1, font_size: int | None = None) -> Image.Image:
    """One RGB image: `images` `(N,3,H,W)` in [-1,1] as tiles, `nrow` per row (default up to 8), each
    upscaled nearest-neighbour by an integer factor to at least `min_tile` px (pixels stay square and
    sharp), with `captions[i]` wrapped to the tile width under tile i. `group` > 1 leaves a wider gap
    after every `group` columns (keeps input | output pairs together)."""
    pixels = to_uint8(images)
    n, h, w, _ = pixels.shape
    if n == 0:
        raise ValueError("captioned_grid: no images to put in a grid")
    if captions is not None and len(captions) != n:
        raise ValueError(f"captioned_grid: {n} images but {len(captions)} captions")
    nrow = nrow or min(8, n)
    if group > 1 and nrow % group:
        raise ValueError(f"captioned_grid: nrow={nrow} must be a multiple of group={group}")
    scale = max(1, math.ceil(min_tile / min(h, w)))
    tw, th = w * scale, h * scale
    font = caption_font(font_size or min(22, max(11, tw // 10)))  # 11-22 px, by tile width
    line_h = font.getbbox("Ag")[3] + 2
    wrapped = [wrap(str(c), font, tw - 2) for c in captions] if captions is not None else [[] for _ in range(n)]
    text_h = max(len(lines) for lines in wrapped) * line_h + (PAD if captions is not None else 0)
    rows = math.ceil(n / nrow)
    cell_w, cell_h = tw + PAD, th + text_h + PAD
    gap = GROUP_GAP if group > 1 else 0
    canvas = Image.new("RGB", (nrow * cell_w + PAD + (nrow - 1) // group * gap, rows * cell_h + PAD), "white")
    draw = ImageDraw.Draw(canvas)
    for i in range(n):
        r, c = divmod(i, nrow)
        x = PAD + c * cell_w + (c // group) * gap
        y = PAD + r * cell_h
        canvas.paste(Image.fromarray(pixels[i]).resize((tw, th), Image.NEAREST), (x, y))
        for j, line in enumerate(wrapped[i]):
            draw.text((x + 1, y + th + PAD // 2 + j * line_h), line, fill="black", font=font)
    return canvas
