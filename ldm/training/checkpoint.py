"""Checkpoints: everything the next step needs, written atomically, verified before use, loaded safely.

Layout of `<run_dir>/checkpoints/step_00001234/`:
  model.safetensors   trainable task state (frozen parts listed in `task.frozen_prefixes` are skipped)
  ema.safetensors     EMA weights, when the model keeps an EMA
  training.pt         optimizer states (keyed by parameter name) + LR-scheduler states
  rank_<r>.pt         per-rank RNG states (python, numpy, torch, cuda) and the data position of the rank's
                      lanes (merged from all ranks on resume, so another process count continues the order)
  manifest.json       step, and size + CRC-32 of every file above
  state.json          step, model name, model-config fingerprint, world size — written LAST

Safety: tensors come from safetensors; the two `.pt` files hold only tensors, numbers, strings, lists
and dicts, and are read with `torch.load(weights_only=True)`, which refuses any pickled object that
could run code. Integrity: a checkpoint is used only after its manifest (sizes, checksums) and its
file formats verify; `latest` falls back to the newest checkpoint that does, naming the bad ones.

Atomicity: a checkpoint is assembled in `step_….tmp/` and renamed into place only when complete.
Re-saving an existing step first renames the old copy to `step_….old/`, so at every moment one
complete copy exists under a name `list_checkpoints` recognises.

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
import zlib
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from ldm.errors import CheckpointError, CheckpointWriteError, NonFiniteError

STEP_DIR = re.compile(r"^step_(\d{8})(\.old)?$")
MANIFEST = "manifest.json"
OPTIMIZER_KEYS = ("lr", "betas", "weight_decay", "eps")  # the config's settings that override a loaded state


def config_fingerprint(model_cfg: dict) -> str:
    """Hash of the model config: a checkpoint only loads into the preset that wrote it."""
    blob = json.dumps(model_cfg, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


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


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _any_rank(flag: bool) -> bool:
    if not _distributed():
        return flag
    device = "cuda" if torch.distributed.get_backend() == "nccl" else "cpu"
    t = torch.tensor([int(flag)], device=device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return bool(t.item())


def _full_options(cpu_offload: bool = False, strict: bool = True):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    # full_state_dict gathers FSDP shards (rank 0 keeps them with cpu_offload); without a process group
    # torch needs it off (nothing is sharded then anyway).
    if _distributed():
        return StateDictOptions(full_state_dict=True, cpu_offload=cpu_offload, strict=strict)
    return StateDictOptions(strict=strict)


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
    world = state.get("world_size", 1)
    for name in ["model.safetensors", "training.pt", *(f"rank_{r}.pt" for r in range(world))]:
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
    return state


# ------------------------------------------------------------------------------------------ RNG state
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
    """RNG states as tensors, numbers and tuples only (loadable with weights_only=True)."""
    kind, key, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(), "numpy": (kind, key.tolist(), pos, has_gauss, gauss),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    kind, key, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.asarray(key, dtype=np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --------------------------------------------------------------------------------------------- saving
def non_finite_tensors(*state_dicts: dict[str, torch.Tensor]) -> list[str]:
    """Names of floating-point tensors holding a NaN or an Inf."""
    return [k for sd in state_dicts for k, v in sd.items()
            if torch.is_tensor(v) and v.is_floating_point() and not bool(torch.isfinite(v).all())]


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
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointWriteError(f"could not write checkpoint step {step} into {tmp} "
                                   f"({type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else e}); "
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


def rotate_checkpoints(run_dir: Path, keep_last: int) -> None:
    """Keep the newest `keep_last` checkpoints (0 keeps all) and drop leftovers of interrupted saves.
    Every checkpoint on disk has finite weights (save_checkpoint refuses others), so the newest finite
    one is always kept."""
    checkpoints = list_checkpoints(run_dir)
    for old in checkpoints[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    newest = int(STEP_DIR.match(checkpoints[-1].name)[1]) if checkpoints else -1
    for p in (Path(run_dir) / "checkpoints").iterdir():
        m = re.match(r"^step_(\d{8})\.(tmp|old)$", p.name)
        if m and int(m[1]) <= newest and p not in checkpoints:
            shutil.rmtree(p, ignore_errors=True)


def save_checkpoint(run_dir: str | Path, step: int, *, task, optimizers: dict, schedulers: dict, ema,
                    loader, meta: dict, rank: int, world_size: int, barrier: Callable[[], None],
                    keep_last: int) -> Path:
    run_dir = Path(run_dir)
    root = run_dir / "checkpoints"
    final = root / f"step_{step:08d}"
    tmp = root / f"step_{step:08d}.tmp"
    # Gathered on every rank (FSDP collectives); rank 0 holds the whole tensors and checks them, and the
    # verdict is shared, so every rank takes the same decision (no rank waits alone in a barrier).
    weights, optimizer_states = _task_state(task), _optimizer_states(task, optimizers)
    ema_weights = None if ema is None else {k: v.contiguous() for k, v in ema.state_dict().items()}
    bad = non_finite_tensors(weights, ema_weights or {}) if rank == 0 else []
    if _any_rank(bool(bad)):
        raise NonFiniteError(f"refusing to write checkpoint {final}: non-finite weights in {bad[:5] or 'the model'}; "
                             f"{_kept(run_dir)}")
    if rank == 0:
        with _writing(tmp, run_dir, step):
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
    barrier()
    with _writing(tmp, run_dir, step):
        torch.save({"rng": rng_state(), "data": loader.state_dict()}, tmp / f"rank_{rank}.pt")
    _crash_point("rank", step, rank)
    barrier()
    if rank == 0:
        with _writing(tmp, run_dir, step):
            save_file(weights, tmp / "model.safetensors")
            _crash_point("model", step, rank)
            if ema_weights is not None:
                save_file(ema_weights, tmp / "ema.safetensors")
            torch.save({"optimizers": optimizer_states,
                        "schedulers": {k: s.state_dict() for k, s in schedulers.items()}}, tmp / "training.pt")
            write_manifest(tmp, step)
            _write_json(tmp / "state.json", {"step": step, "world_size": world_size, **meta})  # last: complete
            _swap_into_place(tmp, final, step)
        rotate_checkpoints(run_dir, keep_last)
    barrier()
    return final


# -------------------------------------------------------------------------------------------- loading
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


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(path)
    except Exception as e:
        raise CheckpointError(f"{path} cannot be read ({type(e).__name__}: {e})") from None


def _optimizer_settings(optimizer) -> list[dict]:
    """Per param group: the configured lr (before any schedule factor), betas, weight decay, eps."""
    return [{k: (tuple(g[k]) if k == "betas" else g.get("initial_lr", g["lr"]) if k == "lr" else g[k])
             for k in OPTIMIZER_KEYS if k in g} for g in optimizer.param_groups]


def _apply_optimizer_settings(name: str, optimizer, scheduler, wanted: list[dict]) -> list[str]:
    """Make the config's optimizer settings win over the loaded state; returns the changes, described.

    The schedule's factor at the current step is kept: lr = new base lr x (loaded lr / loaded base lr)."""
    changes = []
    for i, (group, want) in enumerate(zip(optimizer.param_groups, wanted)):
        have = _optimizer_settings(optimizer)[i]
        for key, value in want.items():
            if have.get(key) == value:
                continue
            where = name if len(optimizer.param_groups) == 1 else f"{name}[{i}]"
            changes.append(f"{where}.{key} {have.get(key)} -> {value}")
            if key == "lr":
                factor = group["lr"] / have["lr"] if have["lr"] else 1.0
                group["initial_lr"], group["lr"] = value, value * factor
                if scheduler is not None and hasattr(scheduler, "base_lrs"):
                    scheduler.base_lrs[i] = value
            else:
                group[key] = value
    if scheduler is not None and changes:
        scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]
    return changes


