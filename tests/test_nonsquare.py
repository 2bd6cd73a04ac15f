"""Non-square images and latents (aspect-ratio buckets) everywhere downstream of the data pipeline.

References: diffusers' UNet2DConditionModel and DDIMScheduler (independent implementations) for the UNet and
the sampler at a non-square latent; for convolutional nets without a diffusers twin (LPIPS, the patch
discriminator, the autoencoder) the exact symmetry "transpose every conv kernel <=> transpose the image": a
net that mixed up H and W anywhere (a reshape, a pad, a pooled axis) breaks it on a non-square input.
"""
import copy
import io
import sys
import tarfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from ldm.models.autoencoder import AutoencoderKL, VQModel
from ldm.models.unet import UNetModel
from ldm.modules.ae_blocks import AttnBlock
from ldm.modules.attention import SpatialTransformer
from ldm.modules.unet_blocks import AttentionBlock
from tests.test_convert import CONTEXT_DIM, LAYOUTS, TINY_UNET, randomize, rel_error

ROOT = Path(__file__).resolve().parents[1]


def transposed(model: nn.Module) -> nn.Module:
    """A copy with every 2D conv kernel transposed: on the transposed image it computes the transposed output
    (symmetric paddings, square strides and pools, per-channel norms, order-free attention)."""
    model = copy.deepcopy(model)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                m.weight.copy_(m.weight.transpose(-1, -2).clone())
    return model


def tiny_kl(attn: bool = True) -> AutoencoderKL:
    torch.manual_seed(0)
    ae = AutoencoderKL(embed_dim=4, z_channels=4, ch=32, ch_mult=[1, 2, 2], num_res_blocks=1,
                       attn_resolutions=[8] if attn else [], resolution=32)  # f = 4, attention at the 1/4 level
    return randomize(ae, 3)


