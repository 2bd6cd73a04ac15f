"""Shared by the conditioning encoders (ldm/modules/encoders.py, ldm/modules/hf_text.py): the null
caption, the classifier-free-guidance drop mask and the checks on what a conditioner is handed."""

from __future__ import annotations

import torch

from ldm.diffusion import draws

from ldm.modules.tokenizer import _check_captions

NULL_CAPTION = ""  # the text encoders' null condition: an empty prompt (as in Stable Diffusion)


def sample_drop_mask(batch_size: int, rate: float, device=None, generator=None) -> torch.Tensor:
    """BoolTensor (B,): each row dropped to the null condition with probability `rate` (CFG training)."""
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"sample_drop_mask: rate={rate} is not a probability")
    if generator is None:  # per sample inside ldm.diffusion.draws.per_sample (training steps)
        return draws.rand((batch_size,), device=device) < rate
    return torch.rand(batch_size, device=device, generator=generator) < rate


def _check_drop(drop: torch.Tensor | None, batch_size: int, where: str) -> torch.Tensor | None:
    if drop is None:
        return None
    if drop.dtype != torch.bool or drop.shape != (batch_size,):
        raise ValueError(f"{where}: drop must be a BoolTensor of shape ({batch_size},), "
                         f"got {drop.dtype} {tuple(drop.shape)}")
    return drop


def _batch_item(batch: dict, key: str, where: str):
    if key not in batch:
        raise KeyError(f"{where}: the batch has no {key!r} (it has {sorted(batch)})")
    return batch[key]


def _captions_with_nulls(batch: dict, key: str, drop, where: str) -> list[str]:
    captions = _check_captions(_batch_item(batch, key, where), where)
    drop = _check_drop(drop, len(captions), where)
    if drop is None:
        return captions
    return [NULL_CAPTION if d else c for c, d in zip(captions, drop.tolist())]


def _zero_dropped(x: torch.Tensor, drop: torch.Tensor | None) -> torch.Tensor:
    if drop is None:
        return x
    keep = (~drop.to(x.device, non_blocking=True)).to(x.dtype).view(-1, *([1] * (x.dim() - 1)))
    return x * keep
