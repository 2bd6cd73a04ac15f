"""Coloured-shapes demo data: one shape per image, captioned, with an analyzer that reads it back.

Each image: one {circle, square, triangle} in a pure, saturated colour at one of five positions, with a
varied size, on a uniform white/black/gray background, drawn at 4x and box-downsampled (anti-aliasing).
The caption is exactly `a {colour} {shape} {position phrase} on a {background} background`, KEY.json holds
the attributes. The vocabulary and
the reader (`analyze`, `score`: ldm/metrics/shapes.py) recover (colour, shape, position, background) from
pixels, so text-to-image samples can be scored for prompt faithfulness.

    python -m data.shapes --out data/demo/shapes --train 5000 --val 500 --size 64
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from data import generator_main
from ldm.data.shards import write_splits
from ldm.metrics.shapes import BACKGROUNDS, COLOURS, POSITIONS, SHAPES  # the vocabulary the reader knows

POSITION_PHRASES = {"left": "on the left", "right": "on the right", "top": "at the top",
                    "bottom": "at the bottom", "center": "in the center"}
SIZE_RANGE = (0.10, 0.16)  # radius of the equal-area circle, as a fraction of the image side
JITTER = 0.03  # uniform offset of the centre (fraction of the side); keeps every shape inside the frame
SUPERSAMPLE = 4


def caption_for(attrs: dict) -> str:
    return (f"a {attrs['colour']} {attrs['shape']} {POSITION_PHRASES[attrs['position']]} "
            f"on a {attrs['background']} background")


def sample_attributes(rng: np.random.Generator) -> dict:
    """Uniform over colour x shape x position x background; size and centre jitter continuous."""
    return {
        "colour": str(rng.choice(list(COLOURS))),
        "shape": str(rng.choice(SHAPES)),
        "position": str(rng.choice(list(POSITIONS))),
        "background": str(rng.choice(list(BACKGROUNDS))),
        "size": round(float(rng.uniform(*SIZE_RANGE)), 4),
        "dx": round(float(rng.uniform(-JITTER, JITTER)), 4),
        "dy": round(float(rng.uniform(-JITTER, JITTER)), 4),
    }


def _outline(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]] | tuple:
    """Polygon (or ellipse box) of `shape` with the area of a circle of radius r, bbox centred at (cx, cy)."""
    if shape == "circle":
        return (cx - r, cy - r, cx + r, cy + r)
    if shape == "square":
        half = r * np.sqrt(np.pi) / 2  # side r*sqrt(pi): same area as the circle
        return [(cx - half, cy - half), (cx + half, cy - half), (cx + half, cy + half), (cx - half, cy + half)]
    side = r * np.sqrt(4 * np.pi / np.sqrt(3))  # equilateral, same area as the circle
    height = side * np.sqrt(3) / 2
    return [(cx, cy - height / 2), (cx + side / 2, cy + height / 2), (cx - side / 2, cy + height / 2)]


def render(attrs: dict, size: int = 64) -> Image.Image:
    big = size * SUPERSAMPLE
    image = Image.new("RGB", (big, big), BACKGROUNDS[attrs["background"]])
    draw = ImageDraw.Draw(image)
    px, py = POSITIONS[attrs["position"]]
    cx, cy, r = (px + attrs["dx"]) * big, (py + attrs["dy"]) * big, attrs["size"] * big
    outline = _outline(attrs["shape"], cx, cy, r)
    fill = COLOURS[attrs["colour"]]
    if attrs["shape"] == "circle":
        draw.ellipse(outline, fill=fill)
    else:
        draw.polygon(outline, fill=fill)
    return image.resize((size, size), Image.Resampling.BOX)  # area average of 4x4 blocks = anti-aliasing


def generate(n: int, size: int = 64, seed: int = 0):
    """Yield n (image, attrs) pairs, deterministic in seed."""
    rng = np.random.default_rng(seed)
    for _ in range(n):
        attrs = sample_attributes(rng)
        yield render(attrs, size), attrs


# ------------------------------------------------------------------------------------------- writer
def write_shapes(out_dir: str, n_train: int = 5000, n_val: int = 500, size: int = 64, seed: int = 0,
                 max_count: int = 1000) -> dict[str, str]:
    """Write train/val shards; val draws from an independent stream (seed, 1). Returns split -> pattern."""
    def samples(split, count, stream_seed):
        return ({"key": f"{split}{i:06d}", "image": image, "caption": caption_for(attrs), "meta": attrs}
                for i, (image, attrs) in enumerate(generate(count, size, stream_seed)))

    return write_splits(out_dir, {"train": (n_train, samples("train", n_train, (seed, 0))),
                                  "val": (n_val, samples("val", n_val, (seed, 1)))}, max_count)


def main(argv=None) -> None:
    generator_main(argv, __doc__, write_shapes, train=5000, val=500)


if __name__ == "__main__":
    main()
