"""Throughput meter: img/s, achieved TFLOP/s, MFU and the loader's share of the step time.

FLOPs are counted, not estimated: `count_step_flops` runs one real training micro-batch (forward and
backward of the task's loss) under torch's `FlopCounterMode` once, when the run starts (and again when
the task enters a costlier phase: stage 1's GAN at `disc_start`). Three gaps of the stock counter are
closed here:
* SDPA on CPU runs `aten._scaled_dot_product_flash_attention_for_cpu`, which torch 2.14's counter does
  not know (it counted 0 FLOPs for attention on CPU); it gets the formula of the CUDA kernels.
* Activation checkpointing recomputes the forward of a checkpointed block inside the backward. MFU is
  *model* FLOPs utilisation (PaLM, Chowdhery et al. 2022, App. B): the recomputation is not counted, so
  the MFU of the same model with and without checkpointing is comparable.
* Its per-module tracker breaks `torch.autograd.grad` on a parameter (stage 1's adaptive GAN weight), so
  only the total is kept.

The window of the meter is the wall time between two log steps minus what `excluded()` wraps
(evaluation, checkpoints, the FLOP count itself): img/s measures training, not the rest.
"""
from __future__ import annotations

import contextlib
import sys
import time
from typing import Any, Callable

import torch
import torch.utils.checkpoint
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

# Per-device peak dense TFLOP/s used for train/mfu when trainer.peak_tflops is None. NVIDIA H100 SXM5 and
# H200 SXM datasheets: BF16/FP16 tensor core 1,979 TFLOP/s and TF32 989 TFLOP/s "with sparsity", i.e.
# 989 and 494.5 dense. fp32 runs on CUDA use TF32 for matmuls and convolutions (build_accelerator).
# Other GPUs (A100: 312 bf16, 156 TF32; H100 PCIe: 756) must set trainer.peak_tflops. A CPU has no default.
H100_DENSE_TFLOPS = {"bf16": 989.0, "fp16": 989.0, "no": 494.5}


def _cpu_sdpa_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _cpu_sdpa_backward_flop(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None,
                            **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


# aten ops the stock counter misses, with the formulas of their CUDA siblings (the same leading arguments).
_EXTRA_FORMULAS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flop,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_sdpa_backward_flop,
}


def default_peak_tflops(device_type: str, mixed_precision: str) -> float | None:
    """trainer.peak_tflops when unset: the H100/H200 dense figure on CUDA, None (no MFU) elsewhere."""
    return H100_DENSE_TFLOPS.get(mixed_precision) if device_type == "cuda" else None


def _in_recomputation() -> bool:
    """True inside torch.utils.checkpoint's non-reentrant recomputation (`recompute_fn`), which runs on
    the thread that executes the backward."""
    frame = sys._getframe(2)
    while frame is not None:
        code = frame.f_code
        if code.co_name == "recompute_fn" and code.co_filename == torch.utils.checkpoint.__file__:
            return True
        frame = frame.f_back
    return False


class _NoModuleTracker:
    """Stands in for FlopCounterMode's ModuleTracker (we need the total, not per-module counts): the
    tracker's backward hooks make `torch.autograd.grad` with respect to a parameter fail ("A leaf node
    was passed to _will_engine_execute_node"), and stage 1's adaptive GAN weight calls exactly that."""

    parents = ("Global",)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None


class ModelFlopCounter(FlopCounterMode):
    """`FlopCounterMode` with CPU attention counted and checkpoint recomputation left out."""

    def __init__(self):
        super().__init__(display=False, custom_mapping=_EXTRA_FORMULAS)
        self.mod_tracker = _NoModuleTracker()

    def _count_flops(self, func_packet, out, args, kwargs):
        if func_packet in self.flop_registry and _in_recomputation():
            return out
        return super()._count_flops(func_packet, out, args, kwargs)


