"""ldm.convert: CompVis/diffusers weights in and out.

References: diffusers' own `UNet2DConditionModel` / `AutoencoderKL` (random weights, reduced width) and its own
single-file converter (`convert_ldm_unet_checkpoint`), plus full-size SD key sets built on the meta device.
"""
import json
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from ldm.convert import (CheckpointMismatchError, load_autoencoder, load_unet, read_unet_weights,
                         read_vae_weights)
from ldm.convert import arch as archs
from ldm.convert import keymap
from ldm.convert.export import unet_to_diffusers, vae_to_diffusers
from ldm.models.unet import UNetModel

diffusers = pytest.importorskip("diffusers")

CONTEXT_DIM = 24
TINY_UNET = dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64, 64), layers_per_block=2,
                 down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                 cross_attention_dim=CONTEXT_DIM, norm_num_groups=8)
LAYOUTS = {  # SD-v1: one head count, 1x1-conv projections; SD-2: per-level heads of one width, linear projections
    "sd_v1": dict(attention_head_dim=2),
    "sd_v2": dict(attention_head_dim=[2, 4, 4], use_linear_projection=True),
}
# What a single file cannot say (ldm/convert/arch.py): the head split and the GroupNorm group count.
SINGLE_FILE_CONFIG = {"sd_v1": {"num_heads": 2, "norm_groups": 8}, "sd_v2": {"num_head_channels": 16, "norm_groups": 8}}
TINY_VAE = dict(block_out_channels=(32, 64), layers_per_block=1, down_block_types=("DownEncoderBlock2D",) * 2,
                up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=32, latent_channels=4, sample_size=16,
                scaling_factor=0.3)


def randomize(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Random weights everywhere (diffusers zero-initialises output convs, which would hide mapping errors);
    scaled by fan-in so activations stay O(1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if p.ndim > 1:
                p.copy_(noise / p[0].numel() ** 0.5)
            else:  # norm scales around 1, biases around 0
                p.copy_(0.1 * noise + (1.0 if "norm" in name and name.endswith("weight") else 0.0))
    return model.eval()


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def unet_inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 700]),
            torch.randn(2, 5, CONTEXT_DIM, generator=g))


@pytest.fixture(scope="module", params=sorted(LAYOUTS))
def unet_sources(request, tmp_path_factory):
    """A random diffusers UNet saved as a diffusers folder, and as CompVis single files (.safetensors and a
    Lightning-style .ckpt) holding the UNet, a distinct EMA, and a VAE beside it."""
    layout = request.param
    root = tmp_path_factory.mktemp(layout)
    reference = randomize(diffusers.UNet2DConditionModel(**TINY_UNET, **LAYOUTS[layout]), seed=1)
    reference.save_pretrained(root / "diffusers" / "unet")
    ours, _, _ = read_unet_weights(root / "diffusers")
    ema = {k: v * 0.5 for k, v in ours.items()}
    full = {"model.diffusion_model." + k: v for k, v in ours.items()}
    full.update({keymap.compvis_ema_key(k): v for k, v in ema.items()})
    full.update({"model_ema.decay": torch.tensor(0.9999), "model_ema.num_updates": torch.tensor(10)})
    full["first_stage_model.encoder.conv_in.weight"] = torch.zeros(8, 3, 3, 3)  # other parts are left alone
    save_file(full, str(root / "model.safetensors"))
    torch.save({"state_dict": full, "global_step": 10}, root / "model.ckpt")
    return dict(layout=layout, root=root, reference=reference, ema=ema)


@pytest.fixture(scope="module")
def vae_sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("vae")
    reference = randomize(diffusers.AutoencoderKL(**TINY_VAE), seed=2)
    reference.save_pretrained(root / "diffusers" / "vae")
    ours, _, _ = read_vae_weights(root / "diffusers")
    save_file({"first_stage_model." + k: v for k, v in ours.items()}, str(root / "sd.safetensors"))
    # A stand-alone CompVis VAE file: bare keys plus its training loss, which is skipped.
    torch.save({"state_dict": {**ours, "loss.logvar": torch.zeros(())}}, root / "vae.ckpt")
    return dict(root=root, reference=reference)


