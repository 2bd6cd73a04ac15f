"""Stage-1 autoencoders (Rombach et al. 2022, Sec. 3.1): KL-regularised and VQ-regularised.

Both expose the contract stage 2 relies on (docs/architecture.md):
  encode_latent(x, sample=True) -> z (unscaled), decode(z) -> x, forward(x) -> (reconstruction, reg),
  latent_channels, downsample_factor, buffers scale_factor / latent_mean / latent_std, last_layer().
`reg` is the posterior (DiagonalGaussianDistribution) for KL, and the quantiser's dict
{"loss", "usage", "perplexity", "indices"} for VQ; AutoencoderLoss reads either.
Parameter and buffer names follow CompVis/latent-diffusion, so its checkpoints load by name.
"""
from __future__ import annotations

import json
import os
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from ldm.data.integrity import verify_tensors, with_checksum
from ldm.diffusion import draws
from ldm.modules.ae_blocks import Decoder, Encoder
from ldm.modules.quantize import VectorQuantizer

CONFIG_METADATA_KEY = "ldm_autoencoder_config"
SAMPLE_METADATA_KEY = "ldm_sample_posterior"  # JSON bool: decoder trained on posterior samples (true) or the mean
HOW_TO_GET_ONE = "train one with `python train/main.py model=autoencoder_kl_demo`"


class DiagonalGaussianDistribution:
    """q(z|x) = N(mean, diag(exp(logvar))) from the encoder's 2*C channels (LDM App. G, KL-reg)."""

    def __init__(self, parameters: torch.Tensor):
        self.mean, logvar = torch.chunk(parameters, 2, dim=1)
        self.logvar = logvar.clamp(-30.0, 20.0)  # CompVis bounds: keeps exp() finite
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    def sample(self) -> torch.Tensor:
        # reparameterisation trick; ε drawn in the contiguous layout (randn_like would follow the strides the
        # convolutions chose, channels-last with oneDNN on CPU), so a seed gives the same z whatever the backend
        eps = draws.randn(self.mean.shape, dtype=self.mean.dtype, device=self.mean.device)  # per sample in training
        return self.mean + self.std * eps

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self) -> torch.Tensor:
        """KL(q || N(0, I)) per sample, summed over C, H, W: (B,)."""
        return 0.5 * (self.mean.pow(2) + self.var - 1.0 - self.logvar).sum(dim=(1, 2, 3))


class _LatentAutoencoder(nn.Module):
    """What KL and VQ share: encoder/decoder, 1x1 (post_)quant_conv, latent statistics buffers."""

    def __init__(self, embed_dim: int, moments: int, ch: int, ch_mult: Sequence[int],
                 num_res_blocks: int, z_channels: int, attn_resolutions: Sequence[int], dropout: float,
                 in_channels: int, out_ch: int, resolution: int, double_z: bool, norm_groups: int = 32):
        super().__init__()
        blocks = dict(ch=ch, ch_mult=tuple(ch_mult), num_res_blocks=num_res_blocks,
                      attn_resolutions=tuple(attn_resolutions), dropout=dropout, in_channels=in_channels,
                      resolution=resolution, z_channels=z_channels, double_z=double_z,
                      norm_groups=norm_groups)
        self.encoder = Encoder(**blocks)
        self.decoder = Decoder(out_ch=out_ch, **blocks)
        # `moments`: 2 for a Gaussian (mean, log-variance per channel), 1 for VQ.
        self.quant_conv = nn.Conv2d(moments * z_channels, moments * embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(embed_dim, z_channels, 1)
        self.latent_channels = embed_dim
        self.downsample_factor = 2 ** (len(ch_mult) - 1)
        # Filled by AutoencoderTask.latent_statistics at the end of stage 1; stage 2 trains on
        # scale_factor * z (Sec. 4.3.2 / App. G: 1/std of the latents, 0.18215 for the SD VAE).
        self.register_buffer("scale_factor", torch.tensor(1.0))
        self.register_buffer("latent_mean", torch.zeros(embed_dim))
        self.register_buffer("latent_std", torch.ones(embed_dim))

    def last_layer(self) -> nn.Parameter:
        """The decoder's output conv weight: where the adaptive GAN weight compares gradient norms."""
        return self.decoder.conv_out.weight


class AutoencoderKL(_LatentAutoencoder):
    """KL-regularised autoencoder; the KL-f8 preset (ch 128, [1,2,4,4]) is the Stable Diffusion VAE."""

    def __init__(self, embed_dim: int, ch: int, ch_mult: Sequence[int], num_res_blocks: int, z_channels: int,
                 attn_resolutions: Sequence[int] = (), dropout: float = 0.0, in_channels: int = 3,
                 out_ch: int = 3, resolution: int = 256, norm_groups: int = 32):
        super().__init__(embed_dim, 2, ch, ch_mult, num_res_blocks, z_channels, attn_resolutions,
                         dropout, in_channels, out_ch, resolution, double_z=True, norm_groups=norm_groups)

    def posterior(self, x: torch.Tensor) -> DiagonalGaussianDistribution:
        return DiagonalGaussianDistribution(self.quant_conv(self.encoder(x)))

    def encode_latent(self, x: torch.Tensor, sample: bool = True) -> torch.Tensor:
        posterior = self.posterior(x)
        return posterior.sample() if sample else posterior.mode()

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(z))

    def forward(self, x: torch.Tensor, sample: bool = True) -> tuple[torch.Tensor, DiagonalGaussianDistribution]:
        posterior = self.posterior(x)
        return self.decode(posterior.sample() if sample else posterior.mode()), posterior