def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs (multiply-add = 2) of the matmuls, convolutions and attention `fn()` runs, backward
    included if `fn` runs one. For benchmarks: `count_flops(lambda: unet(x, t, c).mean().backward())`.
    Compiled modules run eagerly here (same ops, no compilation under the counter)."""
    with torch.compiler.set_stance("force_eager"), ModelFlopCounter() as counter:
        fn()
    return counter.get_total_flops()


def count_step_flops(task: torch.nn.Module, batch: dict, step: int,
                     autocast: Callable[[], Any] = contextlib.nullcontext) -> int:
    """FLOPs of one training micro-batch: `loss, _ = task(batch, step)` and `loss.backward()`, as the loop
    runs them (under `autocast()`), on the real batch. It changes nothing a training step would see:
    the RNG streams are forked, buffers (BatchNorm statistics, VQ usage counters) restored, gradients
    put back as they were; no optimizer steps. Under FSDP every rank must call it (the forward gathers)."""
    def training_step():
        with autocast():
            loss, _ = task(batch, step)
        loss.backward()

    params = [p for p in task.parameters() if p.requires_grad]
    grads = [p.grad for p in params]
    buffers = list(task.buffers())
    saved = [b.detach().clone() for b in buffers]
    device = next(iter(params or buffers), torch.empty(0)).device
    for p in params:
        p.grad = None
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else [], device_type=device.type):
            return count_flops(training_step)
    finally:
        with torch.no_grad():
            for p, g in zip(params, grads):
                p.grad = g
            for b, s in zip(buffers, saved):
                b.copy_(s)


class ThroughputMeter:
    """Accumulates images, FLOPs and loader wait between log steps; `read()` turns them into the
    logged rates and starts the next window.

    * train/img_per_s: images of all ranks per second (`world_size` × this rank's; every rank trains
      the same micro-batch size);
    * train/tflops: achieved TFLOP/s of this device;
    * train/mfu: train/tflops / peak (only when a peak is known);
    * train/data_wait: fraction of the window spent in `next(loader)`.

    `synchronize` (torch.cuda.synchronize on GPUs) runs before the clock is read at the end of a window
    and before an excluded stretch, so the window holds all the device work queued in it.
    """

    def __init__(self, world_size: int = 1, peak_tflops: float | None = None,
                 clock: Callable[[], float] = time.perf_counter, synchronize: Callable[[], None] | None = None):
        self.world_size, self.peak_tflops, self.clock = world_size, peak_tflops, clock
        self.synchronize = synchronize or (lambda: None)
        self.start()

    def start(self) -> None:
        self.started, self.excluded_s, self.wait_s = self.clock(), 0.0, 0.0
        self.images, self.flops = 0, 0.0

    @contextlib.contextmanager
    def waiting(self):
        """Wrap `next(loader)`."""
        start = self.clock()
        try:
            yield
        finally:
            self.wait_s += self.clock() - start

    @contextlib.contextmanager
    def excluded(self):
        """Time outside training (evaluation, checkpoints, the FLOP count): kept out of the window."""
        self.synchronize()
        start = self.clock()
        try:
            yield
        finally:
            self.synchronize()
            self.excluded_s += self.clock() - start

    def add(self, images: int, flops: float) -> None:
        """One micro-batch of `images` images done on this rank, costing `flops`."""
        self.images += images
        self.flops += flops

    def describe(self, flops_per_image: float, step: int) -> str:
        peak = f"{self.peak_tflops:g} TFLOP/s per device" if self.peak_tflops else "unknown: no train/mfu " \
            "(trainer.peak_tflops)"
        return (f"[ldm] meter: {flops_per_image / 1e9:.4g} GFLOP per image per training step from step {step} "
                f"(forward + backward, FlopCounterMode), peak {peak}")

    def read(self) -> dict[str, float]:
        self.synchronize()
        seconds = max(self.clock() - self.started - self.excluded_s, 1e-9)
        values = {"train/img_per_s": self.images * self.world_size / seconds,
                  "train/data_wait": self.wait_s / seconds,
                  "train/tflops": self.flops / seconds / 1e12}
        if self.peak_tflops:
            values["train/mfu"] = values["train/tflops"] / self.peak_tflops
        self.start()
        return values