# ------------------------------------------------------------------------------------------ autoencoder
@pytest.mark.parametrize("hw", [(32, 48), (48, 32), (16, 64)])
def test_autoencoder_round_trip_shapes_and_transpose_symmetry(hw):
    ae = tiny_kl()
    x = torch.rand(2, 3, *hw, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        z = ae.encode_latent(x, sample=False)
        rec = ae.decode(z)
        z_t = transposed(ae).encode_latent(x.transpose(-1, -2), sample=False)
    assert z.shape == (2, 4, hw[0] // 4, hw[1] // 4) and rec.shape == x.shape
    torch.testing.assert_close(z_t.transpose(-1, -2), z, rtol=1e-4, atol=1e-5)
    vq = VQModel(n_embed=16, embed_dim=4, ch=32, ch_mult=[1, 2], num_res_blocks=1, z_channels=4, resolution=32)
    with torch.no_grad():
        assert vq(x)[0].shape == x.shape


def test_autoencoder_refuses_a_side_that_is_not_a_multiple_of_its_factor():
    """Without the check a 34-px side encodes to 9 latents and decodes to 36 px: a silent size change."""
    with pytest.raises(ValueError, match=r"multiples of the downsampling factor 4, got shape \(1, 3, 32, 34\)"):
        tiny_kl().encode_latent(torch.zeros(1, 3, 32, 34))


def test_stage1_losses_on_a_non_square_batch():
    from ldm.losses.autoencoder import AutoencoderLoss

    torch.manual_seed(0)
    loss = AutoencoderLoss(disc_start=0, disc_ndf=8, disc_num_layers=2, lpips_net="vgg", lpips_pretrained=False)
    x = torch.rand(2, 3, 32, 48) * 2 - 1
    y = (x + 0.3 * torch.randn(x.shape)).clamp(-1, 1)
    with torch.no_grad():
        lpips = loss.lpips(x, y)
        lpips_t = transposed(loss.lpips)(x.transpose(-1, -2), y.transpose(-1, -2))
        logits = loss.discriminator.eval()(x)
        logits_t = transposed(loss.discriminator).eval()(x.transpose(-1, -2))
    assert lpips.shape == (2, 1, 1, 1) and (lpips > 0).all()
    torch.testing.assert_close(lpips_t, lpips, rtol=1e-4, atol=1e-6)
    assert logits.shape[-2:] == (6, 10)  # patch grid: 32x48 through two stride-2 and two stride-1 k4 convs
    torch.testing.assert_close(logits_t.transpose(-1, -2), logits, rtol=1e-4, atol=1e-5)
    ae = tiny_kl(attn=False)
    rec, posterior = ae(x, sample=False)
    total, logs = loss.train()(x, rec, posterior, step=1, last_layer=ae.last_layer())
    total.backward()
    assert torch.isfinite(total) and ae.last_layer().grad.abs().sum() > 0


# ------------------------------------------------------------------------------------------------- UNet
@pytest.mark.parametrize("block", ["unet_attention", "spatial_transformer", "ae_attention"])
def test_attention_blocks_treat_h_w_as_one_token_sequence(block):
    """Attention is a function of the row-major token sequence only: (h, w) and (1, h*w) give the same
    tokens. A reshape that swapped h and w on the way back would scramble a non-square map."""
    torch.manual_seed(0)
    module = {"unet_attention": lambda: AttentionBlock(32, num_heads=2, norm_groups=8),
              "spatial_transformer": lambda: SpatialTransformer(32, 2, 16, context_dim=8, norm_groups=8),
              "ae_attention": lambda: AttnBlock(32, 8)}[block]()
    randomize(module, 1)
    x = torch.randn(2, 32, 3, 5)
    args = (torch.randn(2, 4, 8),) if block == "spatial_transformer" else ()
    with torch.no_grad():
        out = module(x, *args)
        flat = module(x.reshape(2, 32, 1, 15), *args).reshape(2, 32, 3, 5)
    torch.testing.assert_close(out, flat, rtol=1e-5, atol=1e-5)
    assert (out - x).abs().max() > 1e-2  # the attention branch is not zero


@pytest.fixture(scope="module", params=sorted(LAYOUTS))
def unet_pair(request, tmp_path_factory):
    """A random diffusers UNet and ours converted from its folder (ldm.convert)."""
    import diffusers

    from ldm.convert import load_unet

    reference = randomize(diffusers.UNet2DConditionModel(**TINY_UNET, **LAYOUTS[request.param]), seed=1)
    root = tmp_path_factory.mktemp(f"unet_{request.param}")
    reference.save_pretrained(root / "unet")
    return reference, load_unet(root)


@pytest.mark.parametrize("hw", [(8, 16), (16, 8), (12, 4)])
def test_unet_matches_diffusers_on_non_square_latents(unet_pair, hw):
    reference, ours = unet_pair
    g = torch.Generator().manual_seed(0)
    x, t, context = torch.randn(2, 4, *hw, generator=g), torch.tensor([10, 700]), torch.randn(2, 5, CONTEXT_DIM, generator=g)
    with torch.no_grad():
        expected = reference(x, t, context).sample
        got = ours(x, t, context)
    assert got.shape == x.shape
    assert rel_error(got, expected) <= 1e-5 and expected.std() > 0.1


def test_unet_refuses_a_side_its_levels_cannot_halve():
    unet = UNetModel(4, 4, 16, 1, [2], channel_mult=(1, 2, 2), num_heads=2, norm_groups=8)
    with pytest.raises(ValueError, match=r"divisible by 4 \(3 levels\), got \(8, 6\)"):
        unet(torch.zeros(1, 4, 8, 6), torch.tensor(1))
    # a class-conditional (self-attention) UNet with the demo's position embedding, at every level
    unet = UNetModel(4, 4, 16, 1, [1, 2, 4], channel_mult=(1, 2, 2), num_heads=2, norm_groups=8, num_classes=3)
    assert unet(torch.zeros(2, 4, 4, 12), torch.tensor([1, 2]), y=torch.tensor([0, 2])).shape == (2, 4, 4, 12)


# ---------------------------------------------------------------------------------------------- sampler
@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # diffusers' own numpy-2 warning in set_timesteps
def test_ddim_on_a_non_square_latent_matches_diffusers(unet_pair):
    """Our UNet + sample_ddim against diffusers' UNet + DDIMScheduler, 5 steps at latent 8x16."""
    import diffusers

    from ldm.diffusion.schedule import NoiseSchedule
    from ldm.sampling import sample_ddim

    reference, ours = unet_pair
    g = torch.Generator().manual_seed(1)
    x_T, context = torch.randn(2, 4, 8, 16, generator=g), torch.randn(2, 5, CONTEXT_DIM, generator=g)
    scheduler = diffusers.DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                        clip_sample=False, set_alpha_to_one=True, steps_offset=0,
                                        timestep_spacing="trailing")
    scheduler.set_timesteps(5)
    with torch.no_grad():
        expected = x_T.clone()
        for t in scheduler.timesteps:
            expected = scheduler.step(reference(expected, t, context).sample, t, expected).prev_sample
        got = sample_ddim(lambda x, t: ours(x, t, context), x_T, NoiseSchedule("scaled_linear"), steps=5,
                          spacing="trailing")
    assert got.shape == (2, 4, 8, 16)
    assert rel_error(got, expected) <= 1e-4  # five UNet calls at <= 1e-5 each
