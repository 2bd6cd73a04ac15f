"""Inference options: img2img (SDEdit) timesteps against diffusers, the known-region (inpainting) wrapper,
negative prompts as CFG's unconditional branch, per-image seeding, option checks, device/precision."""
import functools

import pytest
import torch
from omegaconf import OmegaConf

from ldm.diffusion.objective import add_noise
from ldm.diffusion.schedule import NoiseSchedule
from ldm.sampling import SAMPLERS, cfg_model_fn, img2img_timesteps, known_region_model_fn, make_timesteps


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("steps,strength", [(10, 0.8), (50, 0.3), (7, 1.0), (20, 0.01)])
def test_img2img_timesteps_match_diffusers_img2img(steps, strength):
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                              timestep_spacing="trailing")
    scheduler.set_timesteps(steps)
    # StableDiffusionImg2ImgPipeline.get_timesteps (diffusers 0.42)
    init_timestep = min(int(steps * strength), steps)
    expected = scheduler.timesteps[max(steps - init_timestep, 0):]
    got = img2img_timesteps(1000, steps, strength)
    if len(expected) == 0:  # diffusers runs no step at all there; we run one
        assert got.tolist() == make_timesteps(1000, steps)[-1:].tolist()
    else:
        assert got.tolist() == expected.tolist()
    with pytest.raises(ValueError, match="strength"):
        img2img_timesteps(1000, steps, 0.0)


@pytest.mark.parametrize("parameterization", ["eps", "x0", "v"])
@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
def test_known_region_is_kept_and_the_rest_untouched(sampler, parameterization):
    schedule = NoiseSchedule("scaled_linear", dtype=torch.float64)
    model_fn = lambda x, t: 0.3 * torch.tanh(x) + 1e-4 * t.double().view(-1, 1, 1, 1)  # noqa: E731 pointwise
    g = torch.Generator().manual_seed(0)
    x_T, x0_known = torch.randn(2, 3, 6, 6, generator=g, dtype=torch.float64), torch.randn(2, 3, 6, 6, generator=g,
                                                                                          dtype=torch.float64)
    keep = torch.zeros(2, 1, 6, 6, dtype=torch.bool)
    keep[:, :, :3] = True
    run = lambda fn: SAMPLERS[sampler](fn, x_T, schedule, steps=8, parameterization=parameterization,  # noqa: E731
                                       generator=torch.Generator().manual_seed(1))
    plain, pinned = run(model_fn), run(known_region_model_fn(model_fn, schedule, x0_known, keep, parameterization))
    region = keep.expand_as(x_T)
    # the model acts pointwise, so the free region is exactly what the unwrapped sampler gives
    torch.testing.assert_close(pinned[~region], plain[~region], rtol=0, atol=1e-12)
    if sampler != "plms":  # PLMS's last update mixes earlier ε: the task blends once more at the end
        torch.testing.assert_close(pinned[region], x0_known[region], rtol=0, atol=1e-9)
    else:
        assert (pinned[region] - x0_known[region]).abs().max() < 0.1


# ------------------------------------------------------------------------------------ a tiny task, untrained
CAPTIONS = ["a red circle", "a blue square on the left", "a green triangle at the top", "blurry"]


@pytest.fixture(scope="module")
def task():
    from ldm.models.autoencoder import AutoencoderKL
    from ldm.models.unet import UNetModel
    from ldm.modules.encoders import TransformerTextEncoder
    from ldm.tasks.latent_diffusion import LatentDiffusionTask

    torch.manual_seed(0)
    encoder = TransformerTextEncoder(vocab_size=300, max_length=40, dim=32, depth=1, heads=2)
    encoder.fit_tokenizer(CAPTIONS)
    unet = functools.partial(UNetModel, model_channels=16, channel_mult=[1, 2], num_res_blocks=1,
                             attention_resolutions=[2], num_head_channels=8, norm_groups=8)
    first_stage = AutoencoderKL(embed_dim=4, ch=16, ch_mult=[1, 2], num_res_blocks=1, z_channels=4, norm_groups=8)
    t = LatentDiffusionTask(unet, encoder, first_stage, schedule={"kind": "scaled_linear"}, sampler="ddim",
                            sample_steps=4, guidance_scale=3.0).eval()
    return t


def test_img2img_starts_from_the_noised_input(task):
    """The fresh UNet predicts ε = 0 (zero-initialised output), so DDIM from x_t returns x_t/α_t exactly:
    the task must encode the input, noise it to the first img2img timestep, and run only the rest."""
    image = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    batch = {"caption": ["a red circle", "blurry"]}
    out = task.sample(batch, latent_size=(8, 8), noise=noise, init_image=image, strength=0.5, steps=10)
    t0 = img2img_timesteps(1000, 10, 0.5)[0]
    alpha = task.schedule.sqrt_alphas_cumprod[t0]
    z0 = task.encode_fp32(image)
    expected = task.decode(add_noise(task.schedule, z0, noise, t0.repeat(2)) / alpha)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)
    weak = task.sample(batch, latent_size=(8, 8), noise=noise, init_image=image, strength=0.1, steps=10)
    reconstruction = task.decode(z0)
    assert (weak - reconstruction).abs().mean() < (out - reconstruction).abs().mean()


