"""Checkpoints: everything the next step needs, written atomically.

Layout of `<run_dir>/checkpoints/step_00001234/`:
  model.safetensors   trainable task state (frozen parts listed in `task.frozen_prefixes` are skipped)
  ema.safetensors     EMA weights, when the model keeps an EMA
  training.pt         optimizer states (keyed by parameter name) + LR-scheduler states
  rank_<r>.pt         per-rank RNG states (python, numpy, torch, cuda) and the data loader's position
  state.json          step, model name, model-config fingerprint, world size — written LAST

A checkpoint is assembled in `step_…tmp/` and renamed into place only when complete, so a process
killed mid-save never corrupts or shadows the previous one; `latest` only sees complete directories.

Weights and optimizer states are written whole (unsharded), gathered through torch's distributed
state-dict API, so the files are the same under `trainer.strategy=ddp` and `fsdp`: a run saved under one
resumes under the other, and on any number of processes. Saving and loading are collectives: every rank
calls them.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from safetensors.torch import load_file, save_file

STEP_DIR = re.compile(r"^step_(\d{8})$")


def config_fingerprint(model_cfg: dict) -> str:
    """Hash of the model config: a checkpoint only loads into the preset that wrote it."""
    blob = json.dumps(model_cfg, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    done = [p for p in root.iterdir() if STEP_DIR.match(p.name) and (p / "state.json").is_file()]
    return sorted(done, key=lambda p: p.name)


def resolve_resume(resume: str, run_dir: str | Path) -> Path | None:
    """`never` -> None; `latest` -> newest complete checkpoint or None; else a path that must exist."""
    if resume == "never":
        return None
    if resume == "latest":
        ckpts = list_checkpoints(run_dir)
        return ckpts[-1] if ckpts else None
    path = Path(resume)
    if not (path / "state.json").is_file():
        raise FileNotFoundError(f"trainer.resume={resume}: no complete checkpoint there (state.json missing); "
                                f"use trainer.resume=latest or trainer.resume=never")
    return path


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _full_options(cpu_offload: bool = False, strict: bool = True):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    # full_state_dict gathers FSDP shards (rank 0 keeps them with cpu_offload); without a process group
    # torch needs it off (nothing is sharded then anyway).
    if _distributed():
        return StateDictOptions(full_state_dict=True, cpu_offload=cpu_offload, strict=strict)
    return StateDictOptions(strict=strict)


def _task_state(task: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Trainable task state, whole and on CPU, on rank 0 (empty elsewhere under torch.distributed)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    skip = tuple(getattr(task, "frozen_prefixes", ()))
    state = get_model_state_dict(task, options=_full_options(cpu_offload=True))
    return {k: v.detach().contiguous().cpu().clone() for k, v in state.items() if not (skip and k.startswith(skip))}


def _optimizer_states(task, optimizers: dict) -> dict:
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return {k: get_optimizer_state_dict(task, o, options=_full_options(cpu_offload=True)) for k, o in optimizers.items()}


def _load_task_state(task, weights: dict[str, torch.Tensor]) -> None:
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    set_model_state_dict(task, weights, options=_full_options(strict=False))


def _load_optimizer_state(task, optimizer, state: dict) -> None:
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    if state.get("state") and all(isinstance(k, int) for k in state["state"]):
        optimizer.load_state_dict(state)  # written before optimizer states were keyed by parameter name
        return
    set_optimizer_state_dict(task, optimizer, state, options=_full_options())


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(run_dir: str | Path, step: int, *, task, optimizers: dict, schedulers: dict, ema,
                    loader, meta: dict, rank: int, world_size: int, barrier: Callable[[], None],
                    keep_last: int) -> Path:
    root = Path(run_dir) / "checkpoints"
    final = root / f"step_{step:08d}"
    tmp = root / f"step_{step:08d}.tmp"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    torch.save({"rng": rng_state(), "data": loader.state_dict()}, tmp / f"rank_{rank}.pt")
    model_state, optimizer_states = _task_state(task), _optimizer_states(task, optimizers)  # collectives
    ema_state = ema.state_dict() if ema is not None else None  # gathers FSDP shards: every rank
    barrier()
    if rank == 0:
        save_file(model_state, tmp / "model.safetensors")
        if ema_state is not None:
            save_file({k: v.contiguous() for k, v in ema_state.items()}, tmp / "ema.safetensors")
        torch.save({"optimizers": optimizer_states,
                    "schedulers": {k: s.state_dict() for k, s in schedulers.items()}}, tmp / "training.pt")
        (tmp / "state.json").write_text(json.dumps({"step": step, "world_size": world_size, **meta}, indent=1))
        if final.exists():  # re-saving the same step (e.g. end of a resumed, finished run)
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in list_checkpoints(run_dir)[:-keep_last] if keep_last > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def check_task_weights(task, weights: dict[str, torch.Tensor], path: Path) -> None:
    """Raise (before anything is loaded) unless `weights` has exactly the task's trainable names and shapes."""
    skip = tuple(getattr(task, "frozen_prefixes", ()))
    expected = {k: v.shape for k, v in task.state_dict().items() if not (skip and k.startswith(skip))}
    mismatched = sorted(k for k in set(expected) & set(weights)  # (_extra_state: tokenizer bytes, any length)
                        if weights[k].shape != expected[k] and not k.endswith("_extra_state"))
    if set(weights) != set(expected) or mismatched:
        raise ValueError(f"checkpoint {path} was written by another model configuration "
                         f"(missing {sorted(set(expected) - set(weights))[:5]}, unexpected "
                         f"{sorted(set(weights) - set(expected))[:5]}, other shapes {mismatched[:5]}); nothing "
                         f"was loaded: use another run_dir or trainer.resume=never")