# ------------------------------------------------------------------------------------------ key maps
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_full_size_sd_unet_key_map_is_a_bijection(layout):
    """Our SD-v1 / SD-2 UNets (859,520,964 / 865,910,724 parameters) against diffusers' at full size, built
    on the meta device: every name maps, the shapes agree, and the inverse map returns the name."""
    v2 = layout == "sd_v2"
    ours_kwargs = dict(in_channels=4, out_channels=4, model_channels=320, num_res_blocks=2,
                       attention_resolutions=[1, 2, 4], channel_mult=[1, 2, 4, 4], context_dim=1024 if v2 else 768,
                       use_linear_in_transformer=v2, **({"num_head_channels": 64} if v2 else {"num_heads": 8}))
    theirs_kwargs = dict(cross_attention_dim=1024 if v2 else 768, use_linear_projection=v2,
                         attention_head_dim=[5, 10, 20, 20] if v2 else 8)
    with torch.device("meta"):
        ours = {k: v.shape for k, v in UNetModel(**ours_kwargs).state_dict().items()}
        theirs = {k: v.shape for k, v in diffusers.UNet2DConditionModel(**theirs_kwargs).state_dict().items()}
    mapped = {keymap.unet_key_to_diffusers(k, 2): shape for k, shape in ours.items()}
    assert mapped == theirs
    up_attention = [False, True, True, True]
    assert {keymap.unet_key_from_diffusers(k, 2, lambda _, u: up_attention[u]) for k in theirs} == set(ours)
    # The architecture read back from the shapes is the one we built (heads by Stability's convention).
    inferred = archs.infer_unet_arch({k: torch.empty(s, device="meta") for k, s in ours.items()})
    assert {k: inferred[k] for k in ours_kwargs} == ours_kwargs
    assert archs.unet_arch_from_diffusers(archs.diffusers_unet_config(ours_kwargs)) == {
        **ours_kwargs, "num_heads": ours_kwargs.get("num_heads", -1),
        "num_head_channels": ours_kwargs.get("num_head_channels", -1), "transformer_depth": 1,
        "use_scale_shift_norm": False, "norm_groups": 32}
    assert sum(s.numel() for s in ours.values()) == (865_910_724 if v2 else 859_520_964)


def test_full_size_sd_vae_key_map_is_a_bijection():
    from ldm.models.autoencoder import AutoencoderKL

    with torch.device("meta"):
        ours = AutoencoderKL(embed_dim=4, ch=128, ch_mult=[1, 2, 4, 4], num_res_blocks=2, z_channels=4).state_dict()
        theirs = diffusers.AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                                         down_block_types=("DownEncoderBlock2D",) * 4,
                                         up_block_types=("UpDecoderBlock2D",) * 4, sample_size=256).state_dict()
    weights = {k: v for k, v in ours.items() if k not in ("scale_factor", "latent_mean", "latent_std")}
    mapped = keymap.rename_state(weights, lambda k: keymap.vae_key_to_diffusers(k, 4), keymap.vae_tensor_to_diffusers)
    assert {k: v.shape for k, v in mapped.items()} == {k: v.shape for k, v in theirs.items()}
    assert {keymap.vae_key_from_diffusers(k, 4) for k in theirs} == set(weights)
    assert sum(v.numel() for v in weights.values()) == 83_653_863


