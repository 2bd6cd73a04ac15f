"""The latent cache: stage-2 training shards encoded once by the frozen first stage (and, when the
conditioner is frozen, by the text encoder), so stage 2 trains without running either
(`data.latents=DIR`; written by `python train/cache_latents.py`, docs/training.md).

Layout of DIR: `latents-%06d.tar`, one per source shard (the i-th source shard of `data.shards`), each
sample holding the source's non-image members unchanged (`KEY.txt`, `KEY.json`, ...) plus float32 `.npy`:
`KEY.mean.npy` and `KEY.logvar.npy`, the KL posterior N(mean, exp(logvar)) of the first stage, unscaled
(a VQ first stage: its deterministic pre-quantisation latent as `mean.npy`, no `logvar.npy`), and
`KEY.context.npy`, the frozen conditioner's tokens `(M, d)` for the caption. float32, so a cached step trains
on the values online encoding computes (tests/test_cache.py checks the loss to 1e-5), and it is cheap: at f=8
mean + log-variance are 1/24 of the pixel count, H·W/2 bytes, about what a JPEG of the image takes. (fp16
would halve that; its rounding of the demo autoencoder's mean is a median 2e-4 of the posterior std.)
Each sample also holds `KEY.crc32.json`, the CRC-32 of each of its other members: the training loader checks
it before a sample is used, and skips a sample whose bytes changed (counted as `checksum_error`, logged as
`data/skipped_checksum_error`, with a warning naming the shard and key), so a damaged cache never trains
silently. `latents-%06d.json` records each finished shard (with the CRC-32 of the whole tar, which a rebuild
checks before it keeps a shard); `cache.json` (written when every shard is there) holds the key, the sources
and the counts.

The key is a hash of what produced the cached values: the weights of the first stage's encoder and
quant_conv (not the file bytes: a decoder-only fine-tune or the same weights in another format leave the
latents unchanged), the image transform (size, centre crop, no flip), which samples are kept (caption and
label fields), the frozen conditioner's config and weights when its context is cached, and the format
version. A training run recomputes it and refuses a cache that differs, naming what changed.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf
from torch import nn

from ldm.data.decode import SampleDecoder, SkipSample
from ldm.data.integrity import member_mismatches
from ldm.errors import CacheError

CACHE_VERSION = 2  # 2: per-sample CRC-32 member; version-1 caches are refused as stale (rebuild)
MANIFEST = "cache.json"
SHARD_NAME = "latents-{:06d}.tar"
ENCODER_PREFIXES = ("encoder.", "quant_conv.")  # the first-stage weights that compute the posterior
# sample member -> batch key
MEMBERS = {"mean.npy": "latent_mean", "logvar.npy": "latent_logvar", "context.npy": "context"}
REBUILD = "rebuild it with `python train/cache_latents.py <the training overrides> --out DIR` (docs/training.md)"


# ------------------------------------------------------------------------------------------------- key
def weights_hash(module: nn.Module, prefixes: tuple[str, ...] = ()) -> str:
    """SHA-256 of the named tensors of `module.state_dict()` (those under `prefixes`, or all): names,
    dtypes, shapes and bytes, in sorted order. Independent of device and file format."""
    digest = hashlib.sha256()
    state = module.state_dict()
    for name in sorted(state):
        if prefixes and not name.startswith(prefixes):
            continue
        tensor = state[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def pixel_conditioner(conditioner: nn.Module) -> str | None:
    """Name of a part of `conditioner` (ldm.modules.conditioning.Conditioner) that reads the images (super-resolution, inpainting): the cache holds
    none, so such a model cannot train from it."""
    return next((type(m).__name__ for m in conditioner.parts() if m.image_key is not None), None)


def caches_context(conditioner: nn.Module) -> bool:
    """A frozen token conditioner (e.g. SD's CLIP): its output for a caption never changes, so it is
    cached. A jointly trained one (the paper's transformer, the demo's) runs in every step."""
    params = list(conditioner.parameters())
    tokens_only = conditioner.concat_channels == 0 and conditioner.context_dim is not None
    return bool(params) and not any(p.requires_grad for p in params) and tokens_only


def cache_key_parts(cfg, first_stage: nn.Module, conditioner: nn.Module) -> dict:
    """What the cached values depend on, from the current config and weights (see the module doc)."""
    d = cfg.data
    context = None
    if caches_context(conditioner):
        context = {"config": OmegaConf.to_container(cfg.model.task.conditioner, resolve=True),
                   "weights": weights_hash(conditioner)}
    return {"version": CACHE_VERSION,
            "first_stage": weights_hash(first_stage, ENCODER_PREFIXES),
            "image_size": d.image_size, "crop": "center", "flip": False,  # ldm/data/decode.py's transform
            "buckets": cache_buckets(cfg),
            "caption_field": d.caption_field, "label_field": d.label_field,
            "context": context}


def cache_buckets(cfg) -> list[list[int]] | None:
    """The bucket shapes the cache's images are resized to (`data.buckets`), None for square crops."""
    from ldm.data.buckets import parse_buckets

    d = cfg.data
    shapes = parse_buckets(d.get("buckets"), d.image_size, d.get("bucket_step", 64), d.get("bucket_max_ratio", 2.0))
    return None if shapes is None else [list(s) for s in shapes]


def cache_key(parts: dict) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def source_urls(shards) -> list[str]:
    """The source shards as the cache names them: resolved absolute paths (remote urls unchanged)."""
    from ldm.data.webdataset import _REMOTE_URL, expand_urls

    return [u if _REMOTE_URL.match(u) else os.path.realpath(u) for u in expand_urls(shards)]


def _mismatches(saved: dict, now: dict, cfg) -> list[str]:
    said = []
    if saved.get("version") != now["version"]:
        return [f"it has format version {saved.get('version')}, this ldm reads version {now['version']}"]
    if saved.get("first_stage") != now["first_stage"]:
        said.append(f"the first stage's encoder weights differ from the ones it was encoded with "
                    f"(model.first_stage.ckpt={cfg.model.first_stage.ckpt})")
    for key in ("image_size", "crop", "flip", "buckets", "caption_field", "label_field"):
        if saved.get(key) != now[key]:
            said.append(f"data.{key} is {now[key]!r} but the cache was built with {saved.get(key)!r}")
    old, new = saved.get("context"), now["context"]
    if old is None and new is not None:
        said.append("model.task.conditioner is frozen now, but the cache holds no context for it")
    elif old is not None and new is None:
        said.append("the cache holds a frozen conditioner's context, but model.task.conditioner is trainable "
                    "or produces no tokens now")
    elif old is not None and old != new:
        what = "config" if old.get("config") != new["config"] else "weights"
        said.append(f"model.task.conditioner's {what} changed since its context was cached")
    return said


# -------------------------------------------------------------------------------------------- manifest
def read_manifest(directory: str | os.PathLike) -> dict:
    """cache.json of a complete cache whose shards are all there at their recorded sizes; a CacheError
    naming the directory and what is wrong otherwise."""
    directory = Path(directory)
    where = f"data.latents={directory}"
    if not directory.is_dir():
        raise CacheError(f"{where}: no such directory; {REBUILD}")
    path = directory / MANIFEST
    if not path.is_file():
        raise CacheError(f"{where} has no {MANIFEST}: the cache is incomplete (a build that is still running or was "
                         f"interrupted: rerun it, it resumes) or not a latent cache; {REBUILD}")
    try:
        manifest = json.loads(path.read_text())
        shards = manifest["shards"]
        files = [(directory / s["file"], int(s["bytes"])) for s in shards]
        outside = [s["file"] for s in shards if Path(s["file"]).name != s["file"]]
        if outside:
            raise ValueError(f"shard names must be file names in the directory, got {outside[0]!r}")
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as e:
        raise CacheError(f"{path} is corrupt ({type(e).__name__}: {e}); {REBUILD}") from None
    for file, size in files:
        actual = file.stat().st_size if file.is_file() else None
        if actual != size:
            state = "is missing" if actual is None else f"has {actual} bytes, {MANIFEST} says {size}"
            raise CacheError(f"{where}: {file.name} {state}: the cache is corrupt; {REBUILD}")
    return manifest


def cache_shards(directory: str | os.PathLike) -> list[str]:
    """The cache's shard files, in source order (what the training loader reads)."""
    return [str(Path(directory) / s["file"]) for s in read_manifest(directory)["shards"]]


def check_cache(cfg, task: nn.Module) -> dict:
    """Refuse `data.latents` unless it was built from `data.shards` with the current first stage,
    transform and (frozen) conditioner: one CacheError sentence naming every mismatch."""
    where = f"data.latents={cfg.data.latents}"
    if not task.trains_on_latents:
        raise CacheError(f"{where}: a latent cache feeds stage 2; model={cfg.model.name} trains on pixels "
                         f"(drop data.latents)")
    pixels = pixel_conditioner(task.conditioner)
    if pixels:
        raise CacheError(f"{where}: the conditioner {pixels} reads the images, which the cache does not hold; "
                         f"train model={cfg.model.name} from the image shards (drop data.latents)")
    manifest = read_manifest(cfg.data.latents)
    said = _mismatches(manifest.get("parts", {}), cache_key_parts(cfg, task.first_stage, task.conditioner), cfg)
    sources = source_urls(cfg.data.shards)
    if manifest.get("sources") != sources:
        said.append(f"data.shards names {len(sources)} shard(s) ({sources[0]}, ...) but the cache was built from "
                    f"{len(manifest.get('sources', []))} ({(manifest.get('sources') or ['none'])[0]}, ...)")
    if said:
        raise CacheError(f"{where} is stale: {'; '.join(said)}; {REBUILD}")
    return manifest


# -------------------------------------------------------------------------------------------- samples
def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array, dtype=np.float32), allow_pickle=False)
    return buffer.getvalue()


