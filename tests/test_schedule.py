"""Beta schedules vs their closed forms and vs diffusers; zero-terminal-SNR rescale (Lin et al. 2024)."""
import math

import pytest
import torch

from ldm.diffusion.schedule import NoiseSchedule, at, make_betas, rescale_zero_terminal_snr


def test_linear_and_scaled_linear_closed_form():
    betas = make_betas("linear", 1000)
    assert betas.dtype == torch.float64 and betas.shape == (1000,)
    assert betas[0].item() == pytest.approx(1e-4) and betas[-1].item() == pytest.approx(0.02)  # DDPM §4
    assert torch.allclose(betas.diff(), torch.full((999,), (0.02 - 1e-4) / 999, dtype=torch.float64))
    scaled = make_betas("scaled_linear", 1000, 0.00085, 0.012)
    assert scaled[0].item() == pytest.approx(0.00085) and scaled[-1].item() == pytest.approx(0.012)
    # linear in sqrt(β): constant increments of sqrt
    increments = scaled.sqrt().diff()
    assert torch.allclose(increments, increments.mean().expand(999), rtol=1e-9)


def test_cosine_matches_alpha_bar_closed_form():
    betas = make_betas("cosine", 1000)
    alphas_cumprod = torch.cumprod(1 - betas, 0)
    f = lambda t: math.cos((t / 1000 + 0.008) / 1.008 * math.pi / 2) ** 2  # Nichol & Dhariwal eq. 17
    for t in (0, 10, 250, 500, 900):  # below the β clip at 0.999, which only bites at the very end
        assert alphas_cumprod[t].item() == pytest.approx(f(t + 1) / f(0), rel=1e-10)
    assert betas.max().item() == pytest.approx(0.999)


def test_cosine_warns_that_betas_are_ignored():
    # A preset written for scaled_linear keeps its betas when `schedule.kind=cosine` is set on the command line.
    with pytest.warns(UserWarning, match="ignored"):
        betas = make_betas("cosine", 1000, 0.00085, 0.012)
    torch.testing.assert_close(betas, make_betas("cosine", 1000), rtol=0, atol=0)


@pytest.mark.parametrize("kind, diffusers_kind", [("linear", "linear"), ("scaled_linear", "scaled_linear"),
                                                  ("cosine", "squaredcos_cap_v2")])
def test_betas_match_diffusers(kind, diffusers_kind):
    diffusers = pytest.importorskip("diffusers")
    reference = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule=diffusers_kind,
                                        beta_start=0.00085, beta_end=0.012)
    ours = make_betas(kind, 1000) if kind == "cosine" else make_betas(kind, 1000, 0.00085, 0.012)
    torch.testing.assert_close(ours.float(), reference.betas.float(), rtol=1e-5, atol=1e-7)


def test_zero_terminal_snr():
    betas = make_betas("scaled_linear", 1000)
    rescaled = rescale_zero_terminal_snr(betas)
    before, after = torch.cumprod(1 - betas, 0), torch.cumprod(1 - rescaled, 0)
    assert after[-1].item() == 0.0
    assert after[0].sqrt().item() == pytest.approx(before[0].sqrt().item(), rel=1e-12)
    assert (after.diff() < 0).all()  # still a valid, strictly decreasing ᾱ
    # sqrt(ᾱ) is an affine map of the original (Algorithm 1): check at the midpoint
    first, last = before[0].sqrt(), before[-1].sqrt()
    expected_mid = (before[500].sqrt() - last) * first / (first - last)
    assert after[500].sqrt().item() == pytest.approx(expected_mid.item(), rel=1e-10)
    diffusers = pytest.importorskip("diffusers")
    from diffusers.schedulers.scheduling_ddim import rescale_zero_terminal_snr as reference
    torch.testing.assert_close(rescaled, reference(betas.clone()), rtol=1e-12, atol=1e-12)


def test_noise_schedule_buffers():
    schedule = NoiseSchedule.from_config({"kind": "linear", "num_timesteps": 1000, "zero_terminal_snr": False})
    exact = torch.cumprod(1 - make_betas("linear", 1000), 0)
    assert schedule.alphas_cumprod.dtype == torch.float32 and schedule.num_timesteps == 1000
    torch.testing.assert_close(schedule.alphas_cumprod, exact.float())
    torch.testing.assert_close(schedule.snr, (exact / (1 - exact)).float())
    torch.testing.assert_close(schedule.sqrt_alphas_cumprod ** 2 + schedule.sqrt_one_minus_alphas_cumprod ** 2,
                               torch.ones(1000))
    assert schedule.state_dict() == {}  # derived from config: nothing to checkpoint
    zero_snr = NoiseSchedule(kind="scaled_linear", zero_terminal_snr=True, dtype=torch.float64)
    assert zero_snr.snr[-1].item() == 0.0 and zero_snr.betas[-1].item() == pytest.approx(1.0)


def test_at_broadcasts_per_sample():
    schedule = NoiseSchedule("linear", dtype=torch.float64)
    x = torch.zeros(3, 4, 5, 6)
    values = at(schedule.alphas_cumprod, torch.tensor([0, 10, 999]), x)
    assert values.shape == (3, 1, 1, 1) and values.dtype == torch.float32
    assert values[1].item() == pytest.approx(schedule.alphas_cumprod[10].item(), rel=1e-6)
    with pytest.raises(ValueError, match="shape"):
        at(schedule.alphas_cumprod, torch.tensor([0, 1]), x)


def test_bad_input_errors():
    with pytest.raises(ValueError, match="unknown schedule kind 'quadratic'"):
        make_betas("quadratic")
    with pytest.raises(ValueError, match="beta_start"):
        make_betas("linear", 1000, 0.02, 0.01)
    with pytest.raises(ValueError, match="unknown key"):
        NoiseSchedule.from_config({"kind": "linear", "timesteps": 1000})
