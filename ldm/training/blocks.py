"""Activation checkpointing and regional `torch.compile`, applied to a model's blocks from outside the
model (torchtitan style): the model files stay plain `nn.Module`s, and the loop (or a benchmark) calls
these two functions in torchtitan's order: channels_last -> activation checkpointing -> compile ->
parallelism (DDP / FSDP).

A *block* is a repeated unit: the UNet's ResBlock, SpatialTransformer and AttentionBlock, the
autoencoder's ResnetBlock and AttnBlock, the text encoder's TransformerBlock. A task names its trainable
blocks (`Task.blocks()`); for a bare model they are found by type.

Both functions act by replacing the block's `forward` on the instance, never by wrapping the module:
the module tree, and so every state-dict key, parameter name (EMA, `ldm.convert` key maps, FSDP units)
and `isinstance` dispatch stays exactly as it was. (torch's `checkpoint_wrapper` and `torch.compile(module)`
insert `_checkpoint_wrapped_module.` / `_orig_mod.` into every parameter name.)

Both only act while gradients are recorded: evaluation and sampling (`no_grad`) run the plain blocks,
so they never trigger a recompile for their batch shapes and never recompute anything.
"""
from __future__ import annotations

import functools

import torch
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

MODES = ("none", "full", "selective")


def block_types() -> tuple[type, ...]:
    from ldm.modules.ae_blocks import AttnBlock, ResnetBlock
    from ldm.modules.attention import SpatialTransformer
    from ldm.modules.encoders import TransformerBlock
    from ldm.modules.unet_blocks import AttentionBlock, ResBlock

    return ResBlock, SpatialTransformer, AttentionBlock, ResnetBlock, AttnBlock, TransformerBlock


def find_blocks(module: nn.Module) -> list[nn.Module]:
    """The blocks a task names (`Task.blocks()`: only trainable ones), or, for a bare model, every
    module of a block type that is not inside another one."""
    from ldm.tasks.base import Task

    if isinstance(module, Task):
        blocks = list(module.blocks())
    else:
        types, blocks, inside = block_types(), [], set()
        for m in module.modules():
            if isinstance(m, types) and id(m) not in inside:
                blocks.append(m)
                inside.update(id(s) for s in m.modules())
    ids = {id(b) for b in blocks}
    for b in blocks:
        nested = [type(s).__name__ for s in b.modules() if s is not b and id(s) in ids]
        if nested:  # checkpointing both would recompute twice; compiling both would nest graphs
            raise ValueError(f"blocks must not nest: a {type(b).__name__} contains {', '.join(nested)}")
    return blocks


# -- activation checkpointing ---------------------------------------------------------------------------

# Selective (op-level) checkpointing, torchtitan's scheme: inside a block, keep the outputs of the
# compute-heavy ops (matmuls, convolutions, attention kernels) and recompute the cheap memory-bound ones
# (GroupNorm/LayerNorm, SiLU/GELU, adds, reshapes) in backward. The norms' and activations' outputs
# are most of a ResBlock's activation memory, and recomputing them costs a few % of the block's FLOPs.
aten = torch.ops.aten
_SAVE = {aten.mm.default, aten.addmm.default, aten.bmm.default, aten.baddbmm.default, aten.convolution.default}


def _compute_heavy(op) -> bool:
    # every fused attention kernel (SDPA flash / efficient / cuDNN / CPU flash, xformers): "attention" in its name
    return op in _SAVE or ("attention" in str(op) and "backward" not in str(op))