class VQModel(_LatentAutoencoder):
    """VQ-regularised autoencoder. As in LDM, the latent for stage 2 is the *pre-quantisation* encoder
    output and `decode` quantises it first ("the quantiser absorbed into the decoder", Sec. 3.1)."""

    def __init__(self, n_embed: int, embed_dim: int, ch: int, ch_mult: Sequence[int], num_res_blocks: int,
                 z_channels: int, beta: float = 0.25, restart_after: int = 200,
                 attn_resolutions: Sequence[int] = (), dropout: float = 0.0, in_channels: int = 3,
                 out_ch: int = 3, resolution: int = 256, norm_groups: int = 32):
        super().__init__(embed_dim, 1, ch, ch_mult, num_res_blocks, z_channels, attn_resolutions,
                         dropout, in_channels, out_ch, resolution, double_z=False, norm_groups=norm_groups)
        self.quantize = VectorQuantizer(n_embed, embed_dim, beta=beta, restart_after=restart_after)

    def encode_latent(self, x: torch.Tensor, sample: bool = True) -> torch.Tensor:
        return self.quant_conv(self.encoder(x))  # deterministic: `sample` is accepted for the shared contract

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        z_q, _ = self.quantize(z)
        return self.decoder(self.post_quant_conv(z_q))

    def forward(self, x: torch.Tensor, sample: bool = True) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        z_q, quantizer_out = self.quantize(self.encode_latent(x))
        return self.decoder(self.post_quant_conv(z_q)), quantizer_out


# --- one-file checkpoints: safetensors weights + the `_target_` config in the metadata -------------------

