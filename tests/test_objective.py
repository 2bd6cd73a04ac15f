"""Forward process, targets, x0/ε recovery, min-SNR weights and offset noise."""
import pytest
import torch

from ldm.diffusion.objective import (add_noise, diffusion_loss, get_velocity, loss_weight, offset_noise,
                                     predict_x0_eps, target)
from ldm.diffusion.schedule import NoiseSchedule


@pytest.fixture(scope="module")
def schedule64():
    return NoiseSchedule("scaled_linear", dtype=torch.float64)


def _batch(dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(6, 4, 8, 8, generator=g, dtype=dtype)
    noise = torch.randn(6, 4, 8, 8, generator=g, dtype=dtype)
    return x0, noise, torch.tensor([0, 1, 100, 500, 998, 999])


def test_add_noise_closed_form(schedule64):
    x0, noise, t = _batch()
    xt = add_noise(schedule64, x0, noise, t)
    abar = schedule64.alphas_cumprod[500].item()
    torch.testing.assert_close(xt[3], abar ** 0.5 * x0[3] + (1 - abar) ** 0.5 * noise[3])


@pytest.mark.parametrize("parameterization", ["eps", "x0", "v"])
def test_x0_and_eps_recovered_exactly(schedule64, parameterization):
    x0, noise, t = _batch()
    xt = add_noise(schedule64, x0, noise, t)
    output = target(schedule64, x0, noise, t, parameterization)
    x0_hat, eps_hat = predict_x0_eps(schedule64, output, xt, t, parameterization)
    torch.testing.assert_close(x0_hat, x0, rtol=0, atol=1e-9)
    torch.testing.assert_close(eps_hat, noise, rtol=0, atol=1e-9)


def test_velocity_identity(schedule64):
    x0, noise, t = _batch()
    v = get_velocity(schedule64, x0, noise, t)
    alpha = schedule64.sqrt_alphas_cumprod[t].view(-1, 1, 1, 1)
    sigma = schedule64.sqrt_one_minus_alphas_cumprod[t].view(-1, 1, 1, 1)
    torch.testing.assert_close(v, alpha * noise - sigma * x0)
    # ‖v‖² = ‖x0‖²σ² + ‖ε‖²α² - 2ασ⟨x0,ε⟩ and x_t, v are a rotation of (x0, ε): norms are preserved
    xt = add_noise(schedule64, x0, noise, t)
    torch.testing.assert_close(xt.pow(2) + v.pow(2), x0.pow(2) + noise.pow(2))


def test_add_noise_and_velocity_match_diffusers():
    diffusers = pytest.importorskip("diffusers")
    reference = diffusers.DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    schedule = NoiseSchedule("scaled_linear")
    x0, noise, t = _batch(torch.float32)
    torch.testing.assert_close(add_noise(schedule, x0, noise, t), reference.add_noise(x0, noise, t))
    torch.testing.assert_close(get_velocity(schedule, x0, noise, t), reference.get_velocity(x0, noise, t))


def test_min_snr_weights_closed_form(schedule64):
    t = torch.tensor([0, 100, 300, 600, 999])
    snr = schedule64.alphas_cumprod[t] / (1 - schedule64.alphas_cumprod[t])
    gamma = 5.0
    clipped = torch.minimum(snr, torch.tensor(gamma, dtype=torch.float64))
    torch.testing.assert_close(loss_weight(schedule64, t, "eps", "min_snr", gamma), clipped / snr)
    torch.testing.assert_close(loss_weight(schedule64, t, "v", "min_snr", gamma), clipped / (snr + 1))
    torch.testing.assert_close(loss_weight(schedule64, t, "x0", "min_snr", gamma), clipped)
    assert torch.equal(loss_weight(schedule64, t, "eps", "uniform"), torch.ones(5, dtype=torch.float64))
    assert snr[0] > gamma > snr[-1]  # both branches of the min are exercised
    # zero terminal SNR: the limits, not NaN
    zero_snr = NoiseSchedule("scaled_linear", zero_terminal_snr=True, dtype=torch.float64)
    last = torch.tensor([999])
    assert loss_weight(zero_snr, last, "eps", "min_snr").item() == 1.0
    assert loss_weight(zero_snr, last, "v", "min_snr").item() == 0.0


@pytest.mark.parametrize("parameterization", ["eps", "v"])
def test_min_snr_equals_x0_space_weighting(schedule64, parameterization):
    """Hang et al. 2023: every parameterisation's min-SNR loss is min(SNR, γ)·‖x0̂ - x0‖² for the same prediction."""
    x0, noise, t = _batch()
    xt = add_noise(schedule64, x0, noise, t)
    prediction = target(schedule64, x0, noise, t, parameterization) + 0.1 * torch.randn_like(x0)
    x0_hat, _ = predict_x0_eps(schedule64, prediction, xt, t, parameterization)
    loss = diffusion_loss(schedule64, prediction, x0, noise, t, parameterization, weighting="min_snr")
    in_x0_space = diffusion_loss(schedule64, x0_hat, x0, noise, t, "x0", weighting="min_snr")
    torch.testing.assert_close(loss, in_x0_space)


def test_diffusion_loss_uniform_is_ddpm_simple_loss():
    schedule = NoiseSchedule("linear")
    x0, noise, t = _batch(torch.float32)
    output = torch.randn_like(noise)
    loss = diffusion_loss(schedule, output, x0, noise, t)
    assert loss.shape == (6,)
    torch.testing.assert_close(loss, ((output - noise) ** 2).mean(dim=(1, 2, 3)))
    loss_bf16 = diffusion_loss(schedule, output.bfloat16(), x0, noise, t)
    assert loss_bf16.dtype == torch.float32
    with pytest.raises(ValueError, match="model_output shape"):
        diffusion_loss(schedule, output[:, :3], x0, noise, t)
    with pytest.raises(ValueError, match="unknown parameterization 'score'"):
        target(schedule, x0, noise, t, "score")
    with pytest.raises(ValueError, match="unknown weighting 'p2'"):
        loss_weight(schedule, t, "eps", "p2")


def test_offset_noise():
    noise = torch.randn(256, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    assert offset_noise(noise, 0.0) is noise
    shifted = offset_noise(noise, 0.1, torch.Generator().manual_seed(1))
    delta = shifted - noise
    # constant over space, independent per (sample, channel), N(0, 0.1²)
    assert torch.allclose(delta, delta[..., :1, :1].expand_as(delta), atol=1e-6)  # float32 rounding of (ε+d)-ε
    per_channel = delta[:, :, 0, 0]
    assert per_channel.std().item() == pytest.approx(0.1, rel=0.1)  # 1024 draws: SE of std ≈ 2.2 %
    again = offset_noise(noise, 0.1, torch.Generator().manual_seed(1))
    assert torch.equal(shifted, again)
