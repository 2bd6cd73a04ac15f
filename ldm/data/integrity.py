"""Checksums of the files runs hand to each other: CRC-32 (zlib, ~1.5 GB/s on one core here, 3x blake2b)
catches flipped, zeroed or truncated bytes, the damage storage does; it is no defence against a forger.

* Tensors: `tensors_checksum(state)` covers each tensor's name, dtype, shape and bytes, so it is independent
  of the file's layout and can be recomputed from what was loaded. Writers put it in the safetensors metadata
  (`TENSORS_CHECKSUM_KEY`); readers call `verify_tensors`, which accepts files without it (older or foreign
  files) and names the file on a mismatch.
* Latent-cache samples: `member_sums(sample)` is a JSON member beside the sample's other members; a reader
  checks it with `member_mismatches` before the sample's bytes are used (ldm/data/latent_cache.py).
"""
from __future__ import annotations

import json
import os
import zlib
from typing import Mapping

import torch

from ldm.errors import CheckpointError

TENSORS_CHECKSUM_KEY = "ldm_tensors_crc32"
SUMS_MEMBER = "crc32.json"  # a latent-cache sample's member holding the CRC-32 of each of its other members


def _tensor_bytes(tensor: torch.Tensor) -> memoryview:
    flat = tensor.detach().contiguous().reshape(-1)
    if flat.device.type != "cpu":
        flat = flat.cpu()
    return memoryview(flat.view(torch.uint8).numpy())  # no copy: zlib reads the tensor's own memory


def tensors_checksum(state: Mapping[str, torch.Tensor]) -> str:
    """CRC-32 of the lines `name|dtype|shape|CRC-32 of the tensor's bytes`, in name order. The tensors'
    CRCs run in threads (zlib releases the GIL), so a many-core host verifies at memory speed."""
    from concurrent.futures import ThreadPoolExecutor

    names = sorted(state)
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        crcs = pool.map(lambda name: zlib.crc32(_tensor_bytes(state[name])) if state[name].numel() else 0, names)
        lines = [f"{name}|{str(state[name].dtype).removeprefix('torch.')}|{tuple(state[name].shape)}|{crc:08x}"
                 for name, crc in zip(names, crcs)]
    return f"{zlib.crc32(chr(10).join(lines).encode()):08x}"


def with_checksum(state: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> dict[str, str]:
    """`metadata` plus the checksum of `state`, for `safetensors.torch.save_file`."""
    return {**(metadata or {}), TENSORS_CHECKSUM_KEY: tensors_checksum(state)}


def verify_tensors(path: str | os.PathLike, state: Mapping[str, torch.Tensor],
                   metadata: Mapping[str, str] | None) -> None:
    """Raise CheckpointError naming `path` when `state` (as read from it) does not match the checksum its
    metadata records. A file without one (older, or not written by ldm) passes unchecked."""
    recorded = (metadata or {}).get(TENSORS_CHECKSUM_KEY)
    if recorded is None:
        return
    actual = tensors_checksum(state)
    if actual != recorded:
        raise CheckpointError(f"{os.fspath(path)} is corrupt: its tensors do not match the checksum in its metadata "
                              f"(CRC-32 {actual}, recorded {recorded}); its bytes changed after it was written. "
                              "Nothing was loaded: restore or rewrite the file")


def safetensors_metadata(path: str | os.PathLike) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(os.fspath(path), framework="pt") as f:
        return f.metadata() or {}


def file_crc32(path: str | os.PathLike) -> str:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(16 << 20):
            crc = zlib.crc32(chunk, crc)
    return f"{crc:08x}"


# -------------------------------------------------------------------------------------- sample members
def member_sums(sample: Mapping[str, bytes]) -> bytes:
    """The SUMS_MEMBER of a sample: {member: CRC-32} of its members (not `__key__` and friends)."""
    sums = {k: f"{zlib.crc32(v):08x}" for k, v in sorted(sample.items()) if not k.startswith("__")}
    return json.dumps(sums, sort_keys=True).encode()


def member_mismatches(raw: Mapping[str, bytes]) -> str | None:
    """What is wrong with a sample read back against its SUMS_MEMBER, or None when every member matches."""
    if SUMS_MEMBER not in raw:
        return f"no {SUMS_MEMBER} member, so its bytes cannot be checked"
    try:
        sums = json.loads(raw[SUMS_MEMBER])
        if not isinstance(sums, dict):
            raise ValueError("not a JSON object")
    except ValueError as e:
        return f"its {SUMS_MEMBER} is unreadable ({e})"
    members = {k for k in raw if not k.startswith("__") and k != SUMS_MEMBER}
    if members != set(sums):
        return f"it has members {sorted(members)} but {SUMS_MEMBER} lists {sorted(sums)}"
    bad = [k for k in sorted(members) if f"{zlib.crc32(raw[k]):08x}" != sums[k]]
    if not bad:
        return None
    return f"{' and '.join(bad)} {'does' if len(bad) == 1 else 'do'} not match the CRC-32 recorded when it was written"
