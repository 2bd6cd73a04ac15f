"""One raw WebDataset sample (a dict of the tar members' bytes) -> the decoded sample of the loader's
contract (docs/architecture.md), or `SkipSample` saying why it cannot be used. ldm/data/webdataset.py
counts the skips by kind and goes on."""

from __future__ import annotations

import dataclasses
import io
import json

import numpy as np
import torch
from PIL import Image

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


def resize_center_crop(image: Image.Image, size: int) -> Image.Image:
    """Shorter side -> `size` (antialiased bicubic), then the centred `size`x`size` crop."""
    width, height = image.size
    scale = size / min(width, height)
    if scale != 1.0:
        new_size = (max(size, round(width * scale)), max(size, round(height * scale)))
        image = image.resize(new_size, Image.Resampling.BICUBIC)
    left, top = (image.width - size) // 2, (image.height - size) // 2
    return image.crop((left, top, left + size, top + size))


def to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> float32 (3, H, W) in [-1, 1]."""
    array = np.asarray(image, dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(127.5).sub_(1.0)


@dataclasses.dataclass(frozen=True)
class SampleDecoder:
    """Raw tar sample (dict of bytes) -> decoded sample, or SkipSample. Cheap checks come first."""

    image_size: int
    caption_field: str | None = "txt"  # "txt" | "json:<field>" | None (unconditional: empty captions)
    label_field: str | None = None  # a KEY.json field -> int label

    def __call__(self, raw: dict) -> dict:
        extension = next((e for e in IMAGE_EXTENSIONS if e in raw), None)
        if extension is None:
            have = sorted(k for k in raw if not k.startswith("__"))
            raise SkipSample("missing_image", f"no {'/'.join(IMAGE_EXTENSIONS)} entry (has {have})")
        meta = _parse_json(raw)
        sample = {"key": raw["__key__"], "meta": meta, "caption": self._caption(raw, meta)}
        if self.label_field is not None:
            sample["label"] = self._label(meta)
        sample["image"] = to_tensor(resize_center_crop(load_rgb(raw[extension]), self.image_size))
        return sample

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
