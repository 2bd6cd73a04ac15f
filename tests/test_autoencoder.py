import json
import os

import pytest
import torch

from ldm.convert import load_autoencoder
from ldm.models.autoencoder import CONFIG_METADATA_KEY, AutoencoderKL, VQModel, save_autoencoder
from ldm.modules.quantize import VectorQuantizer

TINY = dict(ch=32, ch_mult=[1, 2], num_res_blocks=1, attn_resolutions=[8], resolution=16)
KL_CONFIG = {"_target_": "ldm.models.autoencoder.AutoencoderKL", "embed_dim": 3, "z_channels": 4, **TINY}
VQ_CONFIG = {"_target_": "ldm.models.autoencoder.VQModel", "n_embed": 16, "embed_dim": 3, "z_channels": 3, **TINY}


def test_kl_f8_has_the_stable_diffusion_vae_parameter_count():
    with torch.device("meta"):
        model = AutoencoderKL(embed_dim=4, ch=128, ch_mult=[1, 2, 4, 4], num_res_blocks=2, z_channels=4)
    assert sum(p.numel() for p in model.parameters()) == 83_653_863
    assert model.latent_channels == 4 and model.downsample_factor == 8


@pytest.mark.parametrize("config", [KL_CONFIG, VQ_CONFIG], ids=["kl", "vq"])
def test_forward_backward_shapes(config):
    torch.manual_seed(0)
    kwargs = {k: v for k, v in config.items() if k != "_target_"}
    model = (AutoencoderKL if "KL" in config["_target_"] else VQModel)(**kwargs)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    rec, reg = model(x)
    assert rec.shape == x.shape
    z = model.encode_latent(x)
    assert z.shape == (2, model.latent_channels, 8, 8) and model.downsample_factor == 2
    assert model.decode(z).shape == x.shape
    reg_loss = reg.kl().mean() if isinstance(model, AutoencoderKL) else reg["loss"]
    (rec.abs().mean() + reg_loss).backward()
    assert model.encoder.conv_in.weight.grad.abs().sum() > 0  # reaches the encoder (straight-through for VQ)
    assert model.last_layer() is model.decoder.conv_out.weight
    for name in ("scale_factor", "latent_mean", "latent_std"):
        assert name in dict(model.named_buffers())
    if isinstance(model, VQModel):
        assert model.quantize.embedding.weight.grad.abs().sum() > 0  # codebook term trains the codebook
        assert 0 < reg["usage"] <= 1 and 1 <= reg["perplexity"] <= 16


def test_kl_sample_vs_mode_and_kl_closed_form():
    model = AutoencoderKL(**{k: v for k, v in KL_CONFIG.items() if k != "_target_"})
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    posterior = model.posterior(x)
    assert torch.equal(model.encode_latent(x, sample=False), posterior.mean)
    assert not torch.equal(model.encode_latent(x, sample=True), posterior.mean)
    m, lv = posterior.mean.double(), posterior.logvar.double()
    expected = (0.5 * (m ** 2 + lv.exp() - 1 - lv)).flatten(1).sum(1)
    torch.testing.assert_close(posterior.kl().double(), expected, rtol=1e-5, atol=1e-5)


def test_dead_code_restart_revives_unused_codes():
    torch.manual_seed(0)
    quantizer = VectorQuantizer(n_embed=32, embed_dim=4, restart_after=2).train()
    with torch.no_grad():  # all codes far away except code 0: everything maps to code 0
        quantizer.embedding.weight.fill_(100.0)
        quantizer.embedding.weight[0].zero_()
    z = torch.randn(4, 4, 8, 8)
    _, first = quantizer(z)
    assert first["usage"].item() == pytest.approx(1 / 32)
    quantizer(z)  # second unused step: codes 1..31 now reach restart_after
    _, revived = quantizer(z)  # restarted from this batch's encoder outputs, then used at once
    assert revived["usage"].item() > 0.5
    assert (quantizer.embedding.weight.abs() < 50).all()  # every old far-away code was replaced
    flat = z.permute(0, 2, 3, 1).reshape(-1, 4)
    restarted = quantizer.embedding.weight[1:]
    distance = (restarted[:, None] - flat[None]).abs().sum(-1).min(dim=1).values
    assert distance.max() == 0  # each revived code is a real encoder output of the batch
    quantizer.eval()  # no restarts in eval
    before = quantizer.embedding.weight.clone()
    for _ in range(3):
        quantizer(z + 50)
    assert torch.equal(before, quantizer.embedding.weight)


@pytest.mark.parametrize("config", [KL_CONFIG, VQ_CONFIG], ids=["kl", "vq"])
def test_save_load_round_trip(tmp_path, config):
    from hydra.utils import instantiate

    torch.manual_seed(0)
    model = instantiate(config).eval()
    model.scale_factor.fill_(0.2)
    model.latent_std.copy_(torch.tensor([1.0, 2.0, 3.0]))
    path = tmp_path / "ae.safetensors"
    save_autoencoder(model, path, config)
    loaded = load_autoencoder(path).eval()
    assert type(loaded) is type(model) and loaded.scale_factor.item() == pytest.approx(0.2)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    z = model.encode_latent(x, sample=False)
    assert torch.equal(loaded.encode_latent(x, sample=False), z)
    assert torch.equal(loaded.decode(z), model.decode(z))


def path_of_ours(tmp_path):
    model = AutoencoderKL(**{k: v for k, v in KL_CONFIG.items() if k != "_target_"})
    save_autoencoder(model, tmp_path / "ours.safetensors", KL_CONFIG)
    return tmp_path / "ours.safetensors"


