"""Sharded checkpoints (`trainer.checkpoint_format=sharded`): every rank writes its own part of the weights,
optimizer states and EMA, in parallel, with torch.distributed.checkpoint (DCP).

Layout of `<run_dir>/checkpoints/step_00001234/` (the small files are those of a full checkpoint):
  __<r>_0.distcp     rank r's shards of {"model", "optimizers", "ema"} (DCP; under DDP every tensor is
                     replicated, and DCP's planner gives each to one rank, so it is written once, not once per rank)
  .metadata          DCP's index: every tensor's name, shape, dtype and which file holds which chunk
  training.pt        LR-scheduler states + the step guard's state (rank 0)
  rank_<r>.pt        per-rank RNG states and data position
  manifest.json      size + CRC-32 of every file above;  state.json  "format": "sharded", written LAST

Why a subclass: a run of either format must resume checkpoints of both (a run switched to sharded keeps
its full checkpoints), so the loop always uses this one; `checkpoint_format` only picks what it writes.
Loading reshards: DCP reads whatever chunks overlap this rank's tensors, so a checkpoint written by N
processes resumes on M, under DDP or FSDP. `trainer.checkpoint_async`: a scheduled save copies the state
to memory, then writes it in a background thread while training goes on; the directory is swapped into
place (manifest, state.json) only after every rank's write finished, and the next save, a rewind and the
end of the run wait for it first. A kill before that leaves `step_….tmp`, and the previous checkpoint
stays the latest. train/consolidate.py (ldm/training/consolidate.py) joins the shards into single files.
"""
from __future__ import annotations

import math
import warnings
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from torch.utils._pytree import tree_map_only

from ldm.errors import CheckpointError, CheckpointWriteError, NonFiniteError
from ldm.training.checkpoint import Checkpointer, _any_rank, _distributed, check_task_weights, non_finite_tensors
from ldm.training.checkpoint_files import (_crash_point, _kept, _safe_torch_load, _say, _swap_into_place, _write_json,
                                           _writing, read_dcp_metadata, rotate_checkpoints, write_manifest)


# One process without a process group is a normal case here (a 1-process run, consolidation), not a mistake
warnings.filterwarnings("ignore", message="torch.distributed is (disabled|unavailable)")

def _options(strict: bool = True):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=False, cpu_offload=False, strict=strict)  # each rank's own shards


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t  # a DTensor's shard on this rank (duck-typed)


def model_state(task) -> dict[str, torch.Tensor]:
    """Trainable task state as this rank holds it (DTensor shards under FSDP, whole tensors under DDP)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    skip = tuple(getattr(task, "frozen_prefixes", ()))
    state = get_model_state_dict(task, options=_options())
    return {k: v for k, v in state.items() if not (skip and k.startswith(skip))}


def ema_state(ema) -> dict[str, torch.Tensor]:
    """The EMA's own tensors under the keys of `EMA.state_dict()` (no gathering: DCP writes the shards)."""
    state = {f"shadow.{n}": t for n, t in zip(ema.names + ema.buffer_names, ema.params + ema.buffers_)}
    return {**state, "num_updates": ema.num_updates}


def sharded_norm(state: dict[str, torch.Tensor]) -> float:
    """L2 norm of the floating-point tensors, the same on every rank (a collective when any is a DTensor)."""
    from torch.distributed.tensor import DTensor

    whole = sum(float(torch.linalg.vector_norm(v.float())) ** 2 for v in state.values()
                if v.is_floating_point() and not isinstance(v, DTensor))
    parts = [_local(v).double().pow(2).sum() for v in state.values()
             if v.is_floating_point() and isinstance(v, DTensor)]
    if not parts:
        return math.sqrt(whole)
    total = torch.stack(parts).sum()
    if _distributed():
        device = "cuda" if torch.distributed.get_backend() == "nccl" else "cpu"
        total = total.to(device)
        torch.distributed.all_reduce(total)
    return math.sqrt(whole + float(total))


def _writer(directory: Path):
    """DCP's file writer without its fsync per file: a full checkpoint is not fsynced either, and the
    manifest's checksums catch a copy a crashed node lost (resume falls back to the previous one)."""
    from torch.distributed.checkpoint import FileSystemWriter

    return FileSystemWriter(directory, sync_files=False)


