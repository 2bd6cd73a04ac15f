"""One raw WebDataset sample (a dict of the tar members' bytes) -> the decoded sample of the loader's
contract (docs/architecture.md), or `SkipSample` saying why it cannot be used. ldm/data/webdataset.py
counts the skips by kind and goes on."""

from __future__ import annotations

import dataclasses
import io
import json
import math
import random

import numpy as np
import torch
from PIL import Image

from ldm.data.buckets import nearest_bucket

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
SKIP_KINDS = ("decode_error", "missing_image", "missing_caption", "bad_mode", "missing_label", "shard_error",
              "checksum_error")
# Modes with a faithful 8-bit RGB conversion. 16/32-bit integer and float modes (I;16, I, F) have no
# agreed mapping to display colour (what range is white?), so those samples are skipped as bad_mode.
RGB_CONVERTIBLE_MODES = frozenset({"RGB", "RGBA", "L", "LA", "P", "PA", "CMYK", "YCbCr", "1"})


class SkipSample(Exception):
    """A sample that cannot be used; `kind` is one of SKIP_KINDS."""

    def __init__(self, kind: str, detail: str):
        super().__init__(f"{kind}: {detail}")
        self.kind, self.detail = kind, detail


def load_rgb(data: bytes) -> Image.Image:
    """Encoded image -> RGB PIL image; alpha is composited on white (transparent pixels hold junk)."""
    try:
        image = Image.open(io.BytesIO(data))  # reads the header only, so the mode check is cheap
    except Exception as exn:
        raise SkipSample("decode_error", f"{type(exn).__name__}: {exn}") from None
    if image.mode not in RGB_CONVERTIBLE_MODES:
        raise SkipSample("bad_mode", f"image mode {image.mode!r} has no RGB conversion")
    try:
        image.load()
        if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
            rgba = image.convert("RGBA")
            image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
        return image.convert("RGB")
    except Exception as exn:
        raise SkipSample("decode_error", f"{type(exn).__name__}: {exn}") from None


def _shape(size) -> tuple[int, int]:
    """`size` (a side, or (height, width)) -> (height, width)."""
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def resize_cover(image: Image.Image, size) -> Image.Image:
    """The smallest antialiased bicubic resize that covers `size` (a side, or (height, width)): one side
    fits exactly, the other overflows by the least the aspect ratios allow."""
    height, width = _shape(size)
    scale = max(width / image.width, height / image.height)
    if scale != 1.0:
        image = image.resize((max(width, round(image.width * scale)), max(height, round(image.height * scale))),
                             Image.Resampling.BICUBIC)
    return image


def resize_center_crop(image: Image.Image, size) -> Image.Image:
    """Resize to cover `size` (a side: the shorter side -> size; or (height, width)), then the centred crop."""
    height, width = _shape(size)
    image = resize_cover(image, size)
    left, top = (image.width - width) // 2, (image.height - height) // 2
    return image.crop((left, top, left + width, top + height))


CROPS = ("center", "random", "random_resized")


@dataclasses.dataclass(frozen=True)
class Augment:
    """Random training transforms (`data.augment`). The defaults change nothing: centre crop, no flip.

    flip: probability of a horizontal flip. Off by default because it breaks captions that say "left" or
    "right" (a flipped "a cat on the left" shows the cat on the right).
    crop: "center" | "random" (shorter side -> size, then a random square along the longer side) |
    "random_resized" (torchvision's RandomResizedCrop: a random area fraction in `scale` and aspect ratio
    in `ratio`, resized to size x size; for stage 1, where no caption describes the framing).
    """

    flip: float = 0.0
    crop: str = "center"
    scale: tuple[float, float] = (0.5, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)

    def __post_init__(self):
        if not 0.0 <= self.flip <= 1.0:
            raise ValueError(f"data.augment.flip={self.flip}: a probability in [0, 1]")
        if self.crop not in CROPS:
            raise ValueError(f"data.augment.crop={self.crop!r}: one of {', '.join(CROPS)}")
        for name, (low, high) in (("scale", self.scale), ("ratio", self.ratio)):
            if not 0 < low <= high or (name == "scale" and high > 1):
                raise ValueError(f"data.augment.{name}={[low, high]}: needs 0 < low <= high"
                                 + (" <= 1" if name == "scale" else ""))

    @property
    def random(self) -> bool:
        return self.flip > 0 or self.crop != "center"