def test_our_compvis_names_match_diffusers_own_converter(unet_sources, vae_sources):
    """diffusers' single-file converter (an independent CompVis -> diffusers map) turns our CompVis-named
    files back into exactly the reference weights."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint
    from safetensors.torch import load_file

    full = load_file(unet_sources["root"] / "model.safetensors")
    config = dict(unet_sources["reference"].config)
    converted = convert_ldm_unet_checkpoint({k: v for k, v in full.items() if not k.startswith("model_ema")}, config)
    expected = unet_sources["reference"].state_dict()
    assert converted.keys() == expected.keys()
    assert all(torch.equal(converted[k], expected[k]) for k in expected)
    vae = load_file(vae_sources["root"] / "sd.safetensors")
    converted = convert_ldm_vae_checkpoint(vae, dict(vae_sources["reference"].config))
    expected = vae_sources["reference"].state_dict()
    assert converted.keys() == expected.keys()
    assert all(torch.equal(converted[k].reshape(expected[k].shape), expected[k]) for k in expected)


# -------------------------------------------------------------------------------------- parity (UNet)
@pytest.mark.parametrize("source", ["diffusers", "model.safetensors", "model.ckpt"])
def test_unet_parity(unet_sources, source):
    path = unet_sources["root"] / source
    config = SINGLE_FILE_CONFIG[unet_sources["layout"]] if source != "diffusers" else None
    ours = load_unet(path, config=config)
    x, t, context = unet_inputs()
    with torch.no_grad():
        expected = unet_sources["reference"](x, t, context).sample
        got = ours(x, t, context)
    assert rel_error(got, expected) <= 1e-5
    assert expected.std() > 0.1  # random weights everywhere: a real comparison, not of zeros


@pytest.mark.parametrize("source", ["model.safetensors", "model.ckpt"])
def test_unet_ema_weights_from_compvis_file(unet_sources, source):
    """`model_ema.diffusion_modelinput_blocks00weight` etc. (LitEma drops the dots) load with ema=True."""
    ours = load_unet(unet_sources["root"] / source, ema=True, config=SINGLE_FILE_CONFIG[unet_sources["layout"]])
    state = ours.state_dict()
    assert all(torch.equal(state[k], v) for k, v in unet_sources["ema"].items())
    with pytest.raises(CheckpointMismatchError, match="no EMA"):
        load_unet(unet_sources["root"] / "diffusers", ema=True)


# --------------------------------------------------------------------------------------- parity (VAE)
@pytest.mark.parametrize("source, scale", [("diffusers", 0.3), ("sd.safetensors", 0.18215), ("vae.ckpt", 0.18215)])
def test_vae_parity_and_scale_factor(vae_sources, source, scale):
    groups = None if source == "diffusers" else {"norm_groups": 32}  # a tiny layout: a single file must say it
    ours = load_autoencoder(vae_sources["root"] / source, config=groups)
    reference = vae_sources["reference"]
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        posterior = reference.encode(x).latent_dist
        assert rel_error(ours.encode_latent(x, sample=False), posterior.mean) <= 1e-5
        assert rel_error(ours.posterior(x).logvar, posterior.logvar) <= 1e-5
        assert rel_error(ours.decode(posterior.mean), reference.decode(posterior.mean).sample) <= 1e-5
    assert ours.scale_factor.item() == pytest.approx(scale)
    assert load_autoencoder(vae_sources["root"] / source, config=groups).scale_factor.item() == pytest.approx(scale)


def test_compvis_scale_factor_buffer_is_used(vae_sources, tmp_path):
    ours, _, _ = read_vae_weights(vae_sources["root"] / "diffusers")
    save_file({**{"first_stage_model." + k: v for k, v in ours.items()}, "scale_factor": torch.tensor(0.25)},
              str(tmp_path / "ldm.safetensors"))
    assert load_autoencoder(tmp_path / "ldm.safetensors", config={"norm_groups": 32}).scale_factor.item() == \
        pytest.approx(0.25)


# ------------------------------------------------------------------------------ round trip and export
def test_round_trip_ours_to_diffusers_folder_is_bit_identical(tmp_path):
    """Our UNet/VAE -> diffusers folder -> ours: the same tensors, bit for bit; diffusers loads the folder and
    computes what we compute."""
    from ldm.training.export import _write_model
    from ldm.models.autoencoder import AutoencoderKL

    unet = randomize(UNetModel(4, 4, 32, 1, [1, 2], [1, 2], num_head_channels=16, context_dim=CONTEXT_DIM,
                               use_linear_in_transformer=True, norm_groups=8, transformer_depth=2), seed=3)
    vae = randomize(AutoencoderKL(embed_dim=4, ch=32, ch_mult=[1, 2], num_res_blocks=1, z_channels=4, norm_groups=8),
                    seed=4)
    vae.scale_factor.fill_(0.4)
    _write_model(tmp_path / "unet", *unet_to_diffusers(unet, sample_size=8))
    _write_model(tmp_path / "vae", *vae_to_diffusers(vae))
    unet_back, vae_back = load_unet(tmp_path), load_autoencoder(tmp_path)
    for a, b in ((unet, unet_back), (vae, vae_back)):
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys()
        assert all(torch.equal(sa[k], sb[k]) for k in sa if k not in ("latent_mean", "latent_std"))
    theirs = diffusers.UNet2DConditionModel.from_pretrained(tmp_path / "unet").eval()
    x, t, context = unet_inputs()
    with torch.no_grad():
        assert rel_error(unet(x, t, context), theirs(x, t, context).sample) <= 1e-5
    their_vae = diffusers.AutoencoderKL.from_pretrained(tmp_path / "vae")
    assert their_vae.config.scaling_factor == pytest.approx(0.4)


# ------------------------------------------------------------------------------------------ bad input
def test_mismatched_keys_are_one_error_and_strict_false_loads_the_rest(unet_sources, tmp_path):
    from safetensors.torch import load_file

    full = load_file(unet_sources["root"] / "model.safetensors")
    full.pop("model.diffusion_model.out.2.bias")
    full["model.diffusion_model.bogus.weight"] = torch.zeros(3)
    full["model.diffusion_model.out.0.weight"] = torch.zeros(7)
    save_file(full, str(tmp_path / "bad.safetensors"))
    heads = SINGLE_FILE_CONFIG[unet_sources["layout"]]
    with pytest.raises(CheckpointMismatchError) as error:
        load_unet(tmp_path / "bad.safetensors", config=heads)
    message = str(error.value)
    for expected in ("1 missing: out.2.bias", "1 unexpected: bogus.weight", "out.0.weight: file (7,) vs model (32,)",
                     "strict=False", "bad.safetensors"):
        assert expected in message
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        partial = load_unet(tmp_path / "bad.safetensors", strict=False, config=heads)
    assert any("partial load" in str(w.message) for w in caught)
    good = load_unet(unet_sources["root"] / "model.safetensors", config=heads)
    assert torch.equal(partial.state_dict()["input_blocks.0.0.weight"], good.state_dict()["input_blocks.0.0.weight"])


class Payload:  # stands for any object a malicious or Lightning-bloated .ckpt carries
    pass


def test_pickles_are_read_with_weights_only(tmp_path):
    torch.save({"state_dict": {"input_blocks.0.0.weight": torch.zeros(1)}, "callbacks": Payload()},
               tmp_path / "evil.ckpt")
    with pytest.raises(ValueError, match="weights_only=True"):
        load_unet(tmp_path / "evil.ckpt")


def test_wrong_sources_say_what_they_are(tmp_path, vae_sources):
    with pytest.raises(CheckpointMismatchError, match="holds no UNet"):
        load_unet(vae_sources["root"] / "sd.safetensors")
    with pytest.raises(FileNotFoundError, match="without a diffusers UNet"):
        load_unet(vae_sources["root"] / "diffusers")
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel",
                                                               "time_embedding_type": "fourier"}))
    with pytest.raises(archs.ArchitectureError, match="time_embedding_type='fourier'"):
        load_unet(tmp_path)
    with pytest.raises(archs.ArchitectureError, match="channel_mult"):
        archs.diffusers_unet_config(dict(channel_mult=[2, 4], model_channels=8, context_dim=8))


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # diffusers' own numpy-2 warning in set_timesteps
@pytest.mark.parametrize("sampler, parameterization, schedule", [
    ("ddim", "eps", {"kind": "scaled_linear", "beta_start": 0.0015, "beta_end": 0.0195}),
    ("ddim", "v", {"kind": "scaled_linear", "zero_terminal_snr": True}),
    ("ddim", "eps", {"kind": "cosine"}),
    ("dpmpp_2m", "v", {"kind": "linear"}),
])
def test_exported_scheduler_samples_like_ours(sampler, parameterization, schedule):
    """The scheduler config the export writes makes diffusers take our sampler's steps."""
    from ldm.convert.export import scheduler_config
    from ldm.diffusion.schedule import NoiseSchedule
    from ldm.sampling import SAMPLERS

    config = scheduler_config(schedule, parameterization, sampler)
    reference = getattr(diffusers, config["_class_name"]).from_config(config)
    reference.set_timesteps(20)
    ours_schedule = NoiseSchedule.from_config(schedule)
    torch.testing.assert_close(reference.betas, ours_schedule.betas, rtol=2e-4, atol=1e-7)  # float32 cumprod

    def model_fn(x, t):  # changes fast with t, so every step's coefficients matter
        phase = t.to(x.dtype).view(-1, 1, 1, 1)
        return torch.tanh(x) * torch.cos(phase / 70) + 0.3 * torch.sin(phase / 37)

    x_T = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    x = x_T.clone()
    for t in reference.timesteps:
        x = reference.step(model_fn(x, t.repeat(2)), t, x).prev_sample
    ours = SAMPLERS[sampler](model_fn, x_T, ours_schedule, steps=20, parameterization=parameterization)
    torch.testing.assert_close(ours, x, rtol=1e-4, atol=1e-4)