def test_one_load_autoencoder_for_every_source(tmp_path):
    """Ours, read through the one public loader: eval mode, stored scale, and the override applies."""
    ours = path_of_ours(tmp_path)
    loaded = load_autoencoder(ours)
    assert not loaded.training and loaded.sample_posterior is True
    assert load_autoencoder(ours, scale_factor=0.5).scale_factor.item() == 0.5
    import ldm.models.autoencoder as module
    assert not hasattr(module, "load_autoencoder")  # the file reader is read_autoencoder_file, not a second loader


def test_load_errors_are_clear(tmp_path):
    from safetensors.torch import save_file

    with pytest.raises(FileNotFoundError, match="model=autoencoder_kl_demo"):
        load_autoencoder(tmp_path / "missing.safetensors")
    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, str(foreign))
    with pytest.raises(ValueError, match="holds no autoencoder: no 'first_stage_model.encoder.conv_in.weight'"):
        load_autoencoder(foreign)  # neither ours (no config in the metadata) nor an SD / CompVis VAE
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a safetensors file at all")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        load_autoencoder(garbage)
    with pytest.raises(ValueError, match="carries its own config"):
        load_autoencoder(path_of_ours(tmp_path), config={"ch": 8})
    model = AutoencoderKL(**{k: v for k, v in KL_CONFIG.items() if k != "_target_"})
    wrong = tmp_path / "wrong.safetensors"
    save_autoencoder(model, wrong, {**KL_CONFIG, "embed_dim": 5})  # config disagrees with the weights
    with pytest.raises(ValueError, match="shape mismatch.*quant_conv"):
        load_autoencoder(wrong)
    assert not os.path.exists(f"{wrong}.tmp")


PRESETS = ["autoencoder_kl_f4", "autoencoder_kl_f8", "autoencoder_kl_f16", "autoencoder_vq_f4",
           "autoencoder_vq_f8", "autoencoder_vq_f16", "autoencoder_kl_demo", "autoencoder_vq_demo",
           "autoencoder_kl_shapes"]


@pytest.mark.parametrize("name", PRESETS)
def test_presets_build_the_named_autoencoder(name):
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from ldm.config import check_targets

    cfg = OmegaConf.load(os.path.join(os.path.dirname(__file__), "..", "conf", "model", f"{name}.yaml"))
    assert cfg.name == name and set(cfg.optim) == {"autoencoder", "discriminator"}
    check_targets(cfg.task, "model.task")  # every key is an argument of the class it configures
    with torch.device("meta"):
        ae = instantiate(cfg.task.autoencoder)
    factor = 4 if name.endswith(("demo", "shapes")) else int(name.rsplit("_f", 1)[1])
    assert ae.downsample_factor == factor
    assert isinstance(ae, VQModel) == ("_vq_" in name)
    if name == "autoencoder_kl_f8":
        assert sum(p.numel() for p in ae.parameters()) == 83_653_863


def test_norm_groups_sets_every_group_norm():
    model = AutoencoderKL(embed_dim=4, ch=16, ch_mult=[1, 2], num_res_blocks=1, z_channels=4, norm_groups=8)
    norms = [m for m in model.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert norms and all(m.num_groups == 8 for m in norms)
    default = AutoencoderKL(embed_dim=4, ch=32, ch_mult=[1, 2], num_res_blocks=1, z_channels=4)
    assert all(m.num_groups == 32 for m in default.modules() if isinstance(m, torch.nn.GroupNorm))
    with pytest.raises(ValueError):  # 16 channels cannot make 32 groups: the paper default needs ch >= 32
        AutoencoderKL(embed_dim=4, ch=16, ch_mult=[1, 2], num_res_blocks=1, z_channels=4)


@pytest.mark.parametrize("sample_posterior", [False, True])
def test_stage_two_encodes_the_way_the_decoder_was_trained(tmp_path, sample_posterior):
    """The stage-1 file records whether the decoder saw posterior samples or the mean; stage 2 follows it
    unless told otherwise (a mean-trained decoder turns unit-variance posterior noise into speckle)."""
    from functools import partial

    from ldm.models.unet import UNetModel
    from ldm.modules.encoders import ClassEmbedder
    from ldm.tasks.latent_diffusion import LatentDiffusionTask

    torch.manual_seed(0)
    path = tmp_path / "ae.safetensors"
    save_autoencoder(AutoencoderKL(**{k: v for k, v in KL_CONFIG.items() if k != "_target_"}), path, KL_CONFIG,
                     sample_posterior=sample_posterior)
    first_stage = load_autoencoder(path)
    assert first_stage.sample_posterior is sample_posterior
    unet = partial(UNetModel, model_channels=16, num_res_blocks=1, attention_resolutions=[2], channel_mult=[1, 2],
                   num_head_channels=8, norm_groups=8)
    task = LatentDiffusionTask(unet, ClassEmbedder(3, 16), first_stage).train()
    assert task.sample_posterior is sample_posterior
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    mean = first_stage.encode_latent(x, sample=False) * first_stage.scale_factor
    assert torch.equal(task.encode(x), mean) is not sample_posterior  # samples differ from the mean
    forced = LatentDiffusionTask(unet, ClassEmbedder(3, 16), first_stage, sample_posterior=True).train()
    assert not torch.equal(forced.encode(x), mean)  # an explicit setting wins


def test_files_without_the_flag_were_trained_on_samples(tmp_path):
    from safetensors.torch import save_file

    model = AutoencoderKL(**{k: v for k, v in KL_CONFIG.items() if k != "_target_"})
    path = tmp_path / "old.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path,
              metadata={CONFIG_METADATA_KEY: json.dumps(KL_CONFIG), "format": "pt"})
    assert load_autoencoder(path).sample_posterior is True
