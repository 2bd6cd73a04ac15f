"""Samplers for discrete-time VP diffusion models, as plain functions with one signature (k-diffusion style):

    sample_<name>(model_fn, x_T, schedule, *, steps, parameterization="eps", generator=None, callback=None,
                  **opts) -> x0

`model_fn(x_t, t)` gets `t` as a LongTensor `(B,)` of training timesteps (0 … T-1) and returns the raw network
output in `parameterization` ("eps" | "x0" | "v"). Every sampler visits a descending subset of `steps`
training timesteps (see `make_timesteps`) and ends with ᾱ = 1, i.e. its last update returns the model's x0
prediction at the smallest visited timestep (diffusers' `set_alpha_to_one=True`, `final_sigmas_type="zero"`).
Coefficients are computed from float64 python floats; the arithmetic on x runs in x_T's dtype.

`callback(info)` is called after each step with {"i", "t", "x", "x0"} (x0: the model's current prediction).
Classifier-free guidance wraps the network into a `model_fn`: `cfg_model_fn(model, cond, uncond, scale)`.
img2img (SDEdit) starts any sampler part-way: `timesteps=img2img_timesteps(...)` from a noised latent.
Inpainting wraps a `model_fn` too: `known_region_model_fn` pins the prediction in the region to keep.
"""
from __future__ import annotations

import math
from typing import Callable, Mapping

import torch

from ldm.diffusion.objective import PARAMETERIZATIONS, predict_x0_eps
from ldm.diffusion.schedule import NoiseSchedule, at

ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

