"""Checkpoints: everything the next step needs, written atomically, verified before use, loaded safely.

Layout of `<run_dir>/checkpoints/step_00001234/`:
  model.safetensors   trainable task state (frozen parts listed in `task.frozen_prefixes` are skipped)
  ema.safetensors     EMA weights, when the model keeps an EMA
  training.pt         optimizer states (keyed by parameter name) + LR-scheduler states + the step guard's
                      counters and running loss / gradient-norm statistics
  rank_<r>.pt         per-rank RNG states (python, numpy, torch, cuda) and the data position of the rank's
                      lanes (merged from all ranks on resume, so another process count continues the order)
  manifest.json       step, and size + CRC-32 of every file above
  state.json          step, model name, model-config fingerprint, world size, health — written LAST

Safety: tensors come from safetensors; the two `.pt` files hold only tensors, numbers, strings, lists
and dicts, and are read with `torch.load(weights_only=True)`, which refuses any pickled object that
could run code. Integrity, atomic writes and rotation: ldm/training/checkpoint_files.py.

Health: `state.json` records whether the run was healthy when the checkpoint was written (no skipped or
spiking step within `trainer.spike.window` steps, and a weight norm within `trainer.spike.max_weight_change`
of the last healthy state's). A rewind loads the newest healthy checkpoint, rotation keeps it, and every
stop message names it.

Weights and optimizer states are written whole (unsharded), gathered through torch's distributed
state-dict API, so the files are the same under `trainer.strategy=ddp` and `fsdp`: a run saved under one
resumes under the other, on any number of processes. Saving and loading are collectives: every rank calls
them. `trainer.checkpoint_format=sharded` (each rank writes its shards): ldm/training/checkpoint_sharded.py.
"""
from __future__ import annotations

import hashlib
import json
import math
import random
import shutil
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ldm.errors import CheckpointError, DivergedError, NonFiniteError
from ldm.training.checkpoint_files import (_crash_point, _kept, _read_json, _safe_torch_load, _say,
                                           _swap_into_place, _write_json, _writing, is_healthy, newest_healthy,
                                           rotate_checkpoints, resolve_resume, write_manifest)
from ldm.training.checkpoint_files import list_checkpoints, verify_checkpoint  # noqa: F401  (the public names)


OPTIMIZER_KEYS = ("lr", "betas", "weight_decay", "eps")  # the config's settings that override a loaded state


