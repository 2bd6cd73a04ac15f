"""The diffusion training objective: forward process, regression targets, loss weights.

Notation (Kingma et al. 2021, Salimans & Ho 2022): α_t = sqrt(ᾱ_t), σ_t = sqrt(1-ᾱ_t), α_t² + σ_t² = 1,
x_t = α_t·x0 + σ_t·ε. Parameterisations of the network output:
  "eps": ε (DDPM, Ho et al. 2020, eq. 14, the simplified loss ‖ε - ε_θ(x_t, t)‖²; what LDM trains)
  "x0":  x0 directly
  "v":   v = α_t·ε - σ_t·x0 (Salimans & Ho 2022, §4 and Appendix D; Stable Diffusion 2)
"""
from __future__ import annotations

from typing import Callable

import torch

from ldm.diffusion import draws
from ldm.diffusion.schedule import NoiseSchedule, at

PARAMETERIZATIONS = ("eps", "x0", "v")


def _check_parameterization(parameterization: str, where: str) -> None:
    if parameterization not in PARAMETERIZATIONS:
        raise ValueError(f"{where}: unknown parameterization {parameterization!r}; choose one of {PARAMETERIZATIONS}")


def add_noise(schedule: NoiseSchedule, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Sample q(x_t | x0) = N(α_t·x0, σ_t²·I) by reparameterisation (Ho et al. 2020, eq. 4)."""
    return at(schedule.sqrt_alphas_cumprod, t, x0) * x0 + at(schedule.sqrt_one_minus_alphas_cumprod, t, x0) * noise


def get_velocity(schedule: NoiseSchedule, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """v = α_t·ε - σ_t·x0 (Salimans & Ho 2022, Appendix D)."""
    return at(schedule.sqrt_alphas_cumprod, t, x0) * noise - at(schedule.sqrt_one_minus_alphas_cumprod, t, x0) * x0


_TARGETS: dict[str, Callable[..., torch.Tensor]] = {
    "eps": lambda schedule, x0, noise, t: noise,
    "x0": lambda schedule, x0, noise, t: x0,
    "v": get_velocity,
}


def target(schedule: NoiseSchedule, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor,
           parameterization: str = "eps") -> torch.Tensor:
    """What the network regresses on for `parameterization` ("eps" | "x0" | "v")."""
    _check_parameterization(parameterization, "target")
    return _TARGETS[parameterization](schedule, x0, noise, t)


# (α, σ, x_t, output) -> (x0, ε): invert x_t = α·x0 + σ·ε given one of ε, x0 or v.
_TO_X0_EPS: dict[str, Callable[..., tuple[torch.Tensor, torch.Tensor]]] = {
    "eps": lambda a, s, xt, eps: ((xt - s * eps) / a, eps),
    "x0": lambda a, s, xt, x0: (x0, (xt - a * x0) / s),
    # From v = α·ε - σ·x0 and α² + σ² = 1: x0 = α·x_t - σ·v, ε = σ·x_t + α·v (Salimans & Ho 2022, App. D).
    "v": lambda a, s, xt, v: (a * xt - s * v, s * xt + a * v),
}


def predict_x0_eps(schedule: NoiseSchedule, model_output: torch.Tensor, xt: torch.Tensor, t: torch.Tensor,
                   parameterization: str = "eps") -> tuple[torch.Tensor, torch.Tensor]:
    """The network's implied (x0, ε) at x_t. "eps" divides by α_t (undefined where SNR = 0, e.g. the last
    step of a zero-terminal-SNR schedule), "x0" divides by σ_t (> 0 for every t >= 0)."""
    _check_parameterization(parameterization, "predict_x0_eps")
    alpha = at(schedule.sqrt_alphas_cumprod, t, xt)
    sigma = at(schedule.sqrt_one_minus_alphas_cumprod, t, xt)
    return _TO_X0_EPS[parameterization](alpha, sigma, xt, model_output)


# Min-SNR-γ (Hang et al. 2023, eq. 8 and §3.4): weight the x0-space loss by min(SNR, γ). An ε-space MSE
# equals SNR × the x0-space MSE and a v-space MSE equals (SNR + 1) × it, so divide those out.
_MIN_SNR_FOR: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    # limit of min(snr, γ)/snr as snr → 0 is 1 (zero-terminal-SNR schedules reach snr = 0 exactly).
    "eps": lambda snr, clipped: torch.where(snr > 0, clipped / snr.clamp(min=torch.finfo(snr.dtype).tiny), 1.0),
    "v": lambda snr, clipped: clipped / (snr + 1),
    "x0": lambda snr, clipped: clipped,
}

LOSS_WEIGHTS: dict[str, Callable[..., torch.Tensor]] = {
    "uniform": lambda snr, parameterization, gamma: torch.ones_like(snr),
    "min_snr": lambda snr, parameterization, gamma: _MIN_SNR_FOR[parameterization](snr, snr.clamp(max=gamma)),
}


def loss_weight(schedule: NoiseSchedule, t: torch.Tensor, parameterization: str = "eps", kind: str = "uniform",
                gamma: float = 5.0) -> torch.Tensor:
    """Per-sample weight `(B,)` for the MSE in the `parameterization` space. gamma = 5 (Hang et al. 2023, §4)."""
    _check_parameterization(parameterization, "loss_weight")
    if kind not in LOSS_WEIGHTS:
        raise ValueError(f"loss_weight: unknown weighting {kind!r}; choose one of {sorted(LOSS_WEIGHTS)}")
    snr = schedule.snr.to(t.device)[t]
    return LOSS_WEIGHTS[kind](snr, parameterization, gamma)


def offset_noise(noise: torch.Tensor, strength: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """ε + strength·N(0, 1) per (sample, channel), constant over space (Guttenberg 2023, "Diffusion with
    offset noise"): lets the model change an image's mean brightness, which plain ε keeps ~fixed at high t.
    strength 0.1 is the usual value."""
    if strength == 0:
        return noise
    shape = (noise.shape[0], noise.shape[1]) + (1,) * (noise.ndim - 2)
    device = generator.device if generator is not None else noise.device
    if generator is None:  # per sample inside ldm.diffusion.draws.per_sample (training steps)
        offset = draws.randn(shape, device=device, dtype=noise.dtype)
    else:
        offset = torch.randn(shape, generator=generator, device=device, dtype=noise.dtype).to(noise.device)
    return noise + strength * offset


def diffusion_loss(schedule: NoiseSchedule, model_output: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor,
                   t: torch.Tensor, parameterization: str = "eps", weighting: str = "uniform",
                   min_snr_gamma: float = 5.0) -> torch.Tensor:
    """Per-sample weighted MSE `(B,)`: w(t)·mean ‖model_output - target‖² (Ho et al. 2020, eq. 14 when
    parameterization="eps", weighting="uniform"). Computed in float32 at least (bf16 outputs are upcast)."""
    if model_output.shape != x0.shape:
        raise ValueError(f"diffusion_loss: model_output shape {tuple(model_output.shape)} != x0 shape {tuple(x0.shape)}")
    dtype = torch.promote_types(model_output.dtype, torch.float32)
    goal = target(schedule, x0.to(dtype), noise.to(dtype), t, parameterization)
    mse = (model_output.to(dtype) - goal).pow(2).flatten(1).mean(dim=1)
    return loss_weight(schedule, t, parameterization, weighting, min_snr_gamma).to(dtype) * mse
