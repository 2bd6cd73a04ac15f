"""Discrete variance-preserving noise schedules (DDPM, Ho et al. 2020).

`x_t = sqrt(ᾱ_t)·x_0 + sqrt(1-ᾱ_t)·ε`, `ᾱ_t = Π_{s<=t} (1-β_s)`, t = 0 … T-1 (0-indexed, as in the
LDM/diffusers code). Everything is computed in float64 and stored in the schedule's dtype (float32 by
default): `cumprod` over 1000 float32 factors loses ~1e-6 relative precision, which is visible in the
SNR of the last steps.
"""
from __future__ import annotations

import math
import warnings
from typing import Any, Callable, Mapping

import torch
from torch import nn

# Default (beta_start, beta_end) per kind: "linear" is DDPM's (Ho et al. 2020, §4: 1e-4 → 0.02);
# "scaled_linear" is LDM / Stable Diffusion's (`linear_start` 0.00085, `linear_end` 0.012).
DEFAULT_BETA_RANGE = {"linear": (1e-4, 0.02), "scaled_linear": (0.00085, 0.012)}


def _linear_betas(num_timesteps: int, beta_start: float, beta_end: float) -> torch.Tensor:
    return torch.linspace(beta_start, beta_end, num_timesteps, dtype=torch.float64)


def _scaled_linear_betas(num_timesteps: int, beta_start: float, beta_end: float) -> torch.Tensor:
    # LDM's "linear" schedule (ldm/modules/diffusionmodules/util.py make_beta_schedule) is linear in sqrt(β).
    return torch.linspace(beta_start**0.5, beta_end**0.5, num_timesteps, dtype=torch.float64) ** 2


def _cosine_betas(num_timesteps: int, beta_start: float, beta_end: float, s: float = 0.008,
                  max_beta: float = 0.999) -> torch.Tensor:
    # Nichol & Dhariwal 2021, eq. 17: ᾱ(t) = f(t)/f(0), f(t) = cos²((t/T + s)/(1 + s) · π/2);
    # β_t = 1 - ᾱ(t+1)/ᾱ(t) clipped to 0.999 to avoid the singularity at t = T. beta_start/end unused.
    steps = torch.arange(num_timesteps + 1, dtype=torch.float64) / num_timesteps
    alpha_bar = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
    return (1 - alpha_bar[1:] / alpha_bar[:-1]).clamp(max=max_beta)


BETA_SCHEDULES: dict[str, Callable[[int, float, float], torch.Tensor]] = {
    "linear": _linear_betas,
    "scaled_linear": _scaled_linear_betas,
    "cosine": _cosine_betas,
}


