"""Read pretrained UNet / KL-autoencoder weights from a CompVis/Stability single file or a diffusers folder.

Single files: `.safetensors`, or a `.ckpt`/`.pt`/`.pth`/`.bin` read with `torch.load(weights_only=True)` only
(never unpickling arbitrary objects). Keys: `model.diffusion_model.*` (UNet), `model_ema.*` (its EMA, dots
removed by CompVis' LitEma), `first_stage_model.*` (autoencoder), `cond_stage_model.*` (text encoder, not read
here: use the diffusers layout's `text_encoder/`), or a bare UNet / autoencoder state dict.
diffusers folders: a pipeline (`unet/`, `vae/`, optional `unet_ema/`) or one model folder, each with
`config.json` and `diffusion_pytorch_model[.fp16].safetensors` (or `.bin`, or a sharded `.index.json`).
"""
from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from ldm.convert import arch as archs
from ldm.convert import keymap
from ldm.data.integrity import safetensors_metadata, verify_tensors
from ldm.errors import RunError

UNET_PREFIX, VAE_PREFIX = "model.diffusion_model.", "first_stage_model."
VAE_STATE_BUFFERS = ("scale_factor", "latent_mean", "latent_std")  # ours, not part of any pretrained VAE file
VQ_STATE_BUFFERS = ("quantize.steps_unused",)  # our dead-code counter; zeros for a loaded codebook
VAE_IGNORED_PREFIXES = ("loss.",)  # stand-alone CompVis VAE files carry their training loss (LPIPS, discriminator)
TORCH_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
WEIGHT_NAMES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors",
                "diffusion_pytorch_model.bin", "diffusion_pytorch_model.fp16.bin")


class CheckpointMismatchError(ValueError, RunError):
    """Weights whose names or shapes do not fit the model; the message lists every offending key (a RunError:
    the CLIs print it as one line)."""


# ----------------------------------------------------------------------------------------------- reading
def read_state_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """All tensors of a single checkpoint file (a Lightning `{"state_dict": ...}` is unwrapped)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint file at {path}")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            state = load_file(str(path))
        except SafetensorError as error:  # truncated or not safetensors at all
            raise ValueError(f"{path} is not a readable safetensors file ({error})") from None
        verify_tensors(path, state, safetensors_metadata(path))  # files written by ldm carry a CRC-32
        return state
    if path.suffix not in TORCH_SUFFIXES:
        raise ValueError(f"{path}: unknown checkpoint type {path.suffix!r}; expected .safetensors or one of "
                         f"{TORCH_SUFFIXES} (or a diffusers folder)")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # pickle.UnpicklingError and friends: the file holds more than tensors
        raise ValueError(f"{path} cannot be read with torch.load(weights_only=True), the only way we read pickles "
                         f"(it holds objects other than tensors: {str(error).splitlines()[0]}); convert it to "
                         ".safetensors with a tool you trust") from error
    state = blob.get("state_dict", blob) if isinstance(blob, dict) else blob
    if not isinstance(state, dict):
        raise ValueError(f"{path} holds a {type(state).__name__}, not a state dict")
    return {k: v for k, v in state.items() if torch.is_tensor(v)}


def diffusers_folder(path: str | os.PathLike, component: str, class_name: str) -> Path | None:
    """`path/component` of a pipeline folder, or `path` itself when it is that model's folder; else None."""
    path = Path(path)
    if not path.is_dir():
        return None
    for folder in (path / component, path):
        config = folder / "config.json"
        if config.is_file() and json.loads(config.read_text()).get("_class_name") == class_name:
            return folder
    return None


def read_diffusers_weights(folder: Path) -> dict[str, torch.Tensor]:
    for name in WEIGHT_NAMES:
        if (folder / name).is_file():
            return read_state_file(folder / name)
    index = folder / "diffusion_pytorch_model.safetensors.index.json"
    if index.is_file():  # sharded: {"weight_map": {key: file}}
        state: dict[str, torch.Tensor] = {}
        for shard in sorted(set(json.loads(index.read_text())["weight_map"].values())):
            state.update(read_state_file(folder / shard))
        return state
    raise FileNotFoundError(f"{folder} has a config.json but no weights (looked for {', '.join(WEIGHT_NAMES)} and "
                            "a sharded .index.json)")