def _selective_policy(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if _compute_heavy(op) else CheckpointPolicy.PREFER_RECOMPUTE


_SELECTIVE = functools.partial(create_selective_checkpoint_contexts, _selective_policy)


class _Checkpointed:
    """A block's forward, recomputed in backward (non-reentrant `torch.utils.checkpoint`). A callable
    object, not a closure, so `copy.deepcopy` of the model rebinds it to the copy."""

    def __init__(self, forward, mode: str):
        self.forward, self.mode = forward, mode

    def __call__(self, *args, **kwargs):
        if not torch.is_grad_enabled():
            return self.forward(*args, **kwargs)
        extra = {"context_fn": _SELECTIVE} if self.mode == "selective" else {}
        return checkpoint(self.forward, *args, use_reentrant=False, **extra, **kwargs)


def apply_activation_checkpointing(module: nn.Module, mode: str) -> int:
    """Recompute the activations of every block of `module` in backward: `full` stores only each
    block's inputs, `selective` also its matmul / convolution / attention outputs; `none` removes it
    again. Returns the number of blocks checkpointed. Call before `compile_blocks`."""
    if mode not in MODES:
        raise ValueError(f"activation_checkpointing={mode!r}: choose one of {', '.join(MODES)}")
    blocks = find_blocks(module)
    for block in blocks:
        forward = block.__dict__.get("forward")
        if isinstance(forward, _Compiled):
            raise ValueError(f"apply_activation_checkpointing after compile_blocks ({type(block).__name__}): "
                             "checkpoint first, so the compiled code holds the recomputation")
        if isinstance(forward, _Checkpointed):
            _restore(block, forward.forward)
        if mode != "none":
            block.forward = _Checkpointed(block.forward, mode)
    return 0 if mode == "none" else len(blocks)


def _restore(block: nn.Module, forward) -> None:
    if getattr(forward, "__func__", None) is type(block).forward and forward.__self__ is block:
        del block.forward  # the class's own forward again
    else:
        block.forward = forward


# -- regional compile -----------------------------------------------------------------------------------

class _Compiled:
    """A block's forward compiled with `torch.compile`, used while gradients are recorded. Compilation
    is lazy: a failure (no C compiler, an unsupported op, a dynamo error) surfaces at the first call. Then
    the block runs eagerly, and so does every block of its type compiled in the same call: `failed`
    is shared by them, and one line says why."""

    def __init__(self, forward, kind: str, failed: dict[str, str]):
        self.forward, self.kind, self.failed = forward, kind, failed
        # Static shapes: each block shape gets its own specialised kernels (a UNet has a handful of
        # shapes per block type; dynamic shapes would serve them all with slower generic kernels).
        self.compiled = torch.compile(forward, dynamic=False)

    def __call__(self, *args, **kwargs):
        if not torch.is_grad_enabled() or self.kind in self.failed:
            return self.forward(*args, **kwargs)
        try:
            return self.compiled(*args, **kwargs)
        except Exception as error:  # noqa: BLE001 - any compiler failure; a broken block fails below too
            out = self.forward(*args, **kwargs)  # raises the block's own error if it is not the compiler's
            reason = " ".join(str(error).split())[:300]
            self.failed[self.kind] = reason
            print(f"[ldm] torch.compile failed for {self.kind} blocks, running them eagerly: "
                  f"{type(error).__name__}: {reason}", flush=True)
            return out


def compile_blocks(module: nn.Module) -> int:
    """`torch.compile` each block of `module` separately (regional compilation: a block's graph
    compiles in seconds, a whole SD UNet took minutes). Blocks of the same type and shape share one
    compiled graph: the compiled code belongs to the forward's code object, and parameters are graph
    inputs (dynamo inlines nn.Modules), so identical blocks hit the same cache entry. Returns the
    number of blocks compiled. State-dict keys are unchanged (`torch.compile(module)` would add `_orig_mod.`)."""
    blocks = find_blocks(module)
    # One cache entry per distinct block shape, all on the same code object: raise dynamo's limit
    # (8 by default) so a UNet's dozen shapes are not silently run eagerly after the eighth.
    config = torch._dynamo.config
    config.recompile_limit = max(config.recompile_limit, len(blocks))
    config.accumulated_recompile_limit = max(config.accumulated_recompile_limit, 4 * len(blocks))
    failed: dict[str, str] = {}
    for block in blocks:
        if isinstance(block.__dict__.get("forward"), _Compiled):
            raise ValueError(f"compile_blocks: a {type(block).__name__} is already compiled")
        block.forward = _Compiled(block.forward, type(block).__name__, failed)
    return len(blocks)