def make_betas(kind: str, num_timesteps: int = 1000, beta_start: float | None = None,
               beta_end: float | None = None) -> torch.Tensor:
    """float64 betas `(num_timesteps,)`; beta_start/end default per kind (DEFAULT_BETA_RANGE)."""
    if kind not in BETA_SCHEDULES:
        raise ValueError(f"make_betas: unknown schedule kind {kind!r}; choose one of {sorted(BETA_SCHEDULES)}")
    if not isinstance(num_timesteps, int) or num_timesteps < 2:
        raise ValueError(f"make_betas: num_timesteps must be an int >= 2, got {num_timesteps!r}")
    if kind == "cosine" and (beta_start is not None or beta_end is not None):
        warnings.warn(f"make_betas('cosine'): beta_start={beta_start} / beta_end={beta_end} are ignored; the cosine "
                      "schedule is defined by ᾱ(t) alone (Nichol & Dhariwal 2021)", stacklevel=2)
    default_start, default_end = DEFAULT_BETA_RANGE.get(kind, (0.0, 0.0))
    beta_start = default_start if beta_start is None else beta_start
    beta_end = default_end if beta_end is None else beta_end
    if kind != "cosine" and not 0 < beta_start <= beta_end < 1:
        raise ValueError(f"make_betas({kind!r}): need 0 < beta_start <= beta_end < 1, got {beta_start}, {beta_end}")
    return BETA_SCHEDULES[kind](num_timesteps, beta_start, beta_end)


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Lin et al. 2024 ("Common Diffusion Noise Schedules and Sample Steps are Flawed"), Algorithm 1.

    Shift sqrt(ᾱ) so its last value is 0 (SNR(T) = 0: the model sees pure noise at t = T, as at sampling
    time), then scale it so the first value is unchanged. Returns betas (β_T becomes 1). Models trained on
    this must not use ε-prediction at t = T (x0 is not identifiable from ε there; use v, §3.2).
    """
    alphas_bar_sqrt = torch.cumprod(1 - betas.double(), dim=0).sqrt()
    first, last = alphas_bar_sqrt[0].clone(), alphas_bar_sqrt[-1].clone()
    alphas_bar_sqrt = (alphas_bar_sqrt - last) * first / (first - last)
    alphas_bar = alphas_bar_sqrt**2
    alphas = torch.cat([alphas_bar[:1], alphas_bar[1:] / alphas_bar[:-1]])
    return (1 - alphas).to(betas.dtype)


class NoiseSchedule(nn.Module):
    """Per-timestep coefficients as (non-persistent) buffers, so `.to(device)` moves them with the model
    but checkpoints don't store what the config already determines.

    Buffers, all `(T,)`: betas, alphas_cumprod (ᾱ), sqrt_alphas_cumprod (α_t), sqrt_one_minus_alphas_cumprod
    (σ_t), snr (α_t²/σ_t² = ᾱ/(1-ᾱ), Kingma et al. 2021).
    """

    def __init__(self, kind: str = "scaled_linear", num_timesteps: int = 1000, beta_start: float | None = None,
                 beta_end: float | None = None, zero_terminal_snr: bool = False, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.kind, self.zero_terminal_snr = kind, zero_terminal_snr
        betas = make_betas(kind, num_timesteps, beta_start, beta_end)
        if zero_terminal_snr:
            betas = rescale_zero_terminal_snr(betas)
        alphas_cumprod = torch.cumprod(1 - betas, dim=0)
        buffers = {
            "betas": betas,
            "alphas_cumprod": alphas_cumprod,
            "sqrt_alphas_cumprod": alphas_cumprod.sqrt(),
            "sqrt_one_minus_alphas_cumprod": (1 - alphas_cumprod).sqrt(),
            "snr": alphas_cumprod / (1 - alphas_cumprod),
        }
        for name, value in buffers.items():
            self.register_buffer(name, value.to(dtype), persistent=False)

    @classmethod
    def from_config(cls, config: Mapping[str, Any], dtype: torch.dtype = torch.float32) -> "NoiseSchedule":
        """From `{kind, num_timesteps, beta_start, beta_end, zero_terminal_snr}` (all optional)."""
        allowed = {"kind", "num_timesteps", "beta_start", "beta_end", "zero_terminal_snr"}
        unknown = set(config) - allowed
        if unknown:
            raise ValueError(f"NoiseSchedule config: unknown key(s) {sorted(unknown)}; allowed: {sorted(allowed)}")
        return cls(**dict(config), dtype=dtype)

    @property
    def num_timesteps(self) -> int:
        return self.betas.shape[0]

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}, num_timesteps={self.num_timesteps}, zero_terminal_snr={self.zero_terminal_snr}"


def at(coefficients: torch.Tensor, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """`coefficients[t]` shaped `(B, 1, …, 1)` to broadcast against `x` `(B, …)`, in x's dtype/device."""
    if t.ndim != 1 or t.shape[0] != x.shape[0]:
        raise ValueError(f"timesteps t must have shape (B,) = ({x.shape[0]},) to match x, got {tuple(t.shape)}")
    values = coefficients.to(x.device)[t.to(x.device)]
    return values.to(x.dtype).reshape(t.shape[0], *([1] * (x.ndim - 1)))