def test_what_diffusers_cannot_express_is_a_clear_error():
    from ldm.models.autoencoder import VQModel

    self_attention = UNetModel(4, 4, 32, 1, [1], [1, 2], num_heads=2, norm_groups=8)  # ldm_uncond's kind
    with pytest.raises(archs.ArchitectureError, match="cross-attention"):
        unet_to_diffusers(self_attention)
    vq = VQModel(n_embed=16, embed_dim=4, ch=32, ch_mult=[1, 2], num_res_blocks=1, z_channels=4, norm_groups=8)
    with pytest.raises(archs.ArchitectureError, match="KL autoencoder"):
        vae_to_diffusers(vq)


def test_compvis_vq_first_stage_loads_unscaled(tmp_path):
    """The paper's VQ-f4/f8 models (LDM-VQ presets) as CompVis files: `first_stage_model.*` with
    `quantize.embedding.weight`, a training loss beside it in stand-alone files; scale factor 1.0."""
    from ldm.models.autoencoder import VQModel

    vq = randomize(VQModel(n_embed=16, embed_dim=3, ch=32, ch_mult=[1, 2], num_res_blocks=1, z_channels=3,
                           attn_resolutions=[16], resolution=32), seed=5)
    state = {k: v for k, v in vq.state_dict().items()
             if k not in ("scale_factor", "latent_mean", "latent_std", "quantize.steps_unused")}
    torch.save({"state_dict": {**state, "loss.discriminator.main.0.weight": torch.zeros(2)}}, tmp_path / "vq-f4.ckpt")
    save_file({"first_stage_model." + k: v for k, v in state.items()}, str(tmp_path / "ldm-vq.safetensors"))
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    for name in ("vq-f4.ckpt", "ldm-vq.safetensors"):
        loaded = load_autoencoder(tmp_path / name, config={"norm_groups": 32})
        assert isinstance(loaded, VQModel) and loaded.scale_factor.item() == 1.0
        with torch.no_grad():
            assert torch.equal(loaded.decode(loaded.encode_latent(x)), vq.decode(vq.encode_latent(x)))


