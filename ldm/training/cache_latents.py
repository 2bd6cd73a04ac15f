"""Encode stage 2's training shards ONCE with the frozen first stage into a latent cache, which
`train/main.py … data.latents=DIR` trains from without running the encoder (ldm/data/latent_cache.py has
the format, docs/training.md the workflow):

    python train/cache_latents.py <the train/main.py overrides> --out DIR
    torchrun --nproc_per_node 2 train/cache_latents.py <overrides> --out DIR    # per rank (RANK, WORLD_SIZE)
    python train/cache_latents.py <overrides> --out DIR --rank 1 --world 4     # or by hand, on any machine
                                                                              # that sees DIR

`--out` defaults to `data.latents`, so the training overrides build their own cache. Source shard i goes to
rank i % world; the ranks never talk to each other. Each output shard is written to a temporary name and
renamed, then recorded (`latents-%06d.json`); a rerun skips recorded shards, and whichever rank finds every
shard recorded writes `cache.json`. Bad samples are skipped and counted as the training loader does.
"""
from __future__ import annotations

import glob
import json
import os
import time
from pathlib import Path

import torch
import webdataset as wds
from torch import nn

from ldm.data.decode import IMAGE_EXTENSIONS, SKIP_KINDS, SampleDecoder
from ldm.data.integrity import SUMS_MEMBER, file_crc32, member_sums
from ldm.data.latent_cache import (CACHE_VERSION, MANIFEST, SHARD_NAME, cache_buckets, cache_key, cache_key_parts,
                                   caches_context, npy_bytes, pixel_conditioner, source_urls)
from ldm.data.webdataset import build_loader
from ldm.errors import CacheError, write_error_message
from ldm.models.autoencoder import AutoencoderKL
from ldm.training.progress import Ticker


class KeepMembers(SampleDecoder):
    """The loader's decoder (same transform, same skips) that also hands on the sample's other members
    (`txt`, `json`, ...) unchanged, for the cache shard."""

    def __call__(self, raw: dict) -> dict:
        sample = super().__call__(raw)
        sample["members"] = {k: v for k, v in raw.items() if not k.startswith("__") and k not in IMAGE_EXTENSIONS}
        return sample


def load_frozen_parts(cfg) -> tuple[nn.Module, nn.Module]:
    """The first stage and the conditioner of `cfg.model.task`, without building the UNet."""
    from hydra.utils import instantiate

    from ldm.convert import load_autoencoder

    if cfg.model.get("first_stage") is None:
        raise CacheError(f"model={cfg.model.name} has no first stage: the latent cache is for stage-2 models")
    first_stage = load_autoencoder(cfg.model.first_stage.ckpt).requires_grad_(False)
    conditioner = instantiate(cfg.model.task.conditioner)
    if not isinstance(conditioner, nn.Module):  # a partial that takes the first stage (inpainting)
        conditioner = conditioner(first_stage=first_stage)
    pixels = pixel_conditioner(conditioner)
    if pixels:
        raise CacheError(f"model={cfg.model.name}: its conditioner {pixels} reads the images, which a latent cache "
                         "does not hold; train it from the image shards")
    return first_stage, conditioner.eval()


RESUME = "rerun the same command to resume once there is room"


def _write_json(path: Path, value: dict) -> None:
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(value, indent=1))
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise CacheError(write_error_message(e, tmp, f"the shards recorded so far are kept: {RESUME}")) from None


def _record(out: Path, index: int) -> dict | None:
    try:
        return json.loads((out / SHARD_NAME.format(index).replace(".tar", ".json")).read_text())
    except (OSError, ValueError):
        return None


def _done(out: Path, index: int, key: str, source: str, verify: bool = False) -> bool:
    """The shard's record is there, for this key and source, and its tar has the recorded size (and, with
    `verify`, the recorded CRC-32: a rebuild re-encodes a damaged shard instead of keeping it)."""
    record, tar = _record(out, index), out / SHARD_NAME.format(index)
    done = (record is not None and record.get("key") == key and record.get("source") == source
            and tar.is_file() and tar.stat().st_size == record.get("bytes"))
    return done and (not verify or file_crc32(tar) == record.get("crc32"))