def load_checkpoint(path: str | Path, *, task, optimizers: dict, schedulers: dict, ema, loader,
                    meta: dict, rank: int, world_size: int) -> int:
    """Restore everything saved by `save_checkpoint`; returns the step. Nothing is loaded when the
    checkpoint belongs to another model preset (checked before any tensor is touched)."""
    path = Path(path)
    state = json.loads((path / "state.json").read_text())
    if state.get("model") != meta.get("model"):
        raise ValueError(f"checkpoint {path} belongs to another model preset ('{state.get('model')}', this run is "
                         f"'{meta.get('model')}'); use another run_dir or trainer.resume=never")
    weights = load_file(path / "model.safetensors")
    check_task_weights(task, weights, path)
    if state.get("fingerprint") != meta.get("fingerprint") and rank == 0:
        print(f"[ldm] note: the model config changed since {path.name} (e.g. a loss weight or learning rate); "
              f"the architecture matches, resuming with the new settings")
    _load_task_state(task, weights)
    if ema is not None:
        ema.load_state_dict(load_file(path / "ema.safetensors"))
    training = torch.load(path / "training.pt", map_location="cpu", weights_only=False)
    for k, o in optimizers.items():
        _load_optimizer_state(task, o, training["optimizers"][k])
    for k, s in schedulers.items():
        s.load_state_dict(training["schedulers"][k])
    rank_file = path / f"rank_{rank}.pt"
    if state["world_size"] == world_size and rank_file.is_file():
        per_rank = torch.load(rank_file, map_location="cpu", weights_only=False)
        set_rng_state(per_rank["rng"])
        try:
            loader.load_state_dict(per_rank["data"])
        except ValueError as e:  # e.g. data.num_workers changed: exact position impossible
            print(f"[ldm] rank {rank}: cannot restore the exact data position ({e}); restarting its epoch")
            loader.load_state_dict(per_rank["data"], strict=False)
    elif rank == 0:
        print(f"[ldm] resuming {path} written by {state['world_size']} processes on {world_size}: "
              f"weights and optimizer restored; data position and RNG start fresh")
    return int(state["step"])
