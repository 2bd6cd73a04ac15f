"""PatchGAN discriminator (Isola et al. 2017, pix2pix) as used by taming / LDM stage 1 (Sec. 3.1)."""
from __future__ import annotations

import torch
from torch import nn


def _init_weights(module: nn.Module) -> None:
    # pix2pix / taming init: conv ~ N(0, 0.02), norm scale ~ N(1, 0.02).
    if isinstance(module, nn.Conv2d):
        nn.init.normal_(module.weight, 0.0, 0.02)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


class NLayerDiscriminator(nn.Module):
    """x (B, input_nc, H, W) -> patch logits (B, 1, h, w): each logit judges one receptive-field patch
    (70x70 px for n_layers=3). Layer names (`main.{i}`) match taming's so its weights load."""

    def __init__(self, input_nc: int = 3, ndf: int = 64, n_layers: int = 3):
        super().__init__()
        kernel, pad = 4, 1
        layers: list[nn.Module] = [nn.Conv2d(input_nc, ndf, kernel, 2, pad), nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, n_layers + 1):
            previous, mult = mult, min(2 ** n, 8)
            stride = 2 if n < n_layers else 1  # the last hidden layer keeps the resolution
            layers += [nn.Conv2d(ndf * previous, ndf * mult, kernel, stride, pad, bias=False),
                       nn.BatchNorm2d(ndf * mult), nn.LeakyReLU(0.2, True)]
        layers.append(nn.Conv2d(ndf * mult, 1, kernel, 1, pad))
        self.main = nn.Sequential(*layers)
        self.apply(_init_weights)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x)
