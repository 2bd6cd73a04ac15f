"""Shared by the conditioning encoders (ldm/modules/encoders.py, ldm/modules/hf_text.py): the
`Conditioner` contract, the null caption, the classifier-free-guidance drop mask and the checks on what a
conditioner is handed."""

from __future__ import annotations

import torch
from torch import nn

from ldm.diffusion import draws

from ldm.modules.tokenizer import _check_captions

NULL_CAPTION = ""  # the text encoders' null condition: an empty prompt (as in Stable Diffusion)


class Conditioner(nn.Module):
    """The conditioner contract: `forward(batch, drop=None, latent_size=None) -> {"context"?, "concat"?}`
    plus the facts its callers need, declared here once with their defaults so that the task, the latent
    cache, sampling and evaluation read them instead of probing for attributes:

    * `context_dim`: width of the cross-attention tokens it returns (None: no tokens);
    * `concat_channels`: channels of the spatial maps it concatenates to z_t (0: none);
    * `caption_key` / `label_key`: the batch field of captions / class labels it reads (None: none);
    * `image_key`: the batch field of pixels it reads (None: none; a latent cache cannot feed it);
    * `needs_mask`: it conditions on inpainting masks, which `masks(batch)` returns;
    * `is_fitted` / `fit_tokenizer(captions)` / `set_tokenizer(tokenizer)`: a tokenizer trained on the
      dataset's captions before training (no-ops for every conditioner that has none).

    A subclass overrides what differs, as a class attribute, an instance attribute or a property."""

    context_dim: int | None = None
    concat_channels: int = 0
    caption_key: str | None = None
    label_key: str | None = None
    image_key: str | None = None
    needs_mask: bool = False

    def parts(self) -> list["Conditioner"]:
        """The conditioners this one is made of (itself; a Composite's members)."""
        return [self]

    def masks(self, batch: dict) -> torch.Tensor:
        raise ValueError(f"{type(self).__name__} does not condition on inpainting masks")

    @property
    def is_fitted(self) -> bool:
        return True  # nothing to fit

    def fit_tokenizer(self, captions: list[str]):
        """Fit the tokenizer on `captions` and return it (None: this conditioner has none)."""
        return None

    def set_tokenizer(self, tokenizer) -> None:
        """Use a tokenizer fitted elsewhere (another rank's `fit_tokenizer`)."""


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