# Timestep spacings: the rows of Table 2 in Lin et al. 2024. "trailing" is the default because it always
# starts at t = T-1, the noise level x_T ~ N(0, I) was drawn for; "leading" (LDM/SD-v1, with offset 1) and
# "linspace" start below it, a train/test mismatch that is worst with few steps.
SPACINGS: dict[str, Callable[[int, int, int], torch.Tensor]] = {
    "linspace": lambda T, n, offset: torch.linspace(0, T - 1, n, dtype=torch.float64).round().flip(0) + offset,
    "leading": lambda T, n, offset: (torch.arange(n, dtype=torch.float64) * (T // n)).flip(0) + offset,
    "trailing": lambda T, n, offset: (T - torch.arange(n, dtype=torch.float64) * (T / n)).round() - 1 + offset,
}
DEFAULT_SPACING = "trailing"


def make_timesteps(num_train_timesteps: int, steps: int, spacing: str = DEFAULT_SPACING,
                   offset: int = 0) -> torch.Tensor:
    """Descending LongTensor `(steps,)` of training timesteps (same values as diffusers' `set_timesteps`
    for DDIM/DDPM/PNDM with `timestep_spacing=spacing`, `steps_offset=offset`)."""
    if spacing not in SPACINGS:
        raise ValueError(f"make_timesteps: unknown spacing {spacing!r}; choose one of {sorted(SPACINGS)}")
    if not isinstance(steps, int) or not 1 <= steps <= num_train_timesteps:
        raise ValueError(f"make_timesteps: steps must be an int in [1, {num_train_timesteps}], got {steps!r}")
    return SPACINGS[spacing](num_train_timesteps, steps, offset).long()


def img2img_timesteps(num_train_timesteps: int, steps: int, strength: float, spacing: str = DEFAULT_SPACING,
                      offset: int = 0) -> torch.Tensor:
    """SDEdit (Meng et al. 2022): the last max(1, int(steps·strength)) of the `steps` timesteps, i.e. start at
    t ≈ strength·T from the input's noised latent (diffusers' img2img pipelines count the same way).
    strength = 1 starts from (almost) pure noise, strength → 0 changes little."""
    if not 0.0 < strength <= 1.0:
        raise ValueError(f"img2img_timesteps: strength={strength} must be in (0, 1]")
    full = make_timesteps(num_train_timesteps, steps, spacing, offset)
    return full[steps - max(1, min(int(steps * strength), steps)):]


def _resolve_timesteps(schedule: NoiseSchedule, steps: int | None, spacing: str, offset: int,
                       timesteps, parameterization: str, sampler: str) -> list[int]:
    if parameterization not in PARAMETERIZATIONS:
        raise ValueError(f"{sampler}: unknown parameterization {parameterization!r}; choose one of {PARAMETERIZATIONS}")
    if timesteps is None:
        if steps is None:
            raise ValueError(f"{sampler}: pass steps (or an explicit timesteps list)")
        timesteps = make_timesteps(schedule.num_timesteps, steps, spacing, offset)
    timesteps = [int(t) for t in timesteps]
    if steps is not None and steps != len(timesteps):
        raise ValueError(f"{sampler}: steps={steps} but {len(timesteps)} timesteps were given")
    if not timesteps or any(b >= a for a, b in zip(timesteps, timesteps[1:])):
        raise ValueError(f"{sampler}: timesteps must be non-empty and strictly decreasing, got {timesteps}")
    if timesteps[-1] < 0 or timesteps[0] >= schedule.num_timesteps:
        raise ValueError(f"{sampler}: timesteps must lie in [0, {schedule.num_timesteps - 1}], got {timesteps}")
    if parameterization == "eps" and float(schedule.alphas_cumprod[timesteps[0]]) == 0.0:
        # Zero terminal SNR: x_t is pure noise, so x0 = (x_t - σ·ε)/α is 0/0 (Lin et al. 2024, §3.2).
        raise ValueError(f"{sampler}: ε-prediction cannot be sampled from t={timesteps[0]} where ᾱ_t = 0 "
                         "(zero-terminal-SNR schedule); train with v- or x0-prediction")
    return timesteps


def _alpha_bars(schedule: NoiseSchedule, timesteps: list[int]) -> list[float]:
    """ᾱ at each visited timestep, then 1.0 for the end point x0."""
    return schedule.alphas_cumprod.detach().double().cpu()[timesteps].tolist() + [1.0]


def _denoise(model_fn: ModelFn, x: torch.Tensor, t: int, schedule: NoiseSchedule,
             parameterization: str) -> tuple[torch.Tensor, torch.Tensor]:
    t_batch = torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)
    output = model_fn(x, t_batch)
    if output.shape != x.shape:
        raise ValueError(f"model_fn returned shape {tuple(output.shape)} at t={t}, expected {tuple(x.shape)}")
    return predict_x0_eps(schedule, output.to(x.dtype), x, t_batch, parameterization)


def _randn_like(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    device = generator.device if generator is not None else x.device
    return torch.randn(x.shape, generator=generator, device=device, dtype=x.dtype).to(x.device)


def _report(callback, i: int, t: int, x: torch.Tensor, x0: torch.Tensor) -> None:
    if callback is not None:
        callback({"i": i, "t": t, "x": x, "x0": x0})


def sample_ddpm(model_fn: ModelFn, x_T: torch.Tensor, schedule: NoiseSchedule, *, steps: int | None,
                parameterization: str = "eps", generator: torch.Generator | None = None, callback=None,
                spacing: str = DEFAULT_SPACING, offset: int = 0, timesteps=None) -> torch.Tensor:
    """Ancestral sampling from the posterior q(x_s | x_t, x0̂) (Ho et al. 2020, eqs. 6–7) with the full
    posterior variance β̃ ("fixed small"), on a spaced subset: β'_t = 1 - ᾱ_t/ᾱ_s (Nichol & Dhariwal 2021, §4)."""
    timesteps = _resolve_timesteps(schedule, steps, spacing, offset, timesteps, parameterization, "sample_ddpm")
    alpha_bars = _alpha_bars(schedule, timesteps)
    x = x_T
    for i, t in enumerate(timesteps):
        x0, _ = _denoise(model_fn, x, t, schedule, parameterization)
        a, a_prev = alpha_bars[i], alpha_bars[i + 1]
        beta = 1 - a / a_prev
        x0_coef = math.sqrt(a_prev) * beta / (1 - a)            # eq. 7, μ̃ coefficient of x0
        xt_coef = math.sqrt(1 - beta) * (1 - a_prev) / (1 - a)  # eq. 7, μ̃ coefficient of x_t
        variance = beta * (1 - a_prev) / (1 - a)                # eq. 7, β̃
        x = x0_coef * x0 + xt_coef * x
        if variance > 0:
            x = x + math.sqrt(variance) * _randn_like(x, generator)
        _report(callback, i, t, x, x0)
    return x


def _ddim_step(x0: torch.Tensor, eps: torch.Tensor, a: float, a_prev: float, eta: float,
               generator: torch.Generator | None) -> torch.Tensor:
    # Song et al. 2021, eq. 12, with σ_t(η) of eq. 16 (η = 1: DDPM's posterior variance, η = 0: deterministic).
    sigma = eta * math.sqrt((1 - a_prev) / (1 - a) * (1 - a / a_prev)) if a_prev < 1 else 0.0
    x = math.sqrt(a_prev) * x0 + math.sqrt(max(1 - a_prev - sigma**2, 0.0)) * eps
    return x + sigma * _randn_like(x, generator) if sigma > 0 else x


def sample_ddim(model_fn: ModelFn, x_T: torch.Tensor, schedule: NoiseSchedule, *, steps: int | None,
                parameterization: str = "eps", generator: torch.Generator | None = None, callback=None,
                eta: float = 0.0, spacing: str = DEFAULT_SPACING, offset: int = 0, timesteps=None) -> torch.Tensor:
    """DDIM (Song et al. 2021). eta = 0 is deterministic given x_T (the probability-flow ODE's first-order
    solver); eta = 1 matches DDPM ancestral sampling."""
    timesteps = _resolve_timesteps(schedule, steps, spacing, offset, timesteps, parameterization, "sample_ddim")
    alpha_bars = _alpha_bars(schedule, timesteps)
    x = x_T
    for i, t in enumerate(timesteps):
        x0, eps = _denoise(model_fn, x, t, schedule, parameterization)
        x = _ddim_step(x0, eps, alpha_bars[i], alpha_bars[i + 1], eta, generator)
        _report(callback, i, t, x, x0)
    return x


def _plms_transfer(x: torch.Tensor, eps: torch.Tensor, a: float, a_prev: float) -> torch.Tensor:
    # Liu et al. 2022, eq. 11 (PNDM's transfer φ): a deterministic DDIM step driven by the combined ε.
    x0 = (x - math.sqrt(1 - a) * eps) / math.sqrt(a)
    return math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev) * eps


def sample_plms(model_fn: ModelFn, x_T: torch.Tensor, schedule: NoiseSchedule, *, steps: int | None,
                parameterization: str = "eps", generator: torch.Generator | None = None, callback=None,
                spacing: str = DEFAULT_SPACING, offset: int = 0, timesteps=None) -> torch.Tensor:
    """Pseudo linear multistep (Liu et al. 2022, eq. 12; LDM's plms.py): Adams–Bashforth on ε of orders 2-4,
    warmed up by one pseudo improved-Euler step (one extra model call), as in LDM / diffusers PNDM with
    `skip_prk_steps`. Deterministic (generator unused). Needs ᾱ > 0 at every visited timestep."""
    timesteps = _resolve_timesteps(schedule, steps, spacing, offset, timesteps, parameterization, "sample_plms")
    alpha_bars = _alpha_bars(schedule, timesteps)
    if alpha_bars[0] == 0.0:
        raise ValueError(f"sample_plms: ᾱ = 0 at t={timesteps[0]} (zero terminal SNR): the ε-space transfer "
                         "is undefined there; use 'leading'/'linspace' spacing or another sampler")
    x, old_eps = x_T, []
    for i, t in enumerate(timesteps):
        a, a_prev = alpha_bars[i], alpha_bars[i + 1]
        x0, eps = _denoise(model_fn, x, t, schedule, parameterization)
        if not old_eps and i + 1 < len(timesteps):
            # Warm-up: Heun-like average of ε at both ends of the step (Liu et al. 2022, §4.2, "pseudo
            # improved Euler").
            _, eps_next = _denoise(model_fn, _plms_transfer(x, eps, a, a_prev), timesteps[i + 1], schedule,
                                   parameterization)
            eps_prime = (eps + eps_next) / 2
        elif len(old_eps) == 1:
            eps_prime = (3 * eps - old_eps[-1]) / 2
        elif len(old_eps) == 2:
            eps_prime = (23 * eps - 16 * old_eps[-1] + 5 * old_eps[-2]) / 12
        elif len(old_eps) >= 3:
            eps_prime = (55 * eps - 59 * old_eps[-1] + 37 * old_eps[-2] - 9 * old_eps[-3]) / 24
        else:  # a single step: nothing to average with
            eps_prime = eps
        x = _plms_transfer(x, eps_prime, a, a_prev)
        old_eps = (old_eps + [eps])[-3:]
        _report(callback, i, t, x, x0)
    return x


def _log_snr_half(alpha_bar: float) -> float:
    """λ = log(α/σ) (Lu et al. 2022), -inf at ᾱ = 0 and +inf at ᾱ = 1."""
    if alpha_bar == 0.0:
        return -math.inf
    if alpha_bar == 1.0:
        return math.inf
    return 0.5 * (math.log(alpha_bar) - math.log1p(-alpha_bar))


def sample_dpmpp_2m(model_fn: ModelFn, x_T: torch.Tensor, schedule: NoiseSchedule, *, steps: int | None,
                    parameterization: str = "eps", generator: torch.Generator | None = None, callback=None,
                    spacing: str = DEFAULT_SPACING, offset: int = 0, timesteps=None) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++", Algorithm 2): a second-order multistep solver of the
    probability-flow ODE in λ = log(α/σ), on the data prediction x0̂. First-order (= DDIM) at the first step
    and at the last one, which goes to σ = 0 (diffusers' `final_sigmas_type="zero"`). Deterministic."""
    timesteps = _resolve_timesteps(schedule, steps, spacing, offset, timesteps, parameterization,
                                   "sample_dpmpp_2m")
    alpha_bars = _alpha_bars(schedule, timesteps)
    x, x0_last, h_last = x_T, None, None
    for i, t in enumerate(timesteps):
        a, a_next = alpha_bars[i], alpha_bars[i + 1]
        alpha_next, sigma, sigma_next = math.sqrt(a_next), math.sqrt(1 - a), math.sqrt(1 - a_next)
        x0, _ = _denoise(model_fn, x, t, schedule, parameterization)
        h = _log_snr_half(a_next) - _log_snr_half(a)
        # e^{-h} = (α_t σ_s)/(σ_t α_s), written as a ratio so it is exactly 0 at either SNR end point.
        exp_neg_h = math.sqrt(a) * sigma_next / (sigma * alpha_next)
        if x0_last is None or sigma_next == 0.0:
            denoised = x0
        else:
            # Algorithm 2: D = (1 + 1/(2r)) x0̂_i - 1/(2r) x0̂_{i-1}, r = h_{i-1}/h_i (1/(2r) = 0 if h_{i-1} = ∞).
            half_inv_r = h / (2 * h_last)
            denoised = (1 + half_inv_r) * x0 - half_inv_r * x0_last
        # Lu et al. 2022, eq. 9 (first-order update in data prediction): x_s = σ_s/σ_t·x_t - α_s(e^{-h} - 1)·D.
        x = (sigma_next / sigma) * x + alpha_next * (1 - exp_neg_h) * denoised
        x0_last, h_last = x0, h
        _report(callback, i, t, x, x0)
    return x


SAMPLERS: dict[str, Callable[..., torch.Tensor]] = {
    "ddpm": sample_ddpm,
    "ddim": sample_ddim,
    "plms": sample_plms,
    "dpmpp_2m": sample_dpmpp_2m,
}


def known_region_model_fn(model_fn: ModelFn, schedule: NoiseSchedule, x0_known: torch.Tensor,
                          keep: torch.Tensor, parameterization: str = "eps") -> ModelFn:
    """Inpainting with any sampler: where `keep` is True the network output is replaced by the output that
    predicts x0 = `x0_known` at the current x_t (ε = (x_t - α_t·x0)/σ_t, or v = α_t·ε - σ_t·x0). Every update
    then pulls the kept region along the noised known latent (RePaint's / SD's blending, done in the
    denoiser so the samplers stay unchanged), and the last update, which returns x0̂, returns `x0_known`
    there for DDPM, DDIM and DPM-Solver++ (PLMS mixes past ε; blend the result once more for it).
    `keep` is a bool mask broadcastable to x (e.g. (B, 1, h, w))."""
    if parameterization not in PARAMETERIZATIONS:
        raise ValueError(f"known_region_model_fn: unknown parameterization {parameterization!r}")

    def pinned(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        out = model_fn(x, t)
        alpha = at(schedule.sqrt_alphas_cumprod, t, x).to(x.dtype)
        sigma = at(schedule.sqrt_one_minus_alphas_cumprod, t, x).to(x.dtype)
        x0 = x0_known.to(x.dtype)
        eps = (x - alpha * x0) / sigma  # σ_t > 0 at every training timestep
        known = {"eps": eps, "x0": x0, "v": alpha * eps - sigma * x0}[parameterization]
        return torch.where(keep, known.to(out.dtype), out)

    return pinned


def cfg_model_fn(model: Callable[..., torch.Tensor], cond: Mapping[str, torch.Tensor],
                 uncond: Mapping[str, torch.Tensor], scale: float) -> ModelFn:
    """Classifier-free guidance (Ho & Salimans 2022, eq. 6): out = out_u + scale·(out_c - out_u), for an
    output linear in the score (ε or v; also x0, as x0̂ is affine in ε̂ at fixed x_t).

    `model(x, t, cond_dict)`; `cond`/`uncond` hold the same keys ("context", "y", "concat", …). The
    conditional and unconditional halves go through ONE forward on the batch-concatenated input
    (cond first). An `uncond` entry with batch 1 is broadcast to the batch. scale == 1 skips the
    unconditional half entirely.
    """
    if set(cond) != set(uncond):
        raise ValueError(f"cfg_model_fn: cond keys {sorted(cond)} != uncond keys {sorted(uncond)}")
    if scale == 1.0:
        return lambda x, t: model(x, t, dict(cond))
    both = {}
    for key, c in cond.items():
        u = uncond[key]
        if u.shape[0] == 1 and c.shape[0] != 1:
            u = u.expand(c.shape[0], *u.shape[1:])
        if u.shape != c.shape:
            raise ValueError(f"cfg_model_fn: cond[{key!r}] shape {tuple(c.shape)} != uncond shape {tuple(u.shape)}")
        both[key] = torch.cat([c, u.to(c.dtype)])

    def guided(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        out_cond, out_uncond = model(torch.cat([x, x]), torch.cat([t, t]), both).chunk(2)
        return out_uncond + scale * (out_cond - out_uncond)

    return guided
