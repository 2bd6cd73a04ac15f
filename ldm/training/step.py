"""One optimizer step of a task, and what it updates: the micro-batches (each with its own seed),
forward and backward under the accelerator's autocast and accumulation, gradient clipping, the step
guard's skip decision, the optimizers, the LR schedules, the EMA and the throughput meter.

No host sync inside the step (a .item() or float() of a device tensor waits for the GPU queue to
drain): the guard's decision stays on the device, and values are read only at log steps (`values()`).
"""
from __future__ import annotations

import hashlib

import torch

from ldm.diffusion.draws import per_sample, sample_seed
from ldm.errors import DataUnavailable
from ldm.training.build import BuiltTask, build_optimizers, build_scheduler
from ldm.training.ema import EMA
from ldm.training.guard import StepGuard
from ldm.training.meter import ThroughputMeter, count_step_flops, default_peak_tflops
from ldm.training.parallel import whole


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def micro_batch_seed(seed: int, index: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}/{index}".encode()).digest()[:8], "little") >> 1


class TrainStep:
    """Built after `parallelize()`: the optimizers and the EMA hold the (possibly sharded) parameters."""

    def __init__(self, cfg, built: BuiltTask, model: torch.nn.Module, accelerator, accum: int):
        trainer, task = cfg.trainer, built.task
        self.task, self.model, self.accelerator, self.accum = task, model, accelerator, accum
        self.seed, self.rank, self.world = trainer.seed, accelerator.process_index, accelerator.num_processes
        self.global_batch, self.micro = trainer.batch_size, trainer.batch_size // (self.world * accum)
        self.fault_group, self.mark, self.data_gone, self.data_fault = _cpu_group(), None, False, None
        self.optimizers = build_optimizers(cfg, task)
        self.schedulers = {k: build_scheduler(trainer, o) for k, o in self.optimizers.items()}
        self.ema_target = task.ema_target()
        self.ema = EMA(self.ema_target, **cfg.model.ema) if cfg.model.ema is not None and self.ema_target is not None \
            else None
        if self.ema is not None and built.pretrained_ema is not None:
            self.ema.load_shadow(built.pretrained_ema)
        self.groups, self.clip = task.param_groups(), trainer.grad_clip if trainer.grad_clip > 0 else float("inf")
        self.guard = StepGuard(trainer.max_bad_steps, lambda t: accelerator.reduce(t, "sum"),
                               accelerator.is_main_process, task, accelerator.device, trainer.spike, self.world)
        peak = trainer.peak_tflops or default_peak_tflops(accelerator.device.type, trainer.mixed_precision.value)
        self.meter = ThroughputMeter(self.world, peak,
                                     synchronize=torch.cuda.synchronize if torch.cuda.is_available() else None)
        self.flops_per_image = {}  # by task.step_phase(step): counted on the first micro-batch of each phase
        self.trace_path = f"{cfg.run_dir}/trace_rank{self.rank}.txt" if trainer.trace else None
        self.trace, self.prepared, self.logs, self.norms = None, {}, {}, {}

    def prepare(self) -> None:
        """After a checkpoint has loaded: the EMA on the device, the optimizers wrapped by the accelerator."""
        if self.ema is not None:
            self.ema.to(self.accelerator.device)
        self.prepared = {k: self.accelerator.prepare(o) for k, o in self.optimizers.items()}
        self.guard.snapshot_buffers()
        self.trace = open(self.trace_path, "a") if self.trace_path else None  # (the run directory exists now)

    def fetch(self, data, loader) -> list[dict] | None:
        """The next `accum` micro-batches, or None when any rank's data source is gone (DataUnavailable: no
        byte readable for data.max_wait seconds). Fetched before the step's stop vote, so such a rank stops
        with all the others instead of leaving them waiting in the backward all-reduce."""
        self.mark = loader.state_dict()
        with self.meter.waiting():
            try:
                batches = [next(data) for _ in range(self.accum)]
            except DataUnavailable as e:
                batches, self.data_fault = None, e
        self.data_gone = _any_rank(batches is None, self.fault_group)
        return None if self.data_gone else batches

    def unfetch(self, loader) -> None:
        """Back to the position before `fetch`: the step not trained is the first one after a resume."""
        loader.load_state_dict(self.mark)

    def run(self, step: int, batches: list[dict]) -> None:
        """Optimizer step `step` from its micro-batches."""
        accelerator, task, skip = self.accelerator, self.task, None
        for micro_step, batch in enumerate(batches):
            # The random draws of each sample (noise, timesteps, condition dropout) come from a seed of (seed,
            # its index in the global sample stream: ldm/diffusion/draws.py), anything else from the micro-batch's
            # index: a run's randomness does not depend on how many processes share the global batch, so 1, 2
            # or 4 processes train the same model.
            torch.manual_seed(micro_batch_seed(self.seed, (step * self.accum + micro_step) * self.world + self.rank))
            first = step * self.global_batch + (micro_step * self.world + self.rank) * self.micro
            seeds = [sample_seed(self.seed, first + j) for j in range(len(batch["key"]))]
            batch = to_device(batch, accelerator.device)
            images, phase = len(batch["key"]), task.step_phase(step)
            if phase not in self.flops_per_image:
                with self.meter.excluded():
                    self.flops_per_image[phase] = count_step_flops(task, batch, step, accelerator.autocast) / images
                if accelerator.is_main_process:
                    print(self.meter.describe(self.flops_per_image[phase], step), flush=True)
            with accelerator.accumulate(self.model), accelerator.autocast(), per_sample(seeds):
                loss, self.logs = self.model(batch, step)
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    skip = self._clip_and_guard(loss, phase)
                for opt in self.prepared.values():
                    opt.step()
                    opt.zero_grad(set_to_none=True)
            self.meter.add(images, self.flops_per_image[phase] * images)
            if self.trace:
                self.trace.write("".join(f"{step} {k}\n" for k in batch["key"]))
                self.trace.flush()
        for s in self.schedulers.values():
            s.step()
        if self.ema is not None:
            self.ema.update(self.ema_target, skip)

    def _clip_and_guard(self, loss: torch.Tensor, phase) -> torch.Tensor:
        self.accelerator.unscale_gradients()
        norms = {k: torch.nn.utils.clip_grad_norm_(ps, self.clip) for k, ps in self.groups.items()}
        self.norms = {k: whole(n) for k, n in norms.items()}  # FSDP: DTensor -> tensor
        skip = self.guard.update(loss, self.norms, phase)  # non-finite or spike: a device flag, equal on every rank
        if self.accelerator.scaler is None:  # (fp16: the GradScaler sets found_inf from its own check)
            for opt in self.optimizers.values():
                opt.found_inf = skip  # fused AdamW: 1 leaves weights, moments and step count as they are
        return skip

    def values(self) -> dict[str, float]:
        """The host reads the step's values here only (at log steps), after the guard's check."""
        values = {f"train/{k}": _scalar(v) for k, v in self.logs.items()}
        values.update({f"grad_norm/{k}": _scalar(v) for k, v in self.norms.items()})
        values.update({f"lr/{k}": s.get_last_lr()[0] for k, s in self.schedulers.items()})
        values["train/skipped_steps"] = self.guard.skipped
        values.update(self.meter.read())  # img_per_s, tflops, mfu, data_wait
        return values

    def close(self) -> None:
        """The trace's last lines: weight and EMA checksums (the same on every rank)."""
        if not self.trace:
            return
        checksum = sum(float(whole(p).detach().double().sum()) for p in self.task.parameters())
        self.trace.write(f"checksum {checksum!r}\n")
        if self.ema is not None:  # the EMA must be the same on every rank (a known fault elsewhere)
            self.trace.write(f"ema_checksum {sum(float(v.double().sum()) for v in self.ema.state_dict().values())!r}\n")
        self.trace.close()


def _scalar(v) -> float:
    return float(whole(v).detach()) if torch.is_tensor(v) else float(v)


def _cpu_group():
    """A gloo group for the per-step data-fault vote (a host flag: no GPU sync), None for one process."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return None
    return dist.group.WORLD if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")


def _any_rank(flag: bool, group) -> bool:
    if group is None:
        return flag
    import torch.distributed as dist

    t = torch.tensor([int(flag)], dtype=torch.int32)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return bool(t.item())
