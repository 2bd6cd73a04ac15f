"""Every preset's noise schedule against the formula of the source it reproduces.

CompVis' `make_beta_schedule("linear", ...)` (ldm/modules/diffusionmodules/util.py) is linear in sqrt(beta);
it is re-implemented below in float64. The SD presets are checked against diffusers' DDPMScheduler, which
is what Stable Diffusion's released pipelines use. A new preset with a schedule must be added to SOURCES.
"""
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from ldm.diffusion.schedule import NoiseSchedule, make_betas

CONF = Path(__file__).resolve().parents[1] / "conf" / "model"


def compvis_make_beta_schedule(n_timestep: int, linear_start: float, linear_end: float) -> torch.Tensor:
    """CompVis latent-diffusion, util.py, schedule == "linear" (their default), in float64."""
    return torch.linspace(linear_start**0.5, linear_end**0.5, n_timestep, dtype=torch.float64) ** 2


def diffusers_betas(beta_start: float, beta_end: float, zero_terminal_snr: bool = False) -> torch.Tensor:
    diffusers = pytest.importorskip("diffusers")
    from diffusers.schedulers.scheduling_ddpm import rescale_zero_terminal_snr

    betas = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=beta_start,
                                    beta_end=beta_end).betas.double()
    # diffusers' own rescale, run in float64: its float32 cumprod is off by up to 2e-4 relative (schedule.py).
    return rescale_zero_terminal_snr(betas) if zero_terminal_snr else betas


# preset -> (source, the source's (linear_start, linear_end)): the values are the source's, not copied from
# our YAML, so a wrong number in a preset fails too.
SOURCES = {
    "ldm_txt2img": ("compvis", "configs/latent-diffusion/txt2img-1p4B-eval.yaml", (0.00085, 0.012)),
    "ldm_class": ("compvis", "models/ldm/cin256-v2/config.yaml", (0.0015, 0.0195)),
    "ldm_uncond": ("compvis", "configs/latent-diffusion/celebahq-ldm-vq-4.yaml", (0.0015, 0.0195)),
    "ldm_sr": ("compvis", "models/ldm/bsr_sr/config.yaml", (0.0015, 0.0155)),
    # SD-inpainting layout on latent-diffusion's inpainting_big schedule (linear_start/end 0.0015/0.0205)
    "ldm_inpaint": ("compvis", "models/ldm/inpainting_big/config.yaml", (0.0015, 0.0205)),
    "ldm_inpaint_tiny": ("compvis", "models/ldm/inpainting_big/config.yaml", (0.0015, 0.0205)),
    "sd_v1": ("diffusers", "runwayml/stable-diffusion-v1-5 scheduler", (0.00085, 0.012)),
    "sd_v2": ("diffusers", "stabilityai/stable-diffusion-2-1 scheduler", (0.00085, 0.012)),
    # Our own small presets reuse SD's schedule (the demo with zero terminal SNR, Lin et al. 2024).
    "ldm_txt2img_tiny": ("diffusers", "SD's scaled_linear", (0.00085, 0.012)),
    "ldm_txt2img_demo": ("diffusers", "SD's scaled_linear, rescale_betas_zero_snr", (0.00085, 0.012)),
}


def model_preset(path):
    """The `model` node of a conf/model file; the `# @package _global_` ones (which also set a trainer key)
    hold it under `model:`."""
    cfg = OmegaConf.load(path)
    return cfg.model if path.read_text().startswith("# @package _global_") else cfg


def presets_with_schedule() -> list[str]:
    names = []
    for path in sorted(CONF.glob("*.yaml")):
        task = model_preset(path).get("task")
        if task is not None and "schedule" in task:
            names.append(path.stem)
    return names


def test_every_preset_with_a_schedule_names_its_source():
    found = presets_with_schedule()
    assert len(found) >= 8, found
    assert sorted(found) == sorted(SOURCES), "add the new preset to SOURCES with the formula it reproduces"


@pytest.mark.parametrize("name", sorted(SOURCES))
def test_preset_betas_match_their_source(name):
    source, _, (start, end) = SOURCES[name]
    schedule = OmegaConf.to_container(model_preset(CONF / f"{name}.yaml").task.schedule)
    assert schedule.get("num_timesteps", 1000) == 1000
    ours = make_betas(schedule["kind"], 1000, schedule.get("beta_start"), schedule.get("beta_end"))
    zero_snr = schedule.get("zero_terminal_snr", False)
    if source == "compvis":
        assert not zero_snr
        torch.testing.assert_close(ours, compvis_make_beta_schedule(1000, start, end), rtol=1e-12, atol=0)
    else:
        built = NoiseSchedule.from_config(schedule)  # applies the zero-terminal-SNR rescale when asked
        torch.testing.assert_close(built.betas, diffusers_betas(start, end, zero_snr).float(), rtol=2e-6, atol=1e-9)


def test_compvis_linear_is_not_plain_linear():
    """The bug the four paper presets had: `kind: linear` with CompVis' linear_start/end gives other betas."""
    wrong = make_betas("linear", 1000, 0.0015, 0.0195)
    right = compvis_make_beta_schedule(1000, 0.0015, 0.0195)
    assert (wrong - right).abs().max() > 1e-3