def _read_checkpoint(path: Path, rank: int, world_size: int, state: dict, with_ema: bool) -> dict:
    """Everything this rank needs from `path`, in memory; raises CheckpointError before any state changes."""
    files = {"weights": _load_safetensors(path / "model.safetensors"),
             "training": _safe_torch_load(path / "training.pt")}
    if with_ema:
        files["ema"] = _load_safetensors(path / "ema.safetensors")
    # The data position: every rank's file (the positions are merged by lane, so any process count resumes
    # them); the RNG states: this rank's, when the process count is unchanged.
    saved = [_safe_torch_load(path / f"rank_{r}.pt") for r in range(state["world_size"])]
    files["data"] = [s["data"] for s in saved]
    if state["world_size"] == world_size:
        files["per_rank"] = saved[rank]
    return files


def load_checkpoint(path: str | Path, *, task, optimizers: dict, schedulers: dict, ema, loader,
                    meta: dict, rank: int, world_size: int) -> int:
    """Restore everything saved by `save_checkpoint`; returns the step. Every file is read (safely) and
    checked first, so a bad checkpoint raises with its path and leaves the run untouched; nothing is loaded
    when the checkpoint belongs to another model preset. The config's optimizer settings (lr, betas,
    weight decay, eps) override the loaded ones, and the note lists the changed keys."""
    path = Path(path)
    state = _read_json(path / "state.json")
    if state.get("model") != meta.get("model"):
        raise ValueError(f"checkpoint {path} belongs to another model preset ('{state.get('model')}', this run is "
                         f"'{meta.get('model')}'); use another run_dir or trainer.resume=never")
    files = _read_checkpoint(path, rank, world_size, state, ema is not None)
    check_task_weights(task, files["weights"], path)
    wanted = {k: _optimizer_settings(o) for k, o in optimizers.items()}
    _load_task_state(task, files["weights"])
    if ema is not None:
        ema.load_state_dict(files["ema"])
    for k, o in optimizers.items():
        _load_optimizer_state(task, o, files["training"]["optimizers"][k])
    for k, s in schedulers.items():
        s.load_state_dict(files["training"]["schedulers"][k])
    changes = [c for k, o in optimizers.items() for c in _apply_optimizer_settings(k, o, schedulers.get(k), wanted[k])]
    if rank == 0 and changes:
        print(f"[ldm] note: optimizer settings changed since {path.name}: {'; '.join(changes)}; the new values "
              f"apply from this step on")
    if state.get("fingerprint") != meta.get("fingerprint") and rank == 0:
        print(f"[ldm] note: the model config changed since {path.name}; the architecture matches, so the weights "
              f"load, and everything read from the config (loss weights, optimizer settings) follows the new values")
    if "per_rank" in files:
        set_rng_state(files["per_rank"]["rng"])
    try:
        loader.load_state_dict(files["data"])
    except ValueError as e:  # e.g. data.lanes or the shards changed: the saved order no longer exists
        if rank == 0:
            print(f"[ldm] cannot continue the saved sample order ({e}); the data order starts over")
    if state["world_size"] != world_size and rank == 0:
        print(f"[ldm] resuming {path} written by {state['world_size']} processes on {world_size}: the global "
              f"sample order and the per-sample random draws continue where they stopped")
    return int(state["step"])
