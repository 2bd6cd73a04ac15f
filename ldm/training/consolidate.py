"""Sharded checkpoint -> the single files a full checkpoint has (`model.safetensors`, `ema.safetensors`), read
by sampling, evaluation and export (ldm/training/runs.py). One process, no process group: DCP reads every
rank's chunks of the weights and the EMA, and nothing else (the optimizer states, the largest part, stay on
disk). `python train/consolidate.py` writes them once, as a weights-only checkpoint directory
(`"format": "consolidated"` in its state.json: it samples and exports, but does not resume a run).
"""
from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path

import torch
from safetensors.torch import save_file

from ldm.errors import CheckpointError, CheckpointWriteError, os_reason
from ldm.training.checkpoint_files import _write_json, read_dcp_metadata, verify_checkpoint, write_manifest


# One process without a process group is a normal case here (a 1-process run, consolidation), not a mistake
warnings.filterwarnings("ignore", message="torch.distributed is (disabled|unavailable)")

def checkpoint_format(path: str | Path) -> str:
    try:
        return json.loads((Path(path) / "state.json").read_text()).get("format", "full")
    except (OSError, ValueError, AttributeError):
        return "full"  # verify_checkpoint names what is wrong with it


def read_sharded_weights(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None]:
    """(model weights, EMA state or None) of the sharded checkpoint at `path`, whole, on the CPU, with the
    keys of a full checkpoint's model.safetensors / ema.safetensors."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    path = Path(path)
    index = read_dcp_metadata(path).state_dict_metadata
    target: dict[str, dict[str, torch.Tensor]] = {"model": {}, "ema": {}}
    for key, meta in index.items():
        group, _, name = key.partition(".")
        if group in target:
            if not isinstance(meta, TensorStorageMetadata):
                raise CheckpointError(f"{path}: {key} is not a tensor")
            target[group][name] = torch.empty(meta.size, dtype=meta.properties.dtype)
    if not target["ema"]:
        del target["ema"]
    try:
        dcp.load(target, checkpoint_id=path, no_dist=True)
    except BaseException as e:  # DCP's CheckpointException is a BaseException
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            raise
        raise CheckpointError(f"{path}: its shards cannot be read ({type(e).__name__}: {e})") from None
    return target["model"], target.get("ema")


def consolidate(checkpoint: str | Path, out: str | Path) -> Path:
    """Write the weights (and EMA) of a verified sharded checkpoint to `out`, a new checkpoint directory
    with model.safetensors, ema.safetensors, manifest.json and state.json; nothing is left on failure."""
    checkpoint, out = Path(checkpoint), Path(out)
    state = verify_checkpoint(checkpoint)
    if state.get("format", "full") != "sharded":
        raise ValueError(f"{checkpoint} is a {state.get('format', 'full')} checkpoint: its model.safetensors is "
                         f"already one file (sample, evaluate or export it directly)")
    if out.exists():
        raise FileExistsError(f"{out} exists; choose a new output folder with --out (nothing was written)")
    weights, ema = read_sharded_weights(checkpoint)
    tmp = out.with_name(out.name + ".tmp")
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_file({k: v.contiguous() for k, v in weights.items()}, tmp / "model.safetensors")
        if ema is not None:
            save_file({k: v.contiguous() for k, v in ema.items()}, tmp / "ema.safetensors")
        write_manifest(tmp, state["step"])
        _write_json(tmp / "state.json", {**state, "format": "consolidated", "world_size": 1,
                                         "consolidated_from": str(checkpoint)})
        os.replace(tmp, out)
    except OSError as e:
        reason = os_reason(e, tmp)
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointWriteError(f"could not write {out} ({reason}); nothing was left behind") from None
    return out
