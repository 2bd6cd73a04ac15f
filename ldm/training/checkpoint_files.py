"""Checkpoint files: listing, resume resolution, manifest + verification, atomic writes and rotation.
What a checkpoint holds and how it is gathered and restored is ldm/training/checkpoint.py.

A checkpoint is used only after its manifest (sizes, CRC-32 checksums) and its file formats verify;
`latest` falls back to the newest checkpoint that does, naming the bad ones. A checkpoint is assembled
in `step_….tmp/` and renamed into place only when complete; re-saving an existing step first renames the
old copy to `step_….old/`, so at every moment one complete copy exists under a name `list_checkpoints`
recognises. Each `state.json` records whether the run was healthy when it was written (ldm/training/guard.py):
rotation never deletes the newest healthy checkpoint.
"""
from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import zlib
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from ldm.errors import CheckpointError, CheckpointWriteError, os_reason

STEP_DIR = re.compile(r"^step_(\d{8})(\.old)?$")
MANIFEST = "manifest.json"
DCP_METADATA = ".metadata"  # torch.distributed.checkpoint's index of a sharded checkpoint's `*.distcp` files


def _main_process() -> bool:
    """Rank 0 (or no process group): the one that prints warnings."""
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def _say(message: str) -> None:
    if _main_process():
        print(message, flush=True)


# ------------------------------------------------------------------------------------- listing / resume
def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints (state.json present), oldest first. `step_X.old` stands in for `step_X` when a
    re-save of step X was interrupted between its two renames."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    by_step: dict[int, Path] = {}
    for p in root.iterdir():
        m = STEP_DIR.match(p.name)
        if m and (p / "state.json").is_file() and (int(m[1]) not in by_step or m[2] is None):
            by_step[int(m[1])] = p
    return [by_step[s] for s in sorted(by_step)]


def resolve_resume(resume: str, run_dir: str | Path) -> Path | None:
    """`never` -> None; `latest` -> newest checkpoint that verifies (warning about newer bad ones), None
    when there is none at all; else a path that must exist and verify (never a silent fallback)."""
    if resume == "never":
        return None
    if resume == "latest":
        checkpoints, bad = list_checkpoints(run_dir), []
        for path in reversed(checkpoints):
            try:
                verify_checkpoint(path)
            except CheckpointError as e:
                _say(f"[ldm] WARNING: not resuming from {path}: {e}")
                bad.append(path.name)
                continue
            if bad:
                _say(f"[ldm] WARNING: resuming from {path}, the newest checkpoint that verifies "
                     f"(skipped {', '.join(bad)}; they stay on disk for inspection)")
            return path
        if checkpoints:  # never restart from step 0 behind the user's back
            raise CheckpointError(f"no checkpoint in {Path(run_dir) / 'checkpoints'} verifies ({', '.join(bad)}; "
                                  f"reasons above); nothing was loaded: move them aside, or start over with "
                                  f"trainer.resume=never")
        return None
    path = Path(resume)
    if not (path / "state.json").is_file():
        raise FileNotFoundError(f"trainer.resume={resume}: no complete checkpoint there (state.json missing); "
                                f"use trainer.resume=latest or trainer.resume=never")
    try:
        verify_checkpoint(path)
    except CheckpointError as e:
        raise CheckpointError(f"trainer.resume={resume} names a checkpoint that does not verify: {e}. It was "
                              f"named explicitly, so no other checkpoint is tried; use trainer.resume=latest to "
                              f"fall back to the newest good one") from None
    return path


# ---------------------------------------------------------------------------------- manifest / verify
def file_checksum(path: Path) -> str:
    """CRC-32 of a file (zlib, ~1.8 GB/s here): catches flipped, truncated or zeroed bytes, cheaply."""
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(16 << 20):
            crc = zlib.crc32(chunk, crc)
    return f"{crc:08x}"


