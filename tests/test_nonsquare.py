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


# ---------------------------------------------------------------------------------------------- latent cache
SHAPES = [(32, 48), (48, 32), (32, 32)]  # one per writer batch, as the bucketed loader hands them


@pytest.fixture(scope="module")
def mixed_cache(tmp_path_factory):
    """A cache shard written by cache_latents' own writer from batches of three shapes, and the posteriors."""
    from ldm.training.cache_latents import _write_shard

    ae = tiny_kl().eval()
    g = torch.Generator().manual_seed(0)
    batches, expected = [], {}
    for b, hw in enumerate(SHAPES):
        images = torch.rand(2, 3, *hw, generator=g) * 2 - 1
        keys = [f"b{b}s{i}" for i in range(2)]
        batches.append({"image": images, "key": keys, "members": [{"txt": k.encode()} for k in keys]})
        with torch.no_grad():
            posterior = ae.posterior(images)
        expected.update({k: (posterior.mean[i], posterior.logvar[i]) for i, k in enumerate(keys)})
    tar = tmp_path_factory.mktemp("mixed_cache") / "latents-000000.tar"
    with torch.no_grad():  # as encode_shard calls it
        assert _write_shard(tar, batches, ae, None, False, "cpu") == 6
    return tar, expected


def read_cache(tar, batch_size=2):
    from ldm.data.latent_cache import LatentSampleDecoder
    from ldm.data.webdataset import build_loader

    loader = build_loader([str(tar)], batch_size=batch_size, image_size=32, num_workers=0, epochs=1,
                          shuffle_buffer=0, decoder=LatentSampleDecoder(32, "txt", None))
    return list(loader), loader