V1_INFERENCE_YAML = """  # the layout of Stability's v1-inference.yaml, at tiny width
model:
  target: ldm.models.diffusion.ddpm.LatentDiffusion
  params:
    scale_factor: 0.5
    unet_config:
      target: ldm.modules.diffusionmodules.openaimodel.UNetModel
      params: {image_size: 32, in_channels: 4, out_channels: 4, model_channels: 32, attention_resolutions: [1],
               num_res_blocks: 1, channel_mult: [1, 2], num_heads: 4, use_spatial_transformer: true,
               transformer_depth: 1, context_dim: 24, use_checkpoint: true, legacy: false}
    first_stage_config:
      target: ldm.models.autoencoder.AutoencoderKL
      params:
        embed_dim: 4
        ddconfig: {double_z: true, z_channels: 4, resolution: 256, in_channels: 3, out_ch: 3, ch: 32,
                   ch_mult: [1, 2], num_res_blocks: 1, attn_resolutions: [], dropout: 0.0}
"""


def test_compvis_yaml_gives_what_shapes_cannot(tmp_path):
    """The YAML beside a CompVis file sets the head split (4 here, not the default 8) and the scale factor."""
    from ldm.models.autoencoder import AutoencoderKL

    (tmp_path / "v1-inference.yaml").write_text(V1_INFERENCE_YAML)
    unet = randomize(UNetModel(4, 4, 32, 1, [1], [1, 2], num_heads=4, context_dim=CONTEXT_DIM), seed=6)
    vae = randomize(AutoencoderKL(embed_dim=4, ch=32, ch_mult=[1, 2], num_res_blocks=1, z_channels=4), seed=7)
    save_file({**{"model.diffusion_model." + k: v for k, v in unet.state_dict().items()},
               **{"first_stage_model." + k: v for k, v in vae.state_dict().items()
                  if k not in ("scale_factor", "latent_mean", "latent_std")}}, str(tmp_path / "model.safetensors"))
    x, t, context = unet_inputs()
    with torch.no_grad():
        expected = unet(x, t, context)
        from_yaml = load_unet(tmp_path / "model.safetensors", config=tmp_path / "v1-inference.yaml")
        assert torch.equal(from_yaml(x, t, context), expected)
        with pytest.raises(archs.ArchitectureError, match="not a layout ldm knows.*YAML"):  # no guess (8 heads: wrong)
            load_unet(tmp_path / "model.safetensors")
    loaded = load_autoencoder(tmp_path / "model.safetensors", config=str(tmp_path / "v1-inference.yaml"))
    assert loaded.scale_factor.item() == 0.5
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in vae.state_dict().items() if k != "scale_factor")