def _write_json(path: Path, value: dict) -> None:
    tmp = path.with_name(path.name + ".part")
    tmp.write_text(json.dumps(value, indent=1))
    os.replace(tmp, path)


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path} is unreadable or not JSON ({type(e).__name__}: {e})") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{path} is not a JSON object")
    return value


def write_manifest(directory: Path, step: int) -> None:
    """manifest.json: size and CRC-32 of every file in `directory` (except state.json, written after)."""
    files = {p.name: {"bytes": p.stat().st_size, "crc32": file_checksum(p)}
             for p in sorted(directory.iterdir()) if p.is_file() and p.name not in (MANIFEST, "state.json")}
    _write_json(directory / MANIFEST, {"step": step, "files": files})


def _safe_torch_load(path: Path, **kwargs) -> Any:
    """torch.load that can only build tensors and plain containers: a pickled object is refused, never run."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, **kwargs)
    except Exception as e:  # UnpicklingError (unsafe or broken pickle), zip errors, truncation, ...
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path} cannot be loaded safely ({type(e).__name__}: {first})") from None


def verify_checkpoint(path: str | Path) -> dict:
    """Raise CheckpointError naming the file unless the checkpoint at `path` is complete and intact:
    state.json and manifest.json parse and agree, every file has its recorded size and checksum, the
    safetensors headers parse and the .pt files load with weights_only=True. Returns state.json."""
    path = Path(path)
    state, manifest = _read_json(path / "state.json"), _read_json(path / MANIFEST)
    files = manifest.get("files")
    if not isinstance(files, dict) or not isinstance(state.get("step"), int) or manifest.get("step") != state["step"]:
        raise CheckpointError(f"{path / MANIFEST} does not describe step {state.get('step')} of state.json")
    world, fmt = state.get("world_size", 1), state.get("format", "full")
    required = {"full": ["model.safetensors", "training.pt"], "sharded": [DCP_METADATA, "training.pt"],
                "consolidated": ["model.safetensors"]}.get(fmt)
    if required is None:
        raise CheckpointError(f"{path / 'state.json'} names an unknown checkpoint format {fmt!r}")
    for name in [*required, *(f"rank_{r}.pt" for r in range(world) if fmt != "consolidated")]:
        if name not in files:
            raise CheckpointError(f"{path / MANIFEST} does not list {name}")
    for name, entry in files.items():
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"{f} is missing")
        if f.stat().st_size != entry["bytes"]:
            raise CheckpointError(f"{f} has {f.stat().st_size} bytes, the manifest says {entry['bytes']} "
                                  f"(truncated or overwritten)")
        if file_checksum(f) != entry["crc32"]:
            raise CheckpointError(f"{f} does not match its checksum (its bytes changed after it was written)")
    for name in files:
        f = path / name
        if name.endswith(".safetensors"):
            try:
                with safe_open(f, framework="pt") as handle:
                    handle.keys()
            except Exception as e:
                raise CheckpointError(f"{f} is not a valid safetensors file ({e})") from None
        elif name.endswith(".pt"):
            _safe_torch_load(f, mmap=True)  # mmap: the structure is checked, tensors stay on disk
        elif name == DCP_METADATA:
            read_dcp_metadata(path)
    return state


_PLAIN = {("builtins", n) for n in ("set", "frozenset", "list", "dict", "tuple", "object", "int", "float", "str",
                                   "bytes", "bool", "slice")} | {
    ("collections", "OrderedDict"), ("copyreg", "_reconstructor"), ("pathlib", "PosixPath"),
    ("pathlib", "PurePosixPath"), ("torch.serialization", "_get_layout")}  # (a layout by name, e.g. torch.strided)


class _MetadataUnpickler(pickle.Unpickler):
    """DCP's `.metadata` is a pickle: only its own record classes, torch sizes/dtypes and builtins may be built."""

    def find_class(self, module: str, name: str):
        if module.startswith("torch.distributed.checkpoint.") or (module, name) in _PLAIN or \
                (module == "torch" and (name == "Size" or isinstance(getattr(torch, name, None), torch.dtype))):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed in checkpoint metadata")


