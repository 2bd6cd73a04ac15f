"""Photo-crop demo data: 64x64 crops of the real colour photos scikit-image and scikit-learn ship.

Random square crops at a few scales (a quarter, half or all of the shorter side; random flips), resized
with antialiasing. The validation split is HELD OUT BY SOURCE IMAGE: val crops come only from photos
never used in train, so reconstruction metrics measure generalisation, not memorised crops.

    train: astronaut, rocket, immunohistochemistry, hubble_deep_field, retina, stereo_motorcycle
           (left and right views, both train), china (scikit-learn)
    val:   chelsea (cat), coffee, flower (scikit-learn)

Grey-scale images (camera, lfw_subset faces, ...) are left out: every sample is a real colour photo.

    python -m data.photos --out data/demo/photos --train 4000 --val 400 --size 64
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from data import generator_main
from ldm.data.shards import write_splits

# source -> (loader returning uint8 HxWx3 arrays, caption noun phrase)
CAPTIONS = {
    "astronaut": "an astronaut", "rocket": "a rocket on a launch pad",
    "immunohistochemistry": "a stained tissue sample", "hubble_deep_field": "galaxies in deep space",
    "retina": "a human retina", "stereo_motorcycle": "a motorcycle in a garage", "china": "a chinese temple",
    "chelsea": "a cat", "coffee": "a cup of coffee", "flower": "a flower",
}
TRAIN_SOURCES = ("astronaut", "rocket", "immunohistochemistry", "hubble_deep_field", "retina",
                 "stereo_motorcycle", "china")
VAL_SOURCES = ("chelsea", "coffee", "flower")
SCALES = (0.25, 0.5, 1.0)  # crop side as a fraction of the image's shorter side


def load_source(name: str) -> list[np.ndarray]:
    """The photo(s) of one source as uint8 (H, W, 3) arrays (two views for stereo_motorcycle)."""
    if name in ("china", "flower"):
        from sklearn.datasets import load_sample_image

        return [load_sample_image(f"{name}.jpg")]
    import skimage.data

    if name == "stereo_motorcycle":
        left, right, _disparity = skimage.data.stereo_motorcycle()
        return [left, right]
    return [getattr(skimage.data, name)()]


def random_crop(photo: np.ndarray, rng: np.random.Generator, size: int) -> tuple[Image.Image, dict]:
    height, width, _ = photo.shape
    scale = float(rng.choice(SCALES))
    side = max(size, int(round(scale * min(height, width))))
    top, left = int(rng.integers(0, height - side + 1)), int(rng.integers(0, width - side + 1))
    flip = bool(rng.random() < 0.5)
    crop = Image.fromarray(photo[top : top + side, left : left + side])
    crop = crop.resize((size, size), Image.Resampling.LANCZOS, reducing_gap=3.0)  # antialiased
    if flip:
        crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return crop, {"scale": scale, "top": top, "left": left, "side": side, "flip": flip}


def generate(sources, n: int, size: int = 64, seed: int = 0):
    """Yield n (crop, meta) pairs cycling over `sources` (equal share each), deterministic in seed."""
    rng = np.random.default_rng(seed)
    photos = {name: load_source(name) for name in sources}
    for i in range(n):
        name = sources[i % len(sources)]
        view = int(rng.integers(len(photos[name])))
        crop, meta = random_crop(photos[name][view], rng, size)
        yield crop, {"source": name, "view": view, **meta}


def write_photos(out_dir: str, n_train: int = 4000, n_val: int = 400, size: int = 64, seed: int = 0,
                 max_count: int = 1000) -> dict[str, str]:
    def samples(split, sources, count, stream_seed):
        return ({"key": f"{split}{i:06d}", "image": crop, "caption": f"a photo of {CAPTIONS[meta['source']]}",
                 "meta": meta} for i, (crop, meta) in enumerate(generate(sources, count, size, stream_seed)))

    return write_splits(out_dir, {"train": (n_train, samples("train", TRAIN_SOURCES, n_train, (seed, 0))),
                                  "val": (n_val, samples("val", VAL_SOURCES, n_val, (seed, 1)))}, max_count)


def main(argv=None) -> None:
    generator_main(argv, __doc__, write_photos, train=4000, val=400)


if __name__ == "__main__":
    main()