def _config(folder: Path) -> dict[str, Any]:
    return json.loads((folder / "config.json").read_text())


def _strip(state: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def _component(full: Mapping[str, torch.Tensor], path, prefix: str, probe: str, ignored: tuple[str, ...],
               what: str) -> dict[str, torch.Tensor]:
    """One model's weights from a single file: under its CompVis/Stability `prefix`, or a bare state dict
    (found by the `probe` key) without the `ignored` prefixes."""
    if prefix + probe in full:
        return _strip(full, prefix)
    if probe in full:
        return {k: v for k, v in full.items() if not k.startswith(ignored)}
    raise CheckpointMismatchError(f"{path} holds no {what}: no '{prefix}{probe}' (CompVis/Stability) nor a bare "
                                  f"'{probe}'; keys start {sorted(full)[:3]}")


# ------------------------------------------------------------------------------------------------- UNet
def read_unet_weights(path: str | os.PathLike) -> tuple[dict, dict | None, dict | None]:
    """(UNet state in our names, its EMA or None, architecture from a diffusers config or None)."""
    folder = diffusers_folder(path, "unet", "UNet2DConditionModel")
    if folder is not None:
        config = _config(folder)
        arch = archs.unet_arch_from_diffusers(config)
        up_attention = [kind.startswith("CrossAttn") for kind in config.get("up_block_types", [])]

        def to_ours(state):
            return keymap.rename_state(state, lambda k: keymap.unet_key_from_diffusers(
                k, arch["num_res_blocks"], lambda _, u: up_attention[u]))

        ema_folder = folder.parent / "unet_ema" if folder.name == "unet" else None  # diffusers' EMAModel layout
        ema = to_ours(read_diffusers_weights(ema_folder)) if ema_folder and (ema_folder / "config.json").is_file() \
            else None
        return to_ours(read_diffusers_weights(folder)), ema, arch
    if Path(path).is_dir():
        raise FileNotFoundError(f"{path} is a folder without a diffusers UNet (no unet/config.json, and no "
                                "config.json of a UNet2DConditionModel)")
    full = read_state_file(path)
    state = _component(full, path, UNET_PREFIX, "input_blocks.0.0.weight", ("model_ema.",), "UNet")
    ema = None
    if any(k.startswith("model_ema.") for k in full):  # completeness is checked against the model when used
        ema = {name: full[key] for name in state if (key := keymap.compvis_ema_key(name)) in full}
    return state, ema, None


def load_unet(path: str | os.PathLike, strict: bool = True, ema: bool = False,
              config: Mapping[str, Any] | str | os.PathLike | None = None) -> nn.Module:
    """A `UNetModel` with the weights of a CompVis/Stability file or a diffusers folder.

    `ema=True` takes the EMA weights (`model_ema.*`, or a diffusers `unet_ema/` folder). `config` overrides
    constructor arguments (for single files: the head split, `norm_groups`; see ldm.convert.arch): a dict, or
    the path of the CompVis YAML that came with the file (its `unet_config.params`).
    Missing, unexpected or mis-shaped keys raise CheckpointMismatchError unless `strict=False`."""
    from ldm.models.unet import UNetModel

    if isinstance(config, (str, os.PathLike)):  # a CompVis YAML (v1-inference.yaml, ...)
        config = archs.compvis_yaml(os.fspath(config)).get("unet", {})
    state, ema_state, arch = read_unet_weights(path)
    if ema:
        if ema_state is None:
            raise CheckpointMismatchError(f"{path} has no EMA weights (no model_ema.* keys, no unet_ema/ folder)")
        state = ema_state
    overrides = dict(config or {})
    if arch is None:  # a single file: only a released layout loads without its head split and groups
        arch = archs.infer_unet_arch(state, overrides, where=str(path))
        if "norm_groups" not in overrides and archs.known_unet_layout(arch) is None:
            raise archs.unknown_unet_layout(str(path), arch)
    else:
        if {"num_heads", "num_head_channels"} & set(overrides):  # one head split replaces the other
            arch.update(num_heads=-1, num_head_channels=-1)
        arch.update(overrides)
    archs.check_head_split(arch, str(path))
    model = UNetModel(**arch)
    load_checked(model, state, strict, str(path))
    return model.eval()


# -------------------------------------------------------------------------------------------- autoencoder
def read_vae_weights(path: str | os.PathLike) -> tuple[dict, dict | None, float]:
    """(autoencoder state in our names, architecture from a diffusers config or None, latent scale factor)."""
    folder = diffusers_folder(path, "vae", "AutoencoderKL")
    if folder is not None:
        config = _config(folder)
        arch = archs.vae_arch_from_diffusers(config)
        levels = len(arch["ch_mult"])
        state = keymap.rename_state(read_diffusers_weights(folder), lambda k: keymap.vae_key_from_diffusers(k, levels),
                                    keymap.vae_tensor_from_diffusers)
        return state, arch, float(config.get("scaling_factor", archs.SD_SCALE_FACTOR))
    if Path(path).is_dir():
        raise FileNotFoundError(f"{path} is a folder without a diffusers VAE (no vae/config.json, and no "
                                "config.json of an AutoencoderKL)")
    full = read_state_file(path)
    state = _component(full, path, VAE_PREFIX, "encoder.conv_in.weight", VAE_IGNORED_PREFIXES, "autoencoder")
    # CompVis LatentDiffusion stores scale_factor as a buffer when it measured it (scale_by_std); SD files
    # don't, and use 0.18215. The paper's VQ models ran unscaled (scale_factor 1.0 in their configs).
    default = 1.0 if "quantize.embedding.weight" in state else archs.SD_SCALE_FACTOR
    scale = float(full["scale_factor"]) if "scale_factor" in full else default
    return {k: v for k, v in state.items() if k not in VAE_STATE_BUFFERS}, None, scale


def load_autoencoder(path: str | os.PathLike, strict: bool = True,
                     config: Mapping[str, Any] | str | os.PathLike | None = None,
                     scale_factor: float | None = None) -> nn.Module:
    """THE way to load a first-stage autoencoder (`model.first_stage.ckpt`, sampling, conversion): an
    `AutoencoderKL` or `VQModel` in eval mode on the CPU, its `scale_factor` and `sample_posterior` set, from

    * our `autoencoder.safetensors` (stage 1's output; its config and flags are in the metadata, loaded
      strictly; `config` does not apply);
    * a CompVis/Stability single file (SD's VAE inside `first_stage_model.*`, or stand-alone; a CompVis VQ
      file, with `quantize.embedding.weight`, gives a `VQModel`), or a diffusers folder: `scale_factor` from
      the source (diffusers `scaling_factor`; 0.18215 for SD files). `config` gives constructor overrides,
      or is the CompVis YAML (its `ddconfig`, `embed_dim` and `scale_factor`).

    `scale_factor` overrides the stored one."""
    from ldm.models.autoencoder import HOW_TO_GET_ONE, is_autoencoder_file, read_autoencoder_file

    path = os.fspath(path)
    if is_autoencoder_file(path):
        if config is not None:
            raise ValueError(f"load_autoencoder: {path} carries its own config; config=... applies to SD / "
                             "CompVis / diffusers sources only")
        model = read_autoencoder_file(path)
    elif not os.path.exists(path):
        raise FileNotFoundError(f"no first-stage autoencoder at {path}: give our autoencoder.safetensors "
                                f"({HOW_TO_GET_ONE}), an SD checkpoint (.safetensors/.ckpt) or a diffusers folder")
    else:
        model = _load_pretrained_autoencoder(path, strict, config)
    if scale_factor is not None:
        model.scale_factor.fill_(scale_factor)
    return model.eval()


def _load_pretrained_autoencoder(path: str, strict: bool, config) -> nn.Module:
    """A CompVis/Stability file or a diffusers folder (see `load_autoencoder`)."""
    from ldm.models.autoencoder import AutoencoderKL, VQModel

    scale_factor = None
    if isinstance(config, (str, os.PathLike)):  # a CompVis YAML: ddconfig + embed_dim, and the LDM's scale_factor
        yaml = archs.compvis_yaml(os.fspath(config))
        config, scale_factor = yaml.get("autoencoder", {}), yaml.get("scale_factor")
    state, arch, source_scale = read_vae_weights(path)
    if arch is None:  # a single file: only a released layout loads without its GroupNorm groups
        given = {k: v for k, v in (config or {}).items() if k in ("resolution", "norm_groups")}
        arch = archs.infer_vae_arch(state, **given)
        if "norm_groups" not in (config or {}) and archs.known_autoencoder_layout(arch) is None:
            raise archs.unknown_autoencoder_layout(str(path), arch)
    arch.update(config or {})
    model = VQModel(**arch) if "n_embed" in arch else AutoencoderKL(**arch)
    load_checked(model, state, strict, str(path), skip=VAE_STATE_BUFFERS + VQ_STATE_BUFFERS)
    model.scale_factor.fill_(source_scale if scale_factor is None else scale_factor)
    model.sample_posterior = True  # SD / CompVis encode stage-2 latents as posterior samples (VQ: deterministic)
    return model


# ------------------------------------------------------------------------------------------------ checks
def check_state(model: nn.Module, state: Mapping[str, torch.Tensor], where: str,
                skip: tuple[str, ...] = ()) -> tuple[str, set[str]]:
    """(report of missing / unexpected / mis-shaped keys, "" when none; the names that must not be copied)."""
    expected = {k: v.shape for k, v in model.state_dict().items() if k not in skip}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = sorted(f"{k}: file {tuple(state[k].shape)} vs model {tuple(expected[k])}"
                        for k in set(expected) & set(state) if tuple(state[k].shape) != tuple(expected[k]))
    return mismatch_report(missing, unexpected, mismatched), set(unexpected) | {m.split(":")[0] for m in mismatched}


def load_checked(model: nn.Module, state: Mapping[str, torch.Tensor], strict: bool, where: str,
                 skip: tuple[str, ...] = ()) -> None:
    """Load `state` into `model`; with `strict`, any missing / unexpected / mis-shaped key is ONE error listing
    them all, raised before anything is copied. Without it, the matching tensors load and a warning says
    what did not."""
    problems, bad = check_state(model, state, where, skip)
    if problems and strict:
        raise CheckpointMismatchError(f"{where} does not fit {type(model).__name__}: {problems}. Nothing was loaded "
                                      "(pass strict=False to load the matching tensors only)")
    model.load_state_dict({k: v for k, v in state.items() if k not in bad}, strict=False)
    if problems:
        warnings.warn(f"partial load of {where} into {type(model).__name__}: {problems}", stacklevel=2)


def apply_init_from(task: nn.Module, path: str | os.PathLike) -> dict[str, torch.Tensor] | None:
    """`model.init_from=PATH`: start stage 2 from a pretrained UNet (fine-tuning SD-v1/v2), strictly.

    The UNet gets the file's raw weights (`model.diffusion_model.*` / `unet/`); its EMA weights (`model_ema.*` /
    `unet_ema/`), when present, are returned (checked against the UNet) for the training loop to start its EMA
    from, else None. (With `ema.warmup` the EMA follows the raw weights within a few steps anyway.) A resumed
    run then replaces both with its checkpoint's."""
    state, ema, _ = read_unet_weights(path)
    where = f"model.init_from={path}"
    load_checked(task.unet, state, True, where)
    if ema is not None:
        problems, _ = check_state(task.unet, ema, where)
        if problems:
            raise CheckpointMismatchError(f"{where}: its EMA weights do not fit the UNet: {problems}")
    return ema


def mismatch_report(missing: list[str], unexpected: list[str], mismatched: list[str], limit: int = 20) -> str:
    parts = []
    for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched)):
        if keys:
            more = f" ... and {len(keys) - limit} more" if len(keys) > limit else ""
            parts.append(f"{len(keys)} {label}: {', '.join(keys[:limit])}{more}")
    return "; ".join(parts)
