"""Everything that changes how a task runs, applied from outside the model in torchtitan's order
(`parallelize_*`): channels_last -> activation checkpointing -> compile -> data parallelism. The model
files stay plain `nn.Module`s and the loop calls only `parallelize()`, then the module it returns.

Why this order: the compiled blocks must hold the recomputation (checkpoint first, then compile), and
parallelism comes last, since FSDP replaces the parameters with shards; the optimizers and the EMA are
built after it, from those. Checkpointing and compile act on `task.blocks()` in place
(ldm/training/blocks.py): parameter names and state-dict keys are unchanged.

`trainer.strategy`:
* `ddp`  — every rank holds the whole model; Accelerate wraps it in DistributedDataParallel.
* `fsdp` — FSDP2 (`torch.distributed.fsdp.fully_shard`): parameters, gradients, optimizer state and the
  EMA are sharded over the ranks, one all-gather unit per block the task names (`task.shard_units()`).
  Optimizers must be built AFTER this, from the sharded (DTensor) parameters.

Why not Accelerate's FSDP plugin: with `cpu=True` (gloo, our CPU tests and CI) Accelerate silently
ignores it and keeps plain DDP (measured, Accelerate 1.16). `fully_shard` works on CPU and GPU alike, so
one code path is tested everywhere.
"""
from __future__ import annotations

import torch
from torch import nn

from ldm.training.blocks import apply_activation_checkpointing, compile_blocks


def parallelize(task: nn.Module, trainer, accelerator) -> nn.Module:
    """Apply `trainer.channels_last`, `.activation_checkpointing`, `.compile` and `.strategy` to `task`, in
    that order; return the module the training loop calls (`task` sharded in place, or DDP-wrapped)."""
    if trainer.channels_last:
        task.to(memory_format=torch.channels_last)
    recompute = trainer.activation_checkpointing.value
    blocks = apply_activation_checkpointing(task, recompute)
    if trainer.compile:
        blocks = compile_blocks(task)
    if (recompute != "none" or trainer.compile) and accelerator.is_main_process:
        print(f"[ldm] activation checkpointing {recompute}, compile {'on' if trainer.compile else 'off'}: "
              f"{blocks} blocks of {type(task).__name__}", flush=True)
    return _data_parallel(task, trainer.strategy.value, accelerator)


def _data_parallel(task: nn.Module, strategy: str, accelerator) -> nn.Module:
    if strategy == "fsdp" and accelerator.num_processes > 1:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        units = task.shard_units()
        if not units:
            raise ValueError(f"trainer.strategy=fsdp: {type(task).__name__} names no modules to shard "
                             "(task.shard_units()); use trainer.strategy=ddp")
        device = accelerator.device
        task.to(device)
        mesh = init_device_mesh(device.type, (accelerator.num_processes,))
        # bf16 all-gathers and compute, fp32 gradient reduction and master weights (as Accelerate's plugin does)
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(accelerator.mixed_precision)
        policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32) if dtype else MixedPrecisionPolicy()
        for unit in units:
            fully_shard(unit, mesh=mesh, mp_policy=policy)
        return task
    if strategy == "fsdp" and accelerator.is_main_process:
        print("[ldm] trainer.strategy=fsdp with one process: nothing to shard, training unsharded", flush=True)
    return accelerator.prepare(task)


def whole(t: torch.Tensor) -> torch.Tensor:
    """A DTensor shard (FSDP) gathered to the whole tensor (a collective: every rank calls it); plain
    tensors pass through."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t  # a DTensor, duck-typed (no distributed import)


def is_sharded(module: nn.Module) -> bool:
    return any(hasattr(p, "device_mesh") for p in module.parameters())  # DTensor parameters: sharded by FSDP2