def random_resized_box(width: int, height: int, scale, ratio, rng: random.Random) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop.get_params with `rng`: (left, top, w, h) of a crop whose area is a
    `scale` fraction of the image and whose aspect ratio is log-uniform in `ratio`; after 10 misses, the
    largest centred crop within `ratio`."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, width - w), rng.randint(0, height - h), w, h
    aspect = width / height
    if aspect < ratio[0]:  # taller than allowed: full width
        w, h = width, min(height, round(width / ratio[0]))
    elif aspect > ratio[1]:  # wider than allowed: full height
        w, h = min(width, round(height * ratio[1])), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def augment_image(image: Image.Image, size, augment: Augment | None, rng: random.Random | None) -> Image.Image:
    """The training transform: crop (centre, random or random-resized) to `size` (a side, or (height, width):
    a bucket), then maybe flip. `rng` is the sample's own generator (SampleDecoder.rng), so the result depends
    on the sample only. For a bucket, "random" slides the crop along the overflowing side and "random_resized"
    draws boxes whose aspect ratio is the bucket's times `ratio`."""
    if augment is None or not augment.random:
        return resize_center_crop(image, size)
    height, width = _shape(size)
    if augment.crop == "random_resized":
        aspect = width / height
        ratio = (augment.ratio[0] * aspect, augment.ratio[1] * aspect)
        left, top, w, h = random_resized_box(image.width, image.height, augment.scale, ratio, rng)
        image = image.resize((width, height), Image.Resampling.BICUBIC, box=(left, top, left + w, top + h))
    elif augment.crop == "random":
        image = resize_cover(image, size)
        left, top = rng.randint(0, image.width - width), rng.randint(0, image.height - height)
        image = image.crop((left, top, left + width, top + height))
    else:
        image = resize_center_crop(image, size)
    if rng.random() < augment.flip:  # drawn even when flip is 0 or 1: the draw count never depends on it
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return image


def to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> float32 (3, H, W) in [-1, 1]."""
    array = np.asarray(image, dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(127.5).sub_(1.0)


@dataclasses.dataclass(frozen=True)
class SampleDecoder:
    """Raw tar sample (dict of bytes) -> decoded sample, or SkipSample. Cheap checks come first.

    `__call__` assembles the per-sample fields of the batch contract (key, meta, caption[, label]) for the
    image shards AND the latent cache (`LatentSampleDecoder` overrides only `content_member` and
    `content`), so a cached batch and an image batch cannot drift apart in anything but the content."""

    image_size: int
    caption_field: str | None = "txt"  # "txt" | "json:<field>" | None (unconditional: empty captions)
    label_field: str | None = None  # a KEY.json field -> int label
    augment: Augment | None = None  # random crop/flip (training only); None: centre crop
    seed: int = 0  # with the epoch and the sample key, seeds the sample's augmentation
    # data.buckets: (height, width) shapes (ldm/data/buckets.py); each image goes to the one nearest its aspect
    # ratio, whole but for the overflow. None: the image_size square.
    buckets: tuple[tuple[int, int], ...] | None = None

    def rng(self, raw: dict) -> random.Random:
        """The sample's own generator: a function of (seed, epoch, key), so a resumed run, another worker
        count or a fast-forward draws exactly the same crops and flips. The loader stamps `__epoch__`."""
        return random.Random(f"{self.seed}/augment/{raw.get('__epoch__', 0)}/{raw['__key__']}")

    def __call__(self, raw: dict) -> dict:
        member = self.content_member(raw)  # a sample without content is skipped before anything is decoded
        meta = _parse_json(raw)
        sample = {"key": raw["__key__"], "meta": meta, "caption": self._caption(raw, meta)}
        if self.label_field is not None:
            sample["label"] = self._label(meta)
        sample.update(self.content(raw, member))
        return sample

    def content_member(self, raw: dict) -> str:
        """The member holding the sample's content (the image), or SkipSample("missing_image")."""
        extension = next((e for e in IMAGE_EXTENSIONS if e in raw), None)
        if extension is None:
            have = sorted(k for k in raw if not k.startswith("__"))
            raise SkipSample("missing_image", f"no {'/'.join(IMAGE_EXTENSIONS)} entry (has {have})")
        return extension

    def content(self, raw: dict, member: str) -> dict:
        """{"image": float32 (3, H, W) in [-1, 1]}: image_size x image_size, or the nearest bucket's shape;
        resized and cropped (centre, or as `augment` says, with the sample's own generator), maybe flipped."""
        rng = self.rng(raw) if self.augment is not None and self.augment.random else None
        image = load_rgb(raw[member])
        size = self.image_size if self.buckets is None else nearest_bucket(image.width, image.height, self.buckets)
        return {"image": to_tensor(augment_image(image, size, self.augment, rng))}

    def _caption(self, raw: dict, meta: dict) -> str:
        if self.caption_field is None:
            return ""
        if self.caption_field.startswith("json:"):
            field = self.caption_field[len("json:"):]
            if not isinstance(meta.get(field), str):
                raise SkipSample("missing_caption", f"KEY.json has no string field {field!r}")
            return meta[field]
        if self.caption_field not in raw:
            raise SkipSample("missing_caption", f"no .{self.caption_field} entry")
        try:
            return raw[self.caption_field].decode("utf-8").strip()
        except UnicodeDecodeError as exn:
            raise SkipSample("decode_error", f"caption is not UTF-8: {exn}") from None

    def _label(self, meta: dict) -> int:
        value = meta.get(self.label_field)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
            raise SkipSample("missing_label", f"KEY.json field {self.label_field!r} is {value!r}, not an integer")
        return int(value)


def _parse_json(raw: dict) -> dict:
    if "json" not in raw:
        return {}
    try:
        meta = json.loads(raw["json"])
    except ValueError as exn:
        raise SkipSample("decode_error", f"KEY.json is not valid JSON: {exn}") from None
    if not isinstance(meta, dict):
        raise SkipSample("decode_error", f"KEY.json holds a {type(meta).__name__}, not an object")
    return meta