def read_dcp_metadata(path: Path):
    """The `.metadata` of a sharded checkpoint (tensor names, shapes, dtypes, which file holds each chunk),
    unpickled with an allow-list, so a planted object is refused instead of run."""
    f = Path(path) / DCP_METADATA
    try:
        with open(f, "rb") as handle:
            metadata = _MetadataUnpickler(handle).load()
    except Exception as e:
        raise CheckpointError(f"{f} cannot be loaded safely ({type(e).__name__}: {e})") from None
    from torch.distributed.checkpoint.metadata import Metadata

    if not isinstance(metadata, Metadata):
        raise CheckpointError(f"{f} is not a torch.distributed.checkpoint metadata file")
    return metadata


def _kept(run_dir: Path) -> str:
    names = [p.name for p in list_checkpoints(run_dir)]
    return f"the checkpoints on disk ({', '.join(names)}) are untouched" if names else "no earlier checkpoint exists"


@contextmanager
def _writing(tmp: Path, run_dir: Path, step: int):
    """Turn a failed write (disk full, permissions, torch's 'enforce fail at inline_container.cc') into
    one message naming the path and what was kept; the partial directory is removed to free the space."""
    try:
        yield
    except (OSError, RuntimeError, SafetensorError) as e:
        reason = os_reason(e, tmp)  # before the removal frees the space it may read off the filesystem
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointWriteError(f"could not write checkpoint step {step} into {tmp} ({reason}); "
                                   f"the partial copy was removed and {_kept(run_dir)}") from None


def _crash_point(name: str, step: int, rank: int) -> None:
    """Test hook: LDM_TEST_KILL=<name>:<step>:<rank> SIGKILLs this process here, so tests/test_faults.py can
    kill a real run at an exact moment of a save (a timer cannot hit a millisecond-long save)."""
    if os.environ.get("LDM_TEST_KILL") == f"{name}:{step}:{rank}":
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


def _swap_into_place(tmp: Path, final: Path, step: int = -1) -> None:
    """tmp -> final. An existing `final` is first renamed to `final.old`, deleted only once the new copy
    has its name: a kill between the renames leaves `.old`, which list_checkpoints accepts."""
    old = final.with_name(final.name + ".old")
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        _crash_point("swap", step, 0)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def is_healthy(path: Path) -> bool:
    """What state.json says about the run when `path` was written; checkpoints written before health was
    recorded count as healthy (they passed the non-finite checks of their time)."""
    try:
        return bool(json.loads((Path(path) / "state.json").read_text()).get("health", {}).get("healthy", True))
    except (OSError, ValueError, AttributeError):
        return False


def newest_healthy(run_dir: str | Path) -> Path | None:
    """The newest checkpoint that was written by a healthy run and still verifies."""
    for path in reversed(list_checkpoints(run_dir)):
        if is_healthy(path):
            try:
                verify_checkpoint(path)
            except CheckpointError:
                continue
            return path
    return None


def rotate_checkpoints(run_dir: Path, keep_last: int) -> None:
    """Keep the newest `keep_last` checkpoints (0 keeps all) and the newest healthy one, and drop leftovers
    of interrupted saves. Every checkpoint on disk has finite weights (saving refuses others), but finite
    weights can still be blown up: the newest healthy checkpoint is what a rewind or a stop message uses."""
    checkpoints = list_checkpoints(run_dir)
    healthy = next((p for p in reversed(checkpoints) if is_healthy(p)), None)
    for old in checkpoints[:-keep_last] if keep_last > 0 else []:
        if old != healthy:
            shutil.rmtree(old, ignore_errors=True)
    newest = int(STEP_DIR.match(checkpoints[-1].name)[1]) if checkpoints else -1
    for p in (Path(run_dir) / "checkpoints").iterdir():
        m = re.match(r"^step_(\d{8})\.(tmp|old)$", p.name)
        if m and int(m[1]) <= newest and p not in checkpoints:
            shutil.rmtree(p, ignore_errors=True)