# The released configs (huggingface.co/runwayml/stable-diffusion-v1-5 and stabilityai/stable-diffusion-2-1,
# unet/ and vae/config.json), abridged to the fields that are not diffusers' defaults.
DOWN = ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"]
UP = ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3
SD_UNET_CONFIGS = {
    "sd_v1": {"_class_name": "UNet2DConditionModel", "act_fn": "silu", "attention_head_dim": 8,
              "block_out_channels": [320, 640, 1280, 1280], "cross_attention_dim": 768, "down_block_types": DOWN,
              "up_block_types": UP, "layers_per_block": 2, "norm_eps": 1e-05, "norm_num_groups": 32,
              "sample_size": 64},
    "sd_v2": {"_class_name": "UNet2DConditionModel", "act_fn": "silu", "attention_head_dim": [5, 10, 20, 20],
              "block_out_channels": [320, 640, 1280, 1280], "cross_attention_dim": 1024, "down_block_types": DOWN,
              "up_block_types": UP, "layers_per_block": 2, "norm_num_groups": 32, "sample_size": 96,
              "use_linear_projection": True, "upcast_attention": True, "dual_cross_attention": False,
              "only_cross_attention": False, "num_class_embeds": None},
}
SD_VAE_CONFIG = {"_class_name": "AutoencoderKL", "act_fn": "silu", "block_out_channels": [128, 256, 512, 512],
                 "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
                 "in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 2,
                 "norm_num_groups": 32, "sample_size": 512}


def _preset(name):
    from hydra import compose, initialize_config_dir

    from ldm.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(Path(__file__).resolve().parents[1] / "conf"), version_base="1.3"):
        stage_two = ["model.first_stage.ckpt=unused"] if name.startswith("sd_") else []
        return compose("train", overrides=[f"model={name}", *stage_two])


@pytest.mark.parametrize("preset", sorted(SD_UNET_CONFIGS))
def test_sd_presets_fit_the_released_sd_weights(preset):
    """`model=sd_v1|sd_v2 model.init_from=<the released diffusers folder>` must load strictly: the preset's UNet
    and the one the released config describes have the same parameters and the same head split."""
    from hydra.utils import instantiate

    from ldm.modules.attention import SpatialTransformer

    config = SD_UNET_CONFIGS[preset]
    with torch.device("meta"):
        ours = instantiate(_preset(preset).model.task.unet)(in_channels=4, out_channels=4,
                                                             context_dim=config["cross_attention_dim"])
        released = UNetModel(**archs.unet_arch_from_diffusers(config))
    shapes = lambda m: {k: v.shape for k, v in m.state_dict().items()}  # noqa: E731
    heads = lambda m: [t.transformer_blocks[0].attn1.heads for t in m.modules()  # noqa: E731
                       if isinstance(t, SpatialTransformer)]
    assert shapes(ours) == shapes(released) and heads(ours) == heads(released)


def test_kl_f8_preset_fits_the_sd_vae():
    from hydra.utils import instantiate

    from ldm.models.autoencoder import AutoencoderKL

    with torch.device("meta"):
        ours = instantiate(_preset("autoencoder_kl_f8").model.task.autoencoder)
        released = AutoencoderKL(**archs.vae_arch_from_diffusers(SD_VAE_CONFIG))
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in released.state_dict().items()}
