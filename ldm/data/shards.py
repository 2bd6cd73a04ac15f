"""Write samples into WebDataset shards `{out}/{split}-%06d.tar` with webdataset.ShardWriter.

Each sample is `KEY.<image ext>` + optional `KEY.txt` (caption) + optional `KEY.json` (metadata): the
img2dataset layout that `ldm.data.webdataset.build_loader` reads. Shards are byte-reproducible (fixed
mtime, sorted member order), so the demo generators give identical files for the same seed.
"""

from __future__ import annotations

import io
import json
import math
import os
from dataclasses import dataclass

import numpy as np
import webdataset as wds
from PIL import Image

# Magic bytes -> extension, so already-encoded images are stored as they are (no re-encoding loss).
_MAGIC = ((b"\xff\xd8\xff", "jpg"), (b"\x89PNG\r\n\x1a\n", "png"))
_PIL_FORMAT = {"png": "PNG", "jpg": "JPEG", "webp": "WEBP"}


def sniff_image_extension(data: bytes) -> str | None:
    """Extension of encoded image bytes (jpg/png/webp), None when not one of those."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return next((ext for magic, ext in _MAGIC if data.startswith(magic)), None)


def encode_image(image: Image.Image | np.ndarray, image_format: str = "png", quality: int = 95) -> bytes:
    """PIL image or uint8 HWC/HW array -> encoded bytes (png is lossless, the default for demo data)."""
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8:
            raise ValueError(f"image array must be uint8, got {image.dtype}")
        image = Image.fromarray(image)
    buffer = io.BytesIO()
    options = {"quality": quality} if image_format in ("jpg", "webp") else {}
    if image_format == "jpg" and image.mode not in ("RGB", "L", "CMYK"):
        image = image.convert("RGB")
    image.save(buffer, format=_PIL_FORMAT[image_format], **options)
    return buffer.getvalue()


def shard_pattern(files: list[str]) -> str:
    """Brace pattern `dir/split-{000000..000009}.tar` covering consecutive shard files (or a comma list)."""
    if not files:
        raise ValueError("no shard files written")
    if len(files) == 1:
        return files[0]
    stems = [f[: -len("-000000.tar")] for f in files]
    numbers = [f[-len("000000.tar"): -len(".tar")] for f in files]
    consecutive = [int(n) for n in numbers] == list(range(int(numbers[0]), int(numbers[0]) + len(files)))
    if len(set(stems)) == 1 and consecutive:
        return f"{stems[0]}-{{{numbers[0]}..{numbers[-1]}}}.tar"
    return ",".join(files)


@dataclass
class ShardSet:
    files: list[str]
    pattern: str
    count: int  # samples written


class ShardSink:
    """`with ShardSink(out, "train", max_count=1000) as sink: sink.write(key, image, caption, meta)`.

    The writer is opened at the first sample, so nothing is left on disk when no sample comes."""

    def __init__(self, out_dir: str, split: str = "train", *, max_count: int = 1000,
                 image_format: str = "png", max_size: float = 1e9, mtime: float = 0.0):
        if image_format not in _PIL_FORMAT:
            raise ValueError(f"image_format must be one of {sorted(_PIL_FORMAT)}, got {image_format!r}")
        if max_count < 1:
            raise ValueError(f"max_count must be >= 1, got {max_count}")
        os.makedirs(out_dir, exist_ok=True)
        self.pattern = os.path.join(out_dir, f"{split}-%06d.tar")
        self.max_count, self.max_size, self.mtime, self.image_format = max_count, max_size, mtime, image_format
        self.files: list[str] = []
        self.count = 0
        self._writer: wds.ShardWriter | None = None
        self._keys: set[str] = set()

    def write(self, key: str, image, caption: str | None = None, meta: dict | None = None) -> None:
        """image: PIL image, uint8 array, or already-encoded jpg/png/webp bytes (stored unchanged)."""
        if not key or "." in key or key.startswith("_"):
            # webdataset splits KEY.ext at the first dot of the basename; "__" prefixes are metadata
            raise ValueError(f"sample key {key!r} must be non-empty, contain no '.', and not start with '_'")
        if key in self._keys:
            raise ValueError(f"duplicate sample key {key!r}")
        self._keys.add(key)
        if isinstance(image, (bytes, bytearray, memoryview)):
            extension = sniff_image_extension(bytes(image))
            if extension is None:
                raise ValueError(f"sample {key!r}: image bytes are not jpg/png/webp")
            sample = {"__key__": key, extension: bytes(image)}
        else:
            sample = {"__key__": key, self.image_format: encode_image(image, self.image_format)}
        if caption is not None:
            sample["txt"] = caption.encode("utf-8")
        if meta is not None:
            sample["json"] = json.dumps(meta, sort_keys=True).encode("utf-8")
        if self._writer is None:
            self._writer = wds.ShardWriter(self.pattern, maxcount=self.max_count, maxsize=self.max_size,
                                           post=self.files.append, verbose=0, encoder=False, mtime=self.mtime)
        self._writer.write(sample)
        self.count += 1

    def close(self) -> ShardSet:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        return ShardSet(list(self.files), shard_pattern(self.files) if self.files else "", self.count)

    def __enter__(self) -> "ShardSink":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def samples_per_shard(count: int, max_count: int = 1000, min_shards: int = 8) -> int:
    """Shard size for `count` samples: at most max_count, and small enough to give >= min_shards shards,
    because ranks x workers each need a shard of their own (8 covers 2 nodes x 2 GPUs x 2 workers)."""
    return max(1, min(max_count, math.ceil(count / min_shards)))


def write_splits(out_dir: str, splits: dict, max_count: int = 1000) -> dict[str, str]:
    """{split: (count, samples)} -> {split: shard pattern}, each split in shards of `samples_per_shard`."""
    return {split: write_shards(samples, out_dir, split, max_count=samples_per_shard(count, max_count)).pattern
            for split, (count, samples) in splits.items()}


def write_shards(samples, out_dir: str, split: str = "train", *, max_count: int = 1000,
                 image_format: str = "png") -> ShardSet:
    """Iterable of dicts {key, image, caption?, meta?} -> ShardSet(files, pattern, count)."""
    sink = ShardSink(out_dir, split, max_count=max_count, image_format=image_format)
    with sink:
        for sample in samples:
            sink.write(sample["key"], sample["image"], sample.get("caption"), sample.get("meta"))
    return sink.close()
