"""Reconstruction metrics: PSNR, SSIM (Wang et al. 2004), LPIPS (Zhang et al. 2018).

Images come in [-1, 1] (the batch contract) and are compared on [0, 1] (data range 1), per image:
every function returns a (B,) tensor; the caller averages.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _to_unit_range(x: torch.Tensor) -> torch.Tensor:
    if x.dim() != 4:
        raise ValueError(f"metrics expect images (B, C, H, W), got shape {tuple(x.shape)}")
    return ((x.float() + 1.0) / 2.0).clamp(0.0, 1.0)


def psnr(x: torch.Tensor, y: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    """10 log10(1 / MSE) per image, on [0, 1]."""
    mse = (_to_unit_range(x) - _to_unit_range(y)).pow(2).mean(dim=(1, 2, 3))
    return 10.0 * torch.log10(1.0 / (mse + eps))


def _gaussian_window(size: int, sigma: float, channels: int, device, dtype) -> torch.Tensor:
    coords = torch.arange(size, device=device, dtype=dtype) - (size - 1) / 2
    g = torch.exp(-0.5 * (coords / sigma) ** 2)
    g = g / g.sum()
    return (g[:, None] * g[None, :]).expand(channels, 1, size, size).contiguous()


def ssim(x: torch.Tensor, y: torch.Tensor, window_size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Mean SSIM per image with an 11x11 Gaussian window (sigma 1.5), K1 0.01, K2 0.03, on [0, 1].

    Only windows fully inside the image count ("valid" convolution), which equals scikit-image's
    `structural_similarity(gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
    data_range=1)` since it crops (win_size-1)/2 border pixels before averaging; channels averaged.
    """
    x, y = _to_unit_range(x).double(), _to_unit_range(y).double()  # float64: E[x^2]-E[x]^2 cancels badly
    if min(x.shape[-2:]) < window_size:
        raise ValueError(f"ssim: images {tuple(x.shape[-2:])} are smaller than the {window_size}px window")
    window = _gaussian_window(window_size, sigma, x.shape[1], x.device, x.dtype)
    blur = lambda t: F.conv2d(t, window, groups=x.shape[1])  # noqa: E731
    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x ** 2
    var_y = blur(y * y) - mu_y ** 2
    cov_xy = blur(x * y) - mu_x * mu_y
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov_xy + c2)) / ((mu_x ** 2 + mu_y ** 2 + c1) * (var_x + var_y + c2))
    return ssim_map.mean(dim=(1, 2, 3)).float()


def lpips_metric_name(lpips_model: torch.nn.Module | None) -> str:
    """`lpips` for the published metric (pretrained backbone), `lpips_random` for a random backbone, so a
    number from a random LPIPS is never reported under the published name."""
    return "lpips" if getattr(lpips_model, "pretrained", False) else "lpips_random"


def lpips_distance(lpips_model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """LPIPS per image for images in [-1, 1] with a module from `ldm.losses.lpips.build_lpips`."""
    return lpips_model(x.float(), y.float()).flatten()
