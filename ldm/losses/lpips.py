"""LPIPS perceptual distance (Zhang et al. 2018) for the stage-1 loss and metrics.

The `lpips` package ships its linear heads (`weights/v0.1/{net}.pth`) but not the torchvision
backbone. We use the pretrained backbone only when its weights already sit in the local torch hub
cache; otherwise we build a random backbone (`pnet_rand=True`) and say so in ONE warning line.
Nothing is ever downloaded.
"""
from __future__ import annotations

import copy
import functools
import logging
import os
import warnings

import torch
from torch import nn

logger = logging.getLogger(__name__)

# torchvision's backbone weight files, as torchvision names them in `<hub dir>/checkpoints/`.
BACKBONE_WEIGHT_FILES = {
    "vgg": "vgg16-397923af.pth",
    "alex": "alexnet-owt-7be5be79.pth",
    "squeeze": "squeezenet1_1-b8a52dc0.pth",
}


def cached_backbone_path(net: str) -> str:
    return os.path.join(torch.hub.get_dir(), "checkpoints", BACKBONE_WEIGHT_FILES[net])


class FrozenLPIPS(nn.Module):
    """Wraps `lpips.LPIPS` so it stays in eval() (its heads have dropout) when a parent calls .train()."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner.eval().requires_grad_(False)

    def train(self, mode: bool = True) -> "FrozenLPIPS":
        return super().train(False)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        # Frozen, but NOT under no_grad: the loss needs d(lpips)/d(reconstruction) to reach the decoder.
        return self.inner(x, y)


def build_lpips(net: str = "vgg") -> nn.Module:
    """A frozen LPIPS module: `lpips(x, y) -> (B, 1, 1, 1)` for images in [-1, 1], differentiable in x, y."""
    if net not in BACKBONE_WEIGHT_FILES:
        raise ValueError(f"build_lpips: net must be one of {sorted(BACKBONE_WEIGHT_FILES)}, got {net!r}")
    return copy.deepcopy(_build_lpips(net, os.path.isfile(cached_backbone_path(net))))


@functools.lru_cache(maxsize=None)
def _build_lpips(net: str, pretrained_backbone: bool) -> nn.Module:
    """Built once per process (torchvision builds VGG's 120M-parameter classifier only to drop it: ~10 s
    on a small CPU). The random backbone is drawn from a fixed seed, so "random LPIPS" is the same
    function in every process and run, and building it never moves the caller's RNG."""
    import lpips

    backbone = cached_backbone_path(net)
    pretrained_backbone = os.path.isfile(backbone)
    if not pretrained_backbone:
        logger.warning(f"LPIPS: no pretrained {net} backbone at {backbone}; using a RANDOM backbone "
                       f"(perceptual loss/metric values are not comparable to published LPIPS)")
    with warnings.catch_warnings():  # torchvision's `pretrained=` deprecation notice inside lpips
        warnings.simplefilter("ignore")
        with torch.random.fork_rng():
            torch.manual_seed(0)
            model = lpips.LPIPS(net=net, pnet_rand=not pretrained_backbone, verbose=False)
    return FrozenLPIPS(model)