@torch.no_grad()
def encode_shard(source: str, target: Path, cfg, first_stage, conditioner, with_context: bool, device,
                 batch_size: int) -> dict:
    """One source shard -> one cache shard (written to a temporary name, then renamed); its counts."""
    d = cfg.data
    buckets = cache_buckets(cfg)
    decoder = KeepMembers(d.image_size, d.caption_field, d.label_field,
                          buckets=None if buckets is None else tuple(map(tuple, buckets)))
    # With buckets the images have several shapes: the loader hands them one by one, regrouped by shape below.
    loader = build_loader([source], batch_size=1 if buckets else batch_size, image_size=d.image_size, num_workers=1,
                          epochs=1, caption_field=d.caption_field, label_field=d.label_field, shuffle_buffer=0,
                          decoder=decoder)
    for stale in glob.glob(f"{target}.*.tmp"):  # left by an interrupted build of this shard
        os.remove(stale)
    tmp = Path(f"{target}.{os.getpid()}.tmp")
    try:
        count = _write_shard(tmp, same_shape_batches(loader, batch_size), first_stage, conditioner, with_context,
                             device)
        os.replace(tmp, target)
    except OSError as e:  # disk full, quota, read-only: the OS's reason and the path, the partial shard removed
        tmp.unlink(missing_ok=True)
        raise CacheError(write_error_message(e, tmp, f"the shards recorded so far are kept: {RESUME}")) from None
    return {"count": count, "skipped": loader.skipped, "bytes": target.stat().st_size, "crc32": file_crc32(target)}


def same_shape_batches(loader, batch_size: int):
    """The loader's batches regrouped into batches of one image shape, up to `batch_size` samples each (the
    last of each shape shorter), in the order their last sample came."""
    groups: dict[tuple, list[dict]] = {}
    for batch in loader:
        group = groups.setdefault(tuple(batch["image"].shape[1:]), [])
        group.append({k: v for k, v in batch.items() if not k.startswith("__")})
        if sum(len(b["key"]) for b in group) >= batch_size:
            yield _concat(groups.pop(tuple(batch["image"].shape[1:])))
    for group in groups.values():
        yield _concat(group)


def _concat(batches: list[dict]) -> dict:
    if len(batches) == 1:
        return batches[0]
    return {k: torch.cat([b[k] for b in batches]) if torch.is_tensor(v) else [x for b in batches for x in b[k]]
            for k, v in batches[0].items()}


def _write_shard(tmp: Path, loader, first_stage, conditioner, with_context: bool, device) -> int:
    count, ticker = 0, Ticker(f"latent cache {tmp.name}", "samples", every=30.0)
    with open(tmp, "wb") as stream, wds.TarWriter(stream, encoder=False, mtime=0.0) as sink:
        for batch in loader:
            ticker(len(batch["key"]))
            images = batch["image"].to(device)
            if isinstance(first_stage, AutoencoderKL):  # KL: keep the posterior, resampled at train time
                posterior = first_stage.posterior(images)
                moments = {"mean.npy": posterior.mean, "logvar.npy": posterior.logvar}
            else:  # VQ: the deterministic pre-quantisation latent
                moments = {"mean.npy": first_stage.encode_latent(images, sample=False)}
            if with_context:
                moments["context.npy"] = conditioner({k: v for k, v in batch.items() if k != "image"})["context"]
            arrays = {name: tensor.float().cpu().numpy() for name, tensor in moments.items()}
            for i, key in enumerate(batch["key"]):
                sample = {"__key__": key, **batch["members"][i]}
                sample.update({name: npy_bytes(array[i]) for name, array in arrays.items()})
                sample[SUMS_MEMBER] = member_sums(sample)  # checked by the training loader before use
                sink.write(sample)
                count += 1
    return count