def save_autoencoder(model: nn.Module, path: str | os.PathLike, config: Mapping[str, Any],
                     sample_posterior: bool = True) -> None:
    """Write `model`'s state dict to ONE safetensors file; `config` (the `_target_` dict that builds it)
    goes into the metadata as JSON so `ldm.convert.load_autoencoder(path)` needs nothing else.

    `sample_posterior` records which latents the decoder was trained on (KL posterior samples, or the
    posterior mean); loading sets it on the model so stage 2 encodes the same way."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    if hasattr(config, "_metadata"):  # an OmegaConf DictConfig: resolve interpolations first
        from omegaconf import OmegaConf
        config = OmegaConf.to_container(config, resolve=True)
    if "_target_" not in config:
        raise ValueError(f"save_autoencoder: config needs a `_target_` key naming the class, got keys {sorted(config)}")
    state = {name: tensor.detach().contiguous().cpu() for name, tensor in model.state_dict().items()}
    bad = [name for name, t in state.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:  # e.g. scale_factor NaN after a diverged run: stage 2 would train on NaN latents
        from ldm.errors import NonFiniteError

        kept = "the existing file is untouched" if os.path.exists(path) else "no file was written"
        raise NonFiniteError(f"refusing to write {path}: non-finite values in {bad[:5]}; {kept}")
    tmp = f"{path}.tmp"
    metadata = with_checksum(state, {CONFIG_METADATA_KEY: json.dumps(dict(config)),  # verified by load_autoencoder
                                     SAMPLE_METADATA_KEY: json.dumps(bool(sample_posterior)), "format": "pt"})
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        save_file(state, tmp, metadata=metadata)
        os.replace(tmp, path)  # atomic: a crash never leaves a half-written autoencoder behind
    except (OSError, SafetensorError) as e:  # disk full, permissions: say where, and that the old file is intact
        from ldm.errors import CheckpointWriteError, write_error_message

        if os.path.exists(tmp):
            try:
                os.remove(tmp)
            except OSError:
                pass
        kept = "the existing file is untouched" if os.path.exists(path) else "no file was written"
        raise CheckpointWriteError(write_error_message(e, path, kept)) from None  # the OS's reason, not torch's


def _read_metadata(path: str) -> dict[str, str]:
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
    except Exception as error:  # safetensors raises its own error types for non-safetensors bytes
        raise ValueError(f"{path} is not a safetensors file ({error}); {HOW_TO_GET_ONE}") from error
    if CONFIG_METADATA_KEY not in metadata:
        raise ValueError(f"{path} is a safetensors file without an autoencoder config (metadata key "
                         f"'{CONFIG_METADATA_KEY}'), so it was not written by save_autoencoder; {HOW_TO_GET_ONE}")
    return metadata


# The only classes an autoencoder file may name. Checked BEFORE anything is built: the metadata is
# untrusted input, and instantiating an arbitrary `_target_` (e.g. builtins.open) runs code.
AUTOENCODER_CLASSES = {"ldm.models.autoencoder.AutoencoderKL": AutoencoderKL,
                       "ldm.models.autoencoder.VQModel": VQModel}


def _plain(value: Any) -> bool:
    """JSON data with no nested instantiation keys (`_target_`, `_partial_`, ...)."""
    if isinstance(value, dict):
        return all(not str(k).startswith("_") and _plain(v) for k, v in value.items())
    if isinstance(value, list):
        return all(_plain(v) for v in value)
    return value is None or isinstance(value, (bool, int, float, str))


def build_from_config(config: Any, path: str) -> nn.Module:
    """The autoencoder a file's metadata config describes, if (and only if) it names an allowed class
    with plain arguments; a ValueError naming `path` otherwise."""
    target = config.get("_target_") if isinstance(config, dict) else None
    if target not in AUTOENCODER_CLASSES:
        raise ValueError(f"{path}: its metadata names `_target_` {target!r}, which is not an autoencoder class "
                         f"(allowed: {', '.join(AUTOENCODER_CLASSES)}); nothing was built. {HOW_TO_GET_ONE}")
    params = {k: v for k, v in config.items() if k != "_target_"}
    if not _plain(params):
        raise ValueError(f"{path}: the autoencoder config in its metadata has nested `_…_` keys or non-JSON "
                         f"values; only plain arguments are accepted, nothing was built")
    try:
        return AUTOENCODER_CLASSES[target](**params)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: its metadata config does not build {target} ({e})") from None


def is_autoencoder_file(path: str | os.PathLike) -> bool:
    """Whether `path` is a safetensors file written by `save_autoencoder` (its metadata holds the config),
    whatever its name ends with. Reads the header only."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        return False
    try:
        _read_metadata(path)
    except ValueError:
        return False
    return True


def read_autoencoder_file(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> nn.Module:
    """The reader of `save_autoencoder`'s one-file format; callers use `ldm.convert.load_autoencoder`, which
    also reads SD single files and diffusers folders. Rebuilds the autoencoder from the config in `path`'s
    metadata and loads its weights strictly.

    The config may only name a class of AUTOENCODER_CLASSES (checked before anything is built); every
    key and shape is checked before anything is copied, so an error never leaves a partially loaded model."""
    from safetensors.torch import load_file

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no autoencoder checkpoint at {path}; {HOW_TO_GET_ONE}")
    metadata = _read_metadata(path)
    try:
        config = json.loads(metadata[CONFIG_METADATA_KEY])
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: the autoencoder config in its metadata is not JSON ({e})") from None
    model = build_from_config(config, path)
    state = load_file(path, device=str(map_location))
    verify_tensors(path, state, metadata)  # flipped bytes name the file instead of loading silently
    expected = model.state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    mismatched = [f"{name}: file {tuple(state[name].shape)} vs model {tuple(expected[name].shape)}"
                  for name in expected if name in state and state[name].shape != expected[name].shape]
    if missing or unexpected or mismatched:
        raise ValueError(f"{path} does not match its config {config.get('_target_')}: "
                         f"missing {missing[:5]}, unexpected {unexpected[:5]}, shape mismatch {mismatched[:5]}")
    model.load_state_dict(state, strict=True)
    # Files from before the key existed were trained on posterior samples (the paper's default).
    model.sample_posterior = json.loads(metadata.get(SAMPLE_METADATA_KEY, "true"))
    return model.to(map_location)