def _first_failure(e: BaseException) -> BaseException:
    """DCP wraps every rank's error in one CheckpointException: the first underlying one."""
    failures = getattr(e, "failures", None) or {}
    for failure in failures.values():
        return failure[0] if isinstance(failure, tuple) else failure
    return RuntimeError(str(e))


class ShardedCheckpointer(Checkpointer):
    """A Checkpointer that writes sharded checkpoints when `checkpoint_format="sharded"` (in the background
    for `save(..., background=True)` when `background_saves`) and loads both formats."""

    def __init__(self, *args, checkpoint_format: str = "full", background_saves: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.sharded, self.background_saves = checkpoint_format == "sharded", background_saves
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._group = None  # a gloo process group of its own: the background writer's collectives must not
        #                     interleave with the training step's on the default group

    # -- saving
    def save(self, step: int, reason: str, background: bool = False) -> Path:
        self.wait()
        if not self.sharded:
            return super().save(step, reason)
        start = time.perf_counter()
        background = background and self.background_saves
        path = self._write_sharded(step, background, start)
        seconds = time.perf_counter() - start
        if background:
            _say(f"[ldm] saving {path} ({reason}) in the background; training goes on after {seconds:.1f} s of copying")
        else:
            _say(f"[ldm] saved {path} ({reason}, sharded) in {seconds:.1f} s")
            if self.log is not None:
                self.log(step, {"checkpoint/save_seconds": seconds})
        return path

    def _write_sharded(self, step: int, background: bool, start: float) -> Path:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        run_dir, rank = self.run_dir, self.rank
        final = run_dir / "checkpoints" / f"step_{step:08d}"
        tmp = final.with_name(final.name + ".tmp")
        weights = model_state(self.task)
        ema = ema_state(self.ema) if self.ema is not None else {}
        bad = non_finite_tensors({k: _local(v) for k, v in weights.items()}, {k: _local(v) for k, v in ema.items()})
        if _any_rank(bool(bad)):  # each rank checks its own shards; the verdict is shared
            raise NonFiniteError(f"refusing to write checkpoint {final}: non-finite weights in "
                                 f"{bad[:5] or 'the model'}; {_kept(run_dir)}")
        norm = sharded_norm(weights)
        health = self._health({}, norm=norm) if rank == 0 else None
        state = {"model": weights, "optimizers": {k: get_optimizer_state_dict(self.task, o, options=_options())
                                                  for k, o in self.optimizers.items()}}
        if ema:
            state["ema"] = ema
        self._open_tmp(tmp, step)
        if rank == 0:
            with _writing(tmp, run_dir, step):
                torch.save({"guard": self.guard.state_dict(),
                            "schedulers": {k: s.state_dict() for k, s in self.schedulers.items()}}, tmp / "training.pt")
        _crash_point("rank", step, rank)
        self.barrier()
        described = {"step": step, "world_size": self.world_size, "format": "sharded", **self.meta, "health": health}
        if not background:
            with _writing(tmp, run_dir, step):
                try:
                    dcp.save(state, storage_writer=_writer(tmp))  # returns once every rank's shards are written
                except dcp.api.CheckpointException as e:
                    raise _first_failure(e) from None
            self._complete(tmp, final, step, described)
            self.barrier()
            return final
        if self._group is None and _distributed():
            self._group = torch.distributed.new_group(backend="gloo")
        future = dcp.async_save(state, storage_writer=_writer(tmp), process_group=self._group)  # copies, then writes
        self._thread = threading.Thread(target=self._finish_background, args=(future, tmp, final, described, start),
                                        name=f"checkpoint-{step}")  # not a daemon: the interpreter waits for it
        self._thread.start()
        return final

    def _complete(self, tmp: Path, final: Path, step: int, described: dict) -> None:
        """Rank 0, after every rank's shards are written: manifest, state.json (last), swap, rotate."""
        if self.rank != 0:
            return
        with _writing(tmp, self.run_dir, step):
            _crash_point("shards", step, 0)
            write_manifest(tmp, step)
            _write_json(tmp / "state.json", described)
            _swap_into_place(tmp, final, step)
        rotate_checkpoints(self.run_dir, self.keep_last)

    def _finish_background(self, future, tmp: Path, final: Path, described: dict, start: float) -> None:
        import torch.distributed.checkpoint as dcp

        step = described["step"]
        try:
            with _writing(tmp, self.run_dir, step):
                try:
                    future.result()
                except dcp.api.CheckpointException as e:
                    raise _first_failure(e) from None
            self._complete(tmp, final, step, described)
            _say(f"[ldm] saved {final} in the background in {time.perf_counter() - start:.1f} s")
        except BaseException as e:  # re-raised by the next wait(), on the main thread
            self._error = e

    def wait(self) -> None:
        """Finish the background save in flight, if any (a collective: every rank calls it at the same point).
        A failure on any rank stops every rank, naming it."""
        thread, self._thread = self._thread, None
        if thread is None:
            return
        thread.join()
        error, self._error = self._error, None
        if _any_rank(error is not None):
            if isinstance(error, CheckpointWriteError) or error is None:
                raise error or CheckpointWriteError(f"the background checkpoint save failed on another process; "
                                                    f"{_kept(self.run_dir)}")
            raise CheckpointWriteError(f"the background checkpoint save failed ({type(error).__name__}: {error}); "
                                       f"{_kept(self.run_dir)}")

    @contextmanager
    def stops_name_healthy(self):
        """As Checkpointer's; and on every way out, a background save in flight is finished (no collective:
        after an error the other ranks may be gone; the thread's own collectives were started by all)."""
        try:
            with super().stops_name_healthy():
                yield
        finally:
            if self._thread is not None:
                self._thread.join()

    def rewind(self, step: int) -> int:
        self.wait()
        return super().rewind(step)

    # -- loading
    def _restore_states(self, path: Path, state: dict) -> dict:
        fmt = state.get("format", "full")
        if fmt == "full":
            return super()._restore_states(path, state)
        if fmt != "sharded":
            raise CheckpointError(f"{path} holds {fmt} weights only, no optimizer states: resume from the sharded "
                                  f"checkpoint it was made from, or start over with trainer.resume=never")
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import (get_optimizer_state_dict, set_model_state_dict,
                                                             set_optimizer_state_dict)

        rank, task = self.rank, self.task
        training = _safe_torch_load(path / "training.pt")
        saved = [_safe_torch_load(path / f"rank_{r}.pt") for r in range(state["world_size"])]
        index = read_dcp_metadata(path).state_dict_metadata
        shapes = {k.removeprefix("model."): torch.empty(getattr(m, "size", (0,)), device="meta")
                  for k, m in index.items() if k.startswith("model.")}
        check_task_weights(task, shapes, path)  # names and shapes, before anything is read or changed
        if self.ema is not None and "ema.num_updates" not in index:
            raise CheckpointError(f"{path} has no EMA weights, and this model keeps an EMA")
        clone = lambda sd: tree_map_only(torch.Tensor, lambda t: t.detach().clone(), sd)  # noqa: E731
        target = {"model": clone(model_state(task)),
                  "optimizers": {k: clone(get_optimizer_state_dict(task, o, options=_options()))
                                 for k, o in self.optimizers.items()}}
        if self.ema is not None:
            target["ema"] = clone(ema_state(self.ema))
        try:  # into copies: a failure leaves the run as it was
            dcp.load(target, checkpoint_id=path)  # reads the chunks that overlap this rank's tensors: reshards
        except (dcp.api.CheckpointException, Exception) as e:
            cause = _first_failure(e) if isinstance(e, dcp.api.CheckpointException) else e
            raise CheckpointError(f"{path}: its shards cannot be read ({type(cause).__name__}: {cause})") from None
        set_model_state_dict(task, target["model"], options=_options(strict=False))
        for k, o in self.optimizers.items():
            set_optimizer_state_dict(task, o, target["optimizers"][k], options=_options())
        if self.ema is not None:
            with torch.no_grad():
                for key, t in ema_state(self.ema).items():
                    t.copy_(target["ema"][key])
        files = {"training": training, "data": [s["data"] for s in saved], "norm": sharded_norm(target["model"])}
        if state["world_size"] == self.world_size:
            files["per_rank"] = saved[rank]
        return files