def build_cache(cfg, out_dir: str | os.PathLike | None = None, rank: int | None = None, world: int | None = None,
                batch_size: int = 64, device: str | torch.device | None = None) -> dict | None:
    """Encode this rank's share of `cfg.data.shards` into `out_dir` (default `cfg.data.latents`).

    `cfg` is a composed train config (conf/train.yaml with the training overrides). rank/world default to
    the RANK/WORLD_SIZE environment (torchrun, accelerate launch), else 0/1. Returns cache.json's content
    when this call completed the cache, None when other ranks still have shards to write."""
    out = Path(out_dir or cfg.data.get("latents") or "")
    if not str(out) or str(out) == ".":
        raise CacheError("no output directory: pass --out DIR (or data.latents=DIR)")
    rank = int(os.environ.get("RANK", 0)) if rank is None else rank
    world = int(os.environ.get("WORLD_SIZE", 1)) if world is None else world
    if not 0 <= rank < world:
        raise CacheError(f"rank {rank} is outside world {world}")
    if device is None:
        local = int(os.environ.get("LOCAL_RANK", 0))
        device = torch.device(f"cuda:{local}") if torch.cuda.is_available() else torch.device("cpu")
    first_stage, conditioner = load_frozen_parts(cfg)
    first_stage, conditioner = first_stage.to(device), conditioner.to(device)
    with_context = caches_context(conditioner)
    parts = cache_key_parts(cfg, first_stage, conditioner)
    key = cache_key(parts)
    sources = source_urls(cfg.data.shards)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CacheError(write_error_message(e, out, "nothing was written")) from None
    manifest_path = out / MANIFEST
    if manifest_path.is_file():
        try:
            stale = json.loads(manifest_path.read_text()).get("key") != key
        except (OSError, ValueError):
            stale = True
        if stale:  # a cache of other weights / settings: no run may train from it while this one is built
            manifest_path.unlink(missing_ok=True)
    mine = [i for i in range(len(sources)) if i % world == rank]
    print(f"[ldm] latent cache {out}: rank {rank}/{world} encodes {len(mine)} of {len(sources)} shard(s) on {device}"
          + (", with the frozen conditioner's context" if with_context else ""), flush=True)
    for i in mine:
        if _done(out, i, key, sources[i], verify=True):
            continue
        start = time.perf_counter()
        target = out / SHARD_NAME.format(i)
        record = encode_shard(sources[i], target, cfg, first_stage, conditioner, with_context, device, batch_size)
        _write_json(out / target.name.replace(".tar", ".json"), {"key": key, "source": sources[i],
                                                                   "file": target.name, **record})
        skipped = {k: n for k, n in record["skipped"].items() if n}
        print(f"[ldm] {target.name}: {record['count']} samples from {sources[i]} in {time.perf_counter() - start:.1f} s"
              + (f", skipped {skipped}" if skipped else ""), flush=True)
    # Every rank wrote its records before looking: whichever looks last sees them all.
    if not all(_done(out, i, key, s) for i, s in enumerate(sources)):
        print(f"[ldm] rank {rank}: done; {MANIFEST} is written by the rank that finishes last", flush=True)
        return None
    records = [_record(out, i) for i in range(len(sources))]
    manifest = {"version": CACHE_VERSION, "key": key, "parts": parts, "dtype": "float32",
                "sources": sources, "count": sum(r["count"] for r in records),
                "skipped": {k: sum(r["skipped"].get(k, 0) for r in records) for k in SKIP_KINDS},
                "shards": [{k: r[k] for k in ("file", "source", "count", "bytes", "crc32", "skipped")}
                           for r in records]}
    _write_json(manifest_path, manifest)
    skipped = {k: n for k, n in manifest["skipped"].items() if n} or "none"
    print(f"[ldm] {manifest_path}: {manifest['count']} samples in {len(records)} shard(s), skipped {skipped}; "
          f"train with data.latents={out}", flush=True)
    return manifest