def config_fingerprint(model_cfg: dict) -> str:
    """Hash of the model config: a checkpoint only loads into the preset that wrote it."""
    blob = json.dumps(model_cfg, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


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
                if scheduler is not None and hasattr(scheduler, "base_lrs"):  # torch LR schedulers; not every one
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


# ------------------------------------------------------------------------------------ the checkpoint object
def weight_norm(weights: dict[str, torch.Tensor]) -> float:
    """L2 norm of all floating-point tensors (one pass; a finite blow-up multiplies it by 1e3 or more)."""
    return math.sqrt(sum(float(torch.linalg.vector_norm(v.float())) ** 2
                         for v in weights.values() if v.is_floating_point()))


class Checkpointer:
    """The run's state on disk, as one object (EDM2's CheckpointIO): built once from everything a step
    changes; `save(step, reason)`, `load_latest(resume)`, `load(path)` and `rewind(step)` are collectives
    (every rank calls them, at the same step)."""

    def __init__(self, run_dir: str | Path, *, task, optimizers: dict, schedulers: dict, ema, loader, guard,
                 meta: dict, rank: int, world_size: int, barrier: Callable[[], None], keep_last: int, spike,
                 log: Callable[[int, dict], None] | None = None):
        self.run_dir, self.task, self.optimizers, self.schedulers = Path(run_dir), task, optimizers, schedulers
        self.ema, self.loader, self.guard, self.meta = ema, loader, guard, meta
        self.rank, self.world_size, self.barrier, self.keep_last = rank, world_size, barrier, keep_last
        self.spike, self.log = spike, log
        self.reference_norm: float | None = None  # weight norm of the last healthy state (rank 0)
        self.rewinds = 0

    # -- saving
    def save(self, step: int, reason: str) -> Path:
        """Write checkpoint `step` (refused if any weight is non-finite), rotate, log its duration."""
        start = time.perf_counter()
        path = self._write(step)
        seconds = time.perf_counter() - start  # size the SLURM --signal lead time from this (README)
        _say(f"[ldm] saved {path} ({reason}) in {seconds:.1f} s")
        if self.log is not None:
            self.log(step, {"checkpoint/save_seconds": seconds})
        return path

    def _health(self, weights: dict[str, torch.Tensor], norm: float | None = None) -> dict:
        """Rank 0: whether the run is healthy now (see the module docstring), with the reasons if not."""
        norm, reasons = weight_norm(weights) if norm is None else norm, []
        if self.guard.recent_skips():
            reasons.append(f"a step was skipped within the last {self.spike.window} steps")
        bound = 1 + self.spike.max_weight_change
        if self.reference_norm and not self.reference_norm / bound <= norm <= self.reference_norm * bound:
            reasons.append(f"weight norm {self.reference_norm:.4g} -> {norm:.4g} (more than {bound:g}x)")
        health = {"healthy": not reasons, "weight_norm": norm, "reference_norm": self.reference_norm,
                  "reasons": reasons}
        if not reasons:
            self.reference_norm = norm
        return health

    def _write(self, step: int) -> Path:
        run_dir, rank = self.run_dir, self.rank
        root = run_dir / "checkpoints"
        final = root / f"step_{step:08d}"
        tmp = root / f"step_{step:08d}.tmp"
        # Gathered on every rank (FSDP collectives); rank 0 holds the whole tensors and checks them, and the
        # verdict is shared, so every rank takes the same decision (no rank waits alone in a barrier).
        weights, optimizer_states = _task_state(self.task), _optimizer_states(self.task, self.optimizers)
        ema_weights = None if self.ema is None else {k: v.contiguous() for k, v in self.ema.state_dict().items()}
        bad = non_finite_tensors(weights, ema_weights or {}) if rank == 0 else []
        if _any_rank(bool(bad)):
            raise NonFiniteError(f"refusing to write checkpoint {final}: non-finite weights in "
                                 f"{bad[:5] or 'the model'}; {_kept(run_dir)}")
        guard_state = self.guard.state_dict()
        health = self._health(weights) if rank == 0 else None
        self._open_tmp(tmp, step)
        _crash_point("rank", step, rank)
        self.barrier()
        if rank == 0:
            with _writing(tmp, run_dir, step):
                save_file(weights, tmp / "model.safetensors")
                _crash_point("model", step, rank)
                if ema_weights is not None:
                    save_file(ema_weights, tmp / "ema.safetensors")
                torch.save({"optimizers": optimizer_states, "guard": guard_state,
                            "schedulers": {k: s.state_dict() for k, s in self.schedulers.items()}}, tmp / "training.pt")
                write_manifest(tmp, step)
                _write_json(tmp / "state.json", {"step": step, "world_size": self.world_size, **self.meta,
                                                 "health": health})  # last: complete
                _swap_into_place(tmp, final, step)
            rotate_checkpoints(run_dir, self.keep_last)
        self.barrier()
        return final

    def _open_tmp(self, tmp: Path, step: int) -> None:
        """A fresh `tmp` directory (made by rank 0 while the others wait), then every rank's own position in
        it: its RNG states and where its data loader stands."""
        rank, run_dir = self.rank, self.run_dir
        if rank == 0:
            with _writing(tmp, run_dir, step):
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir(parents=True)
        self.barrier()
        with _writing(tmp, run_dir, step):
            torch.save({"rng": rng_state(), "data": self.loader.state_dict()}, tmp / f"rank_{rank}.pt")

    # -- loading
    def load_latest(self, resume: str) -> tuple[int, Path | None]:
        """`trainer.resume` (latest | never | PATH): (step, checkpoint) to continue from, (0, None) for a
        fresh run, whose initial weights are then the reference of the first health check."""
        path = resolve_resume(resume, self.run_dir)
        if path is None:
            weights = _task_state(self.task)  # a collective under FSDP
            self.reference_norm = weight_norm(weights) if self.rank == 0 else None
            return 0, None
        return self.load(path), path

    def load(self, path: str | Path, rewind: bool = False) -> int:
        """Restore everything `save` wrote; returns the step. Every file is read (safely) and checked first,
        so a bad checkpoint raises with its path and leaves the run untouched; nothing is loaded when the
        checkpoint belongs to another model preset. The config's optimizer settings (lr, betas, weight
        decay, eps) override the loaded ones, and the note lists the changed keys. A rewind keeps the data
        position and RNG streams where they are: the batches that caused it are not read again."""
        path, rank, task, meta = Path(path), self.rank, self.task, self.meta
        state = _read_json(path / "state.json")
        if state.get("model") != meta.get("model"):
            raise ValueError(f"checkpoint {path} belongs to another model preset ('{state.get('model')}', this run "
                             f"is '{meta.get('model')}'); use another run_dir or trainer.resume=never")
        wanted = {k: _optimizer_settings(o) for k, o in self.optimizers.items()}
        files = self._restore_states(path, state)
        for k, s in self.schedulers.items():
            s.load_state_dict(files["training"]["schedulers"][k])
        changes = [c for k, o in self.optimizers.items()
                   for c in _apply_optimizer_settings(k, o, self.schedulers.get(k), wanted[k])]
        step = int(state["step"])
        if "guard" in files["training"]:  # (absent in checkpoints written before the spike guard)
            self.guard.load_state_dict(files["training"]["guard"], phase=task.step_phase(step - 1))
        health = state.get("health") or {}
        self.reference_norm = health.get("weight_norm") if health.get("healthy", True) else health.get("reference_norm")
        if self.reference_norm is None:  # (a sharded checkpoint's reader measures the norm: "norm")
            self.reference_norm = files.get("norm") or weight_norm(files["weights"])
        self.guard.snapshot_buffers()
        if rewind:
            return step
        if rank == 0 and changes:
            print(f"[ldm] note: optimizer settings changed since {path.name}: {'; '.join(changes)}; the new values "
                  f"apply from this step on")
        if state.get("fingerprint") != meta.get("fingerprint") and rank == 0:
            print(f"[ldm] note: the model config changed since {path.name}; the architecture matches, so the "
                  f"weights load, and everything read from the config (loss weights, optimizer settings) follows "
                  f"the new values")
        self._restore_position(files, path, state)
        return step

    def _restore_states(self, path: Path, state: dict) -> dict:
        """Read, check, then load weights, EMA and optimizer states; returns the files read (sharded: overridden)."""
        files = _read_checkpoint(path, self.rank, self.world_size, state, self.ema is not None)
        check_task_weights(self.task, files["weights"], path)
        from torch.distributed.checkpoint.state_dict import set_model_state_dict

        set_model_state_dict(self.task, files["weights"], options=_full_options(strict=False))
        if self.ema is not None:
            self.ema.load_state_dict(files["ema"])
        for k, o in self.optimizers.items():
            _load_optimizer_state(self.task, o, files["training"]["optimizers"][k])
        return files

    def _restore_position(self, files: dict, path: Path, state: dict) -> None:
        """The data position of every lane (merged from all ranks' files, so another process count continues
        the same global order) and, on the same process count, each rank's RNG states."""
        rank, world_size = self.rank, self.world_size
        if "per_rank" in files:
            set_rng_state(files["per_rank"]["rng"])
        try:
            self.loader.load_state_dict(files["data"])
        except ValueError as e:  # e.g. data.lanes or the shards changed: the saved order no longer exists
            if rank == 0:
                print(f"[ldm] cannot continue the saved sample order ({e}); the data order starts over")
        if state["world_size"] != world_size and rank == 0:
            print(f"[ldm] resuming {path} written by {state['world_size']} processes on {world_size}: the global "
                  f"sample order and the per-sample random draws continue where they stopped")

    # -- divergence
    def rewind(self, step: int) -> int:
        """`trainer.spike.max_in_row` bad steps in a row: reload the newest healthy checkpoint and go on
        with the next batches; returns its step. Stops (DivergedError) after `max_rewinds` rewinds."""
        path = newest_healthy(self.run_dir)
        why = f"{self.spike.max_in_row} steps in a row were skipped (loss or gradient spikes, or non-finite)"
        if path is None:
            raise DivergedError(f"stopping at step {step}: {why}, and there is no healthy checkpoint to rewind to")
        if self.rewinds >= self.spike.max_rewinds:
            raise DivergedError(f"stopping at step {step}: {why} again after {self.rewinds} rewind(s) "
                                f"(trainer.spike.max_rewinds={self.spike.max_rewinds}); the run keeps diverging")
        self.rewinds += 1
        _say(f"[ldm] step {step}: {why}; rewinding to {path.name} (rewind {self.rewinds} of "
             f"{self.spike.max_rewinds}) and going on with the next batches")
        totals = self.guard.totals()
        step = self.load(path, rewind=True)
        self.guard.keep_totals(totals)
        return step

    def resume_hint(self, path: Path | None = None) -> str:
        """Where to resume from: `path` when it is healthy, else the newest healthy checkpoint."""
        if path is not None and is_healthy(path):
            return f"rerun the same command to resume from {path.name}"
        healthy = newest_healthy(self.run_dir)
        if healthy is None:
            return "no healthy checkpoint exists: fix the cause and start over with trainer.resume=never"
        return (f"resume from the newest healthy checkpoint, {healthy.name}: fix the cause (e.g. lower the learning "
                f"rate or the offending loss weight) and rerun with trainer.resume={healthy}")

    @contextmanager
    def stops_name_healthy(self):
        """A divergence stop (non-finite or spiking steps, non-finite weights) names the checkpoint to resume from."""
        try:
            yield
        except NonFiniteError as e:
            raise type(e)(f"{e}; {self.resume_hint()}") from None