def test_latent_cache_stores_and_reads_back_mixed_shapes_bit_exact(mixed_cache):
    tar, expected = mixed_cache
    batches, _ = read_cache(tar)
    assert [tuple(b["latent_mean"].shape) for b in batches] == [(2, 4, h // 4, w // 4) for h, w in SHAPES]
    for batch in batches:
        for i, key in enumerate(batch["key"]):
            assert torch.equal(batch["latent_mean"][i], expected[key][0]), key  # float32 stored, bit for bit
            assert torch.equal(batch["latent_logvar"][i], expected[key][1]), key
            assert batch["caption"][i] == key


def test_a_batch_of_mixed_latent_shapes_is_one_clear_error(mixed_cache):
    """Batch size 3 over writer batches of 2 would stack a 8x12 with a 12x8 latent."""
    tar, _ = mixed_cache
    with pytest.raises(ValueError, match=r"a batch mixes latent_mean shapes \[\(4, 8, 12\), \(4, 12, 8\)\]"):
        read_cache(tar, batch_size=3)


def test_a_flipped_byte_in_a_non_square_latent_is_caught(mixed_cache, tmp_path):
    tar, expected = mixed_cache
    with tarfile.open(tar) as f:
        member = next(m for m in f.getmembers() if m.name == "b1s0.mean.npy")  # a 12x8 latent
    data = bytearray(tar.read_bytes())
    data[member.offset_data + member.size - 3] ^= 0x40  # an exponent bit of the last float
    damaged = tmp_path / "latents-000000.tar"
    damaged.write_bytes(bytes(data))
    batches, loader = read_cache(damaged, batch_size=1)
    assert loader.skipped["checksum_error"] == 1
    assert sorted(k for b in batches for k in b["key"]) == sorted(set(expected) - {"b1s0"})


# ------------------------------------------------------------------------------------------- inpainting
def test_random_inpainting_masks_for_a_non_square_batch():
    from ldm.data.masks import masks_for_keys
    from ldm.modules.encoders import MaskedImageConcat

    keys = [f"k{i}" for i in range(16)]
    masks = masks_for_keys(keys, (32, 48), seed=0)
    assert masks.shape == (16, 1, 32, 48) and torch.equal(masks, masks_for_keys(keys, (32, 48), seed=0))
    coverage = masks.mean(dim=(1, 2, 3))
    assert (coverage > 0).all() and (coverage <= 0.75).all() and len(set(coverage.tolist())) > 8
    assert torch.equal(masks_for_keys(keys, (32, 32), seed=0), masks_for_keys(keys, 32, seed=0))  # square: unchanged
    ae = tiny_kl(attn=False).eval()
    image = torch.rand(2, 3, 32, 48) * 2 - 1
    concat = MaskedImageConcat(ae)({"image": image, "key": keys[:2]}, latent_size=(8, 12))["concat"]
    assert concat.shape == (2, 5, 8, 12)
    torch.testing.assert_close(concat[:, :1], masks[:2, :, ::4, ::4])  # nearest, as SD-inpainting


# ------------------------------------------------------------------------------------------------- grids
def test_grid_of_non_square_images_keeps_each_tile_exact():
    from PIL import Image

    from ldm.visualize import PAD, captioned_grid, to_uint8

    images = torch.rand(3, 3, 24, 40, generator=torch.Generator().manual_seed(0)) * 2 - 1
    grid = np.asarray(captioned_grid(images, ["a", "b", "c"]))
    scale = 6  # ceil(128 / shorter side 24): tiles 240 x 144, wider than high
    assert grid.shape[1] == 3 * (40 * scale + PAD) + PAD
    x = PAD + (40 * scale + PAD)  # the second tile
    tile = grid[PAD:PAD + 24 * scale, x:x + 40 * scale]
    expected = np.asarray(Image.fromarray(to_uint8(images)[1]).resize((40 * scale, 24 * scale), Image.NEAREST))
    assert np.array_equal(tile, expected) and np.array_equal(tile[::scale, ::scale], to_uint8(images)[1])


def test_training_grids_whose_batch_shape_changes_between_calls(tmp_path):
    """log_images (the training loop's grids) once per bucket shape: each PNG has its own tile shape."""
    from PIL import Image

    from ldm.training.tracking import log_images
    from ldm.visualize import Panel

    accelerator = SimpleNamespace(is_main_process=True, trackers=[])
    for step, hw in enumerate([(32, 48), (48, 32), (32, 32)]):
        log_images(accelerator, step, {"samples": Panel(torch.zeros(2, 3, *hw), ["x", "y"])}, tmp_path)
    sizes = [Image.open(tmp_path / "images" / f"samples_{s:08d}.png").size for s in range(3)]
    widths = [w for w, _ in sizes]
    assert widths == [2 * (192 + 4) + 4, 2 * (128 + 4) + 4, 2 * (128 + 4) + 4]  # 4x tiles: 192x128, 128x192
    assert sizes[1][1] - sizes[2][1] == 64  # the tall tiles are 64 px higher than the square ones


# -------------------------------------------------------------------------------- a trained run, the CLI
@pytest.fixture(scope="module")
def ldm_run(tiny_runs):
    return tiny_runs["ldm"]


def test_tasks_visualize_a_non_square_batch(tiny_runs):
    from ldm.training.runs import load_run

    _, ldm, _ = load_run(tiny_runs["ldm"])
    images = torch.rand(2, 3, 32, 48) * 2 - 1
    panels = ldm.visualize({"caption": ["a red circle", "a blue square"], "image": images})
    assert panels["samples"].images.shape == panels["references"].images.shape == (2, 3, 32, 48)
    from ldm.inference import generate  # non-square sampling: per-image noise, so independent of the batch size

    items = [{"caption": "a red circle"}, {"caption": "a blue square"}, {"caption": ""}]
    one, three = (generate(ldm, items, latent_size=(8, 12), batch_size=b, seed=3, steps=2) for b in (1, 3))
    assert one.shape == (3, 3, 32, 48)
    torch.testing.assert_close(one, three, rtol=0, atol=1e-4)
    _, ae, _ = load_run(tiny_runs["ae"])
    panel = ae.visualize({"image": images})["reconstructions"]
    assert panel.images.shape == (4, 3, 32, 48) and panel.group == 2
    # the training step's loss and gradient on a non-square batch: pixels, and cached latents (12 x 8)
    ldm.train()
    for batch in ({"caption": ["a", "b"], "image": images},
                  {"caption": ["a", "b"], "latent_mean": torch.randn(2, 4, 12, 8), "latent_logvar": torch.zeros(2, 4, 12, 8)}):
        ldm.zero_grad()
        loss, _ = ldm(batch, step=0)
        loss.backward()
        assert torch.isfinite(loss) and ldm.unet.out[-1].weight.grad.abs().sum() > 0


def sample_cli(run_dir, out, *extra):
    from tests.launch import run

    return run([sys.executable, "train/sample.py", f"run_dir={run_dir}", "prompts=[a red circle]", "repeats=2",
                "steps=3", "device=cpu", "progress=false", f"out_dir={out}", *extra], check=False, timeout=300)


@pytest.mark.slow
def test_sample_command_height_width(ldm_run, tmp_path):
    """`train/sample.py … height=32 width=48` through the real CLI: 48 x 32 PNGs and a grid of them."""
    from PIL import Image

    done = sample_cli(ldm_run, tmp_path, "height=32", "width=48")
    assert done.returncode == 0, done.stderr
    pngs = sorted(tmp_path.glob("0*.png"))
    assert len(pngs) == 2 and all(Image.open(p).size == (48, 32) for p in pngs)
    grid = Image.open(tmp_path / "grid.png")
    assert grid.width == 2 * (48 * 4 + 4) + 4  # two 4x tiles of 192 x 128


def test_a_height_the_model_cannot_take_is_one_line(ldm_run, tmp_path):
    """Refused after the run's config is read (the factor is the model's) and before its weights load."""
    bad = sample_cli(ldm_run, tmp_path, "height=36")
    assert bad.returncode != 0 and "Traceback" not in bad.stderr, bad.stderr
    assert bad.stderr.strip().splitlines()[-1] == ("[ldm] height=36 width=32: each must be a positive multiple of "
                                                   "8 px for this model (autoencoder factor 4 x UNet factor 2)")
    assert not (tmp_path / "grid.png").exists()


@pytest.mark.parametrize("key, value", [("height", 0), ("width", -32)])
def test_a_size_that_is_not_positive_is_refused_before_anything_loads(key, value):
    from omegaconf import OmegaConf

    from train.sample import SampleConfig, check_options

    cfg = OmegaConf.merge(OmegaConf.structured(SampleConfig), {"run_dir": "r", "out_dir": "o", key: value})
    with pytest.raises(ValueError, match=rf"^{key}={value}: must be a positive number of pixels"):
        check_options(cfg)