@pytest.fixture(scope="module")
def trained_looking_task(task):
    """The same task with its zero-initialised layers (output, attention projections) made non-zero, so
    captions change the prediction."""
    with torch.no_grad():
        for p in task.unet.parameters():
            if p.dim() > 1 and not p.any():
                p.normal_(std=0.05, generator=torch.Generator().manual_seed(p.numel()))
    return task


def test_negative_prompts_are_the_unconditional_branch(trained_looking_task):
    task = trained_looking_task
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    captions = ["a red circle", "a blue square on the left"]
    plain = task.sample({"caption": captions}, latent_size=(8, 8), noise=noise)
    empty = task.sample({"caption": captions, "negative_caption": ["", ""]}, latent_size=(8, 8), noise=noise)
    torch.testing.assert_close(empty, plain, rtol=0, atol=1e-6)  # "" is the null caption
    negative = task.sample({"caption": captions, "negative_caption": ["blurry", "blurry"]}, latent_size=(8, 8),
                           noise=noise)
    assert (negative - plain).abs().max() > 1e-3
    # the direct computation: CFG with the negative captions' conditioning as the unconditional one
    latent = (8, 8)
    cond = task.conditioner({"caption": captions}, None, latent_size=latent)
    uncond = task.conditioner({"caption": ["blurry", "blurry"]}, None, latent_size=latent)
    fn = cfg_model_fn(lambda x, t, c: task.denoise(x, t, c), cond, uncond, 3.0)
    expected = task.decode(SAMPLERS["ddim"](fn, noise, task.schedule, steps=4))
    torch.testing.assert_close(negative, expected, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="negative captions"):
        task.sample({"caption": captions, "negative_caption": ["x"]}, latent_size=latent, noise=noise)


def test_each_image_depends_on_its_seed_not_on_batching(trained_looking_task):
    from ldm.inference import generate

    items = [{"caption": c, "negative_caption": "blurry"} for c in CAPTIONS[:3]]
    init = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(3)) * 2 - 1
    kw = dict(latent_size=(8, 8), seed=5, init_image=init, strength=0.6, steps=5)
    a = generate(trained_looking_task, items, batch_size=3, **kw)
    b = generate(trained_looking_task, items, batch_size=1, **kw)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-4)
    c = generate(trained_looking_task, items[1:], batch_size=2, **{**kw, "seed": 6})  # item 1 at index 0: seed 6
    torch.testing.assert_close(c, a[1:], rtol=0, atol=1e-4)


def test_bf16_autocast_keeps_the_decoder_in_fp32(trained_looking_task):
    from ldm.inference import autocast

    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    with autocast(torch.device("cpu"), "bf16"):
        out = trained_looking_task.sample({"caption": ["a red circle"]}, latent_size=(8, 8), noise=noise)
    fp32 = trained_looking_task.sample({"caption": ["a red circle"]}, latent_size=(8, 8), noise=noise)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert (out - fp32).abs().max() < 0.1  # bf16 UNet: close, not equal
    with pytest.raises(ValueError, match="fp16"):
        autocast(torch.device("cpu"), "fp16")


def _cfg(**overrides):
    from train.sample import SampleConfig

    return OmegaConf.merge(OmegaConf.structured(SampleConfig), {"run_dir": "r", "out_dir": "o", **overrides})


@pytest.mark.parametrize("overrides,match", [
    ({"repeats": 0}, "repeats=0"),
    ({"sampler": "euler"}, r"sampler='euler': choose one of \['ddim', 'ddpm', 'dpmpp_2m', 'plms'\]"),
    ({"steps": 0}, "steps=0"),
    ({"device": "tpu"}, "device='tpu'"),
    ({"precision": "fp8"}, "precision='fp8'"),
    ({"strength": 1.5}, "strength=1.5"),
    ({"image": "x.png"}, "both image"),
    ({"init_image": "nope.png"}, "init_image=nope.png not found"),
])
def test_bad_options_fail_before_loading_and_name_the_option(overrides, match):
    from train.sample import check_options

    with pytest.raises((ValueError, FileNotFoundError), match=match):
        check_options(_cfg(**overrides))


def test_negative_prompts_count_is_checked():
    from train.sample import conditions

    assert [i["negative_caption"] for i in conditions(_cfg(prompts=["a", "b"], negative_prompts=["n"]))] == ["n", "n"]
    with pytest.raises(ValueError, match="one per prompt"):
        conditions(_cfg(prompts=["a", "b", "c"], negative_prompts=["n", "m"]))


def test_cuda_without_a_gpu_says_so():
    from ldm.inference import resolve_device

    assert resolve_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        assert resolve_device("auto") == torch.device("cpu")
        with pytest.raises(RuntimeError, match="no CUDA GPU"):
            resolve_device("cuda")
