"""Exponential moving average of a module's weights (used for sampling in stage 2)."""
from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from ldm.training.parallel import whole


def _sharded_parameters(module: nn.Module) -> list[torch.Tensor]:
    """`module`'s parameters in their sharded form under FSDP2: the root stays unsharded after a forward
    (reshard_after_forward), and then `parameters()` would hand back the gathered plain tensors."""
    for m in module.modules():
        if hasattr(m, "reshard") and hasattr(m, "unshard"):  # an FSDPModule
            m.reshard()
    return list(module.parameters())


class EMA(nn.Module):
    """Shadow weights of `module` updated as  θ_ema ← d·θ_ema + (1−d)·θ.

    With `warmup`, d = min(decay, (1 + n) / (10 + n)) after n updates, so early weights are not
    frozen at their random initialisation. The shadow holds one tensor per parameter and buffer of
    `module`, cloned from it: under FSDP those are DTensor shards, so the EMA shards with the model and
    each rank averages only its own shard. Every rank calls `update` (DDP keeps the weights identical,
    so the EMAs stay identical; updating on rank 0 only is a known fault elsewhere).
    """

    def __init__(self, module: nn.Module, decay: float = 0.9999, warmup: bool = True):
        super().__init__()
        self.decay, self.warmup = decay, warmup
        self.names = [n for n, _ in module.named_parameters()]
        self.buffer_names = [n for n, _ in module.named_buffers()]
        self.params = [p.detach().clone() for p in module.parameters()]
        self.buffers_ = [b.detach().clone() for b in module.buffers()]
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))

    def current_decay(self) -> float:
        n = int(self.num_updates)
        return min(self.decay, (1 + n) / (10 + n)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, module: nn.Module, skip: torch.Tensor | None = None) -> None:
        """One EMA step towards `module`'s weights. `skip` (a 0-dim device flag, 1 = the optimizer step was
        skipped, ldm/training/guard.py) makes it a no-op without reading the flag on the host: the
        weight 1 - d is multiplied by 1 - skip and num_updates grows by 1 - skip. The decay is computed
        on the device in float64, as Python computed it, so the update is bit-identical to a host one."""
        n = self.num_updates.double()
        d = torch.clamp((1 + n) / (10 + n), max=self.decay) if self.warmup else torch.full_like(n, self.decay)
        keep = 1 - skip.double() if skip is not None else torch.ones_like(n)
        params = [p.detach() for p in _sharded_parameters(module)]
        if params:
            torch._foreach_lerp_(self.params, params, ((1 - d) * keep).to(self.params[0].dtype))
        for b_ema, b in zip(self.buffers_, module.buffers()):
            b_ema.copy_(b)
        self.num_updates += keep.long()

    def to(self, *args, **kwargs):
        super().to(*args, **kwargs)
        self.params = [p.to(*args, **kwargs) for p in self.params]
        self.buffers_ = [b.to(*args, **kwargs) for b in self.buffers_]
        return self

    # Checkpoint format: `shadow.<name>` for each parameter and buffer of the module, plus num_updates
    # (the keys a module's state_dict would have). Under FSDP, `state_dict` gathers the shards: call it
    # on every rank.
    def state_dict(self, *args, **kwargs) -> dict[str, torch.Tensor]:
        state = {f"shadow.{n}": whole(t).detach().cpu() for n, t in zip(self.names, self.params)}
        state.update({f"shadow.{n}": whole(t).detach().cpu() for n, t in zip(self.buffer_names, self.buffers_)})
        state["num_updates"] = self.num_updates.detach().cpu()
        return state

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor], strict: bool = True):
        expected = {f"shadow.{n}" for n in self.names + self.buffer_names} | {"num_updates"}
        if set(state) != expected:
            raise ValueError(f"EMA state does not match the model: missing {sorted(expected - set(state))[:5]}, "
                             f"unexpected {sorted(set(state) - expected)[:5]}")
        for n, t in zip(self.names + self.buffer_names, self.params + self.buffers_):
            _copy_full_into(t, state[f"shadow.{n}"])
        self.num_updates.copy_(state["num_updates"])

    @torch.no_grad()
    def load_shadow(self, module_state: dict[str, torch.Tensor]) -> None:
        """Start the EMA from given weights of the module (e.g. a pretrained EMA, `model.init_from`)."""
        missing = [n for n in self.names if n not in module_state]
        if missing:
            raise ValueError(f"EMA weights lack parameters {missing[:5]}")
        for n, t in zip(self.names + self.buffer_names, self.params + self.buffers_):
            if n in module_state:
                _copy_full_into(t, module_state[n])

    @contextmanager
    def swapped_into(self, module: nn.Module):
        """Temporarily load the EMA weights into `module` (for evaluation / sampling), then restore."""
        params = _sharded_parameters(module)
        backup = [p.detach().clone() for p in params]
        with torch.no_grad():
            for p, q in zip(params, self.params):
                p.copy_(q)
        try:
            yield module
        finally:
            with torch.no_grad():
                for p, b in zip(_sharded_parameters(module), backup):
                    p.copy_(b)


def _copy_full_into(target: torch.Tensor, full: torch.Tensor) -> None:
    """Copy a whole tensor into `target`, which may be a DTensor shard of it (its local piece is cut
    from `full` with the target's own placements)."""
    if hasattr(target, "device_mesh"):  # a DTensor shard: duck-typed, torch.distributed.tensor may be absent
        from torch.distributed.tensor import distribute_tensor

        piece = distribute_tensor(full.to(target.to_local().device, target.dtype), target.device_mesh,
                                  target.placements, src_data_rank=None)  # every rank holds `full`: no comms
        target.to_local().copy_(piece.to_local())
    else:
        target.copy_(full)
