"""Image folder -> WebDataset shards (`KEY.<ext>` + `KEY.txt` + `KEY.json`), the layout build_loader reads.

Captions come from a same-name `.txt` beside each image (`cat.jpg` + `cat.txt`) or from a CSV/parquet
table with columns `filename,caption` (filename relative to the folder, or a bare file name).
jpg/png/webp bytes are stored unchanged (no re-encoding loss); other formats PIL reads (bmp, tiff, gif)
are re-encoded as png. Unreadable images are reported and skipped, never fatal. Images without a caption
are written without `KEY.txt`: stage 1 (and unconditional or class models) read every image with
`data.caption_field=null`; a text-to-image stage 2 with the default `data.caption_field=txt` skips them.

    python -m data.make_shards IMAGE_DIR --out shards/images [--captions captions.csv] [--val-fraction 0.1]
"""

from __future__ import annotations

import argparse
import csv
import os
import random
import re

from PIL import Image

from ldm.data.shards import ShardSink, sniff_image_extension

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif")


def list_images(image_dir: str) -> list[str]:
    """Image paths under image_dir (recursive), relative to it, sorted for a deterministic order."""
    found = []
    for root, _dirs, files in os.walk(image_dir):
        for name in files:
            if name.lower().endswith(IMAGE_SUFFIXES):
                found.append(os.path.relpath(os.path.join(root, name), image_dir))
    return sorted(found)


def read_caption_table(path: str) -> dict[str, str]:
    """CSV or parquet with columns filename, caption -> {filename: caption}."""
    if path.endswith(".parquet"):
        try:
            import pandas as pd

            rows = pd.read_parquet(path, columns=["filename", "caption"]).itertuples(index=False)
        except ImportError as exn:
            raise ImportError(f"reading {path} needs pandas with pyarrow or fastparquet: {exn}") from None
        return {str(r.filename): str(r.caption) for r in rows}
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        missing = {"filename", "caption"} - set(reader.fieldnames or [])
        if missing:
            raise ValueError(f"{path}: caption table needs columns filename, caption; missing {sorted(missing)}")
        return {row["filename"]: row["caption"] for row in reader}


def _caption(image_dir: str, relative: str, table: dict[str, str] | None) -> str | None:
    if table is not None:
        return table.get(relative, table.get(os.path.basename(relative)))
    text_path = os.path.join(image_dir, os.path.splitext(relative)[0] + ".txt")
    if os.path.isfile(text_path):
        with open(text_path, encoding="utf-8") as handle:
            return handle.read().strip()
    return None


def _image_payload(path: str) -> tuple[bytes | Image.Image, int, int]:
    """Check the image decodes fully; return (bytes to store unchanged or a PIL image to encode, w, h)."""
    with open(path, "rb") as handle:
        data = handle.read()
    with Image.open(path) as image:
        image.load()  # a truncated/corrupt file fails here, not later in training
        width, height = image.size
        if sniff_image_extension(data) is not None:
            return data, width, height
        return image.convert("RGBA" if "A" in image.getbands() else "RGB"), width, height


def _key(relative: str, used: set[str]) -> str:
    """Sample key from the relative path; webdataset splits KEY.ext at the first '.', so no dots."""
    key = re.sub(r"[^A-Za-z0-9_-]", "_", os.path.splitext(relative)[0]).lstrip("_") or "image"
    unique, n = key, 1
    while unique in used:
        unique, n = f"{key}-{n}", n + 1
    used.add(unique)
    return unique


def make_shards(image_dir: str, out_dir: str, *, captions: str | None = None, max_count: int = 1000,
                val_fraction: float = 0.0, seed: int = 0) -> dict:
    """Write `{out_dir}/train-*.tar` (and `val-*.tar` when val_fraction > 0). Returns a report:
    {"train": pattern, "val": pattern?, "written": n, "without_caption": n, "unreadable": [(path, error)]}."""
    if not os.path.isdir(image_dir):
        raise FileNotFoundError(f"image folder {image_dir!r} does not exist")
    table = read_caption_table(captions) if captions else None
    images = list_images(image_dir)
    if not images:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {image_dir!r}")
    rng = random.Random(seed)
    sinks = {"train": ShardSink(out_dir, "train", max_count=max_count)}
    if val_fraction > 0:
        sinks["val"] = ShardSink(out_dir, "val", max_count=max_count)
    report = {"written": 0, "without_caption": 0, "unreadable": []}
    used: set[str] = set()
    for relative in images:
        split = "val" if val_fraction > 0 and rng.random() < val_fraction else "train"
        try:
            payload, width, height = _image_payload(os.path.join(image_dir, relative))
        except Exception as exn:
            report["unreadable"].append((relative, f"{type(exn).__name__}: {exn}"))
            print(f"skipping unreadable image {relative}: {type(exn).__name__}: {exn}")
            continue
        caption = _caption(image_dir, relative, table)
        report["without_caption"] += caption is None
        meta = {"filename": relative, "width": width, "height": height}
        sinks[split].write(_key(relative, used), payload, caption, meta)
        report["written"] += 1
    for split, sink in sinks.items():
        report[split] = sink.close().pattern
    return report


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("image_dir")
    parser.add_argument("--out", required=True)
    parser.add_argument("--captions", help="CSV/parquet with columns filename, caption (default: same-name .txt)")
    parser.add_argument("--max-count", type=int, default=1000, help="samples per shard")
    parser.add_argument("--val-fraction", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        report = make_shards(args.image_dir, args.out, captions=args.captions, max_count=args.max_count,
                             val_fraction=args.val_fraction, seed=args.seed)
    except (OSError, ValueError, ImportError) as exn:  # a wrong folder or caption table: one line, no traceback
        raise SystemExit(f"[ldm] make_shards: {exn}") from None
    print({k: v for k, v in report.items() if k != "unreadable"}, f"unreadable: {len(report['unreadable'])}")
    written, uncaptioned = report["written"], report["without_caption"]
    if uncaptioned:
        what = "none has a caption" if uncaptioned == written else f"{uncaptioned} of {written} have no caption"
        print(f"[ldm] {what}: train stage 1 on every image with data.caption_field=null; a text-to-image "
              f"stage 2 (data.caption_field=txt) skips the uncaptioned ones")


if __name__ == "__main__":
    main()