def _npy_tensor(data: bytes, member: str) -> torch.Tensor:
    try:
        array = np.load(io.BytesIO(data), allow_pickle=False)  # never unpickles: a shard cannot run code
    except (ValueError, OSError, EOFError) as e:
        raise SkipSample("decode_error", f"{member} is not a .npy array: {e}") from None
    return torch.from_numpy(array)


@dataclasses.dataclass(frozen=True)
class LatentSampleDecoder(SampleDecoder):
    """A cache sample -> {key, meta, caption[, label], latent_mean[, latent_logvar][, context]}: the batch
    contract with the cached tensors in place of `image`. The other fields are assembled by
    `SampleDecoder.__call__`, the same code as for the image shards."""

    def content_member(self, raw: dict) -> str:
        if "mean.npy" not in raw:
            have = sorted(k for k in raw if not k.startswith("__"))
            raise SkipSample("missing_image", f"no mean.npy entry: not a latent-cache sample (has {have})")
        damage = member_mismatches(raw)  # before any byte is used: a flipped exponent trains as 1e38
        if damage is not None:
            raise SkipSample("checksum_error", f"{damage}; the cache is damaged: {REBUILD}")
        return "mean.npy"

    def content(self, raw: dict, member: str) -> dict:
        return {name: _npy_tensor(raw[m], m) for m, name in MEMBERS.items() if m in raw}
