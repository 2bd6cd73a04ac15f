"""Architectures: our constructor arguments <-> diffusers `config.json`, and read off a bare state dict.

A CompVis/Stability single file carries weights only, so the UNet / autoencoder arguments are read from the
tensor shapes. Two things shapes cannot say: the GroupNorm group count and the attention head split. A wrong
guess loads without an error and computes something else, so nothing is guessed: a file loads without a
config only when its shapes identify a released layout whose split is known (KNOWN_UNETS: SD-v1 with 8
heads, SD-2 with 64 channels per head; KNOWN_AUTOENCODERS: the KL-f8 SD VAE and CompVis' other first
stages; all with 32 groups). Any other layout needs the CompVis YAML that came with it or `config={...}` with
the head split and `norm_groups`: the loaders say so in one error.
"""
from __future__ import annotations

import re
from typing import Any, Mapping

from torch import nn

from ldm.errors import RunError

DIFFUSERS_VERSION = "0.42.1"  # written into config.json files; the fields below are stable across 0.2x-0.4x
SD_SCALE_FACTOR = 0.18215  # the SD-v1/v2 VAE's latent scale (LDM paper App. G); diffusers' default too


class ArchitectureError(ValueError, RunError):
    """A checkpoint whose architecture our models cannot express, whose shapes do not add up, or whose layout
    needs a config (a RunError: the CLIs print it as one line)."""


# Released layouts, by what the shapes say -> what they cannot (CompVis' code uses 32 GroupNorm groups everywhere).
_SD_UNET = dict(model_channels=320, channel_mult=[1, 2, 4, 4], num_res_blocks=2, attention_resolutions=[1, 2, 4],
                transformer_depth=1, out_channels=4, use_scale_shift_norm=False)
KNOWN_UNETS = {  # in_channels 4, or 9 / 5 / 8 for Stability's inpainting / depth / instruct-pix2pix variants
    "SD-v1": ({**_SD_UNET, "context_dim": 768, "use_linear_in_transformer": False}, {"num_heads": 8}),
    "SD-2": ({**_SD_UNET, "context_dim": 1024, "use_linear_in_transformer": True}, {"num_head_channels": 64}),
}
SD_UNET_IN_CHANNELS = (4, 5, 8, 9)
# CompVis latent-diffusion models/first_stage_models (conf/model/autoencoder_{kl,vq}_f*.yaml; kl-f8 is the SD VAE)
KNOWN_AUTOENCODERS = {
    "KL-f8 (SD VAE)": dict(ch=128, ch_mult=[1, 2, 4, 4], num_res_blocks=2, z_channels=4, embed_dim=4,
                           attn_resolutions=[]),
    "KL-f4": dict(ch=128, ch_mult=[1, 2, 4], num_res_blocks=2, z_channels=3, embed_dim=3, attn_resolutions=[]),
    "KL-f16": dict(ch=128, ch_mult=[1, 1, 2, 2, 4], num_res_blocks=2, z_channels=16, embed_dim=16,
                   attn_resolutions=[16]),
    "VQ-f4": dict(ch=128, ch_mult=[1, 2, 4], num_res_blocks=2, z_channels=3, embed_dim=3, attn_resolutions=[],
                  n_embed=8192),
    "VQ-f8": dict(ch=128, ch_mult=[1, 2, 2, 4], num_res_blocks=2, z_channels=4, embed_dim=4, attn_resolutions=[32],
                  n_embed=16384),
    "VQ-f16": dict(ch=128, ch_mult=[1, 1, 2, 2, 4], num_res_blocks=2, z_channels=8, embed_dim=8,
                   attn_resolutions=[16], n_embed=16384),
}
HEAD_KEYS = ("num_heads", "num_head_channels")


def known_unet_layout(arch: Mapping[str, Any]) -> str | None:
    """The released UNet layout (a KNOWN_UNETS name) that `arch`, read from shapes, is; None for any other."""
    if arch.get("in_channels") not in SD_UNET_IN_CHANNELS or "num_classes" in arch:
        return None
    return next((name for name, (shape, _) in KNOWN_UNETS.items()
                 if all(arch.get(k) == v for k, v in shape.items())), None)


def known_autoencoder_layout(arch: Mapping[str, Any]) -> str | None:
    if arch.get("in_channels") != 3 or arch.get("out_ch") != 3 or arch.get("resolution") != 256:
        return None
    keys = lambda layout: set(layout) | {"n_embed"}  # noqa: E731  (a KL layout must not have a codebook)
    return next((name for name, layout in KNOWN_AUTOENCODERS.items()
                 if all(arch.get(k) == layout.get(k) for k in keys(layout))), None)


def _described(arch: Mapping[str, Any], keys: tuple[str, ...]) -> str:
    return ", ".join(f"{k}={arch[k]}" for k in keys if k in arch)


def unknown_unet_layout(where: str, arch: Mapping[str, Any]) -> "ArchitectureError":
    shape = _described(arch, ("in_channels", "model_channels", "channel_mult", "num_res_blocks",
                              "attention_resolutions", "context_dim", "use_linear_in_transformer"))
    return ArchitectureError(
        f"{where}: its UNet ({shape}) is not a layout ldm knows by its shapes ({', '.join(KNOWN_UNETS)}), and a single "
        "file does not say its attention heads or GroupNorm groups; nothing was loaded. Pass the CompVis YAML that "
        "came with it (config='v1-inference.yaml') or config={'num_heads': N or 'num_head_channels': C, "
        "'norm_groups': G}")


def unknown_autoencoder_layout(where: str, arch: Mapping[str, Any]) -> "ArchitectureError":
    shape = _described(arch, ("ch", "ch_mult", "num_res_blocks", "z_channels", "embed_dim", "n_embed"))
    return ArchitectureError(
        f"{where}: its autoencoder ({shape}) is not a layout ldm knows by its shapes "
        f"({', '.join(KNOWN_AUTOENCODERS)}), "
        "and a single file does not say its GroupNorm groups; nothing was loaded. Pass the CompVis YAML that came "
        "with it or config={'norm_groups': G} to ldm.convert.load_autoencoder (for model.first_stage.ckpt: save what "
        "it loads with ldm.models.autoencoder.save_autoencoder and use that file)")


def check_head_split(arch: Mapping[str, Any], where: str) -> None:
    """Every attention layer gets >= 1 head of equal width (a bad split is a ZeroDivisionError deep in the
    model otherwise)."""
    mults = arch["channel_mult"]
    levels = [i for i in range(len(mults)) if 2**i in set(arch.get("attention_resolutions", ()))] + [len(mults) - 1]
    for channels in sorted({arch["model_channels"] * mults[i] for i in levels}):
        width = arch.get("num_head_channels", -1)
        divisor = width if width != -1 else arch.get("num_heads", -1)  # head width, or head count
        if divisor < 1 or channels % divisor or channels < divisor:
            raise ArchitectureError(f"{where}: {_described(arch, HEAD_KEYS)} does not split {channels} channels into "
                                    "whole heads; give num_heads or num_head_channels that divides every attention "
                                    "layer's width")


def _indices(state: Mapping[str, Any], pattern: str) -> list[int]:
    found = {int(m[1]) for key in state if (m := re.match(pattern, key))}
    return sorted(found)


# ------------------------------------------------------------------------------------------------- UNet
def infer_unet_arch(state: Mapping[str, Any], overrides: Mapping[str, Any] | None = None,
                    where: str = "UNet state dict") -> dict[str, Any]:
    """`UNetModel` keyword arguments from a UNet state dict in our/CompVis names (no prefix); the head split
    from `overrides`, else from the released layout the shapes identify (an ArchitectureError otherwise)."""
    try:
        model_channels, in_channels = state["input_blocks.0.0.weight"].shape[:2]
        out_channels = state["out.2.weight"].shape[0]
    except KeyError as error:
        raise ArchitectureError(f"not a CompVis UNet state dict: {error} missing (keys start "
                                f"{sorted(state)[:3]})") from None
    downsamplers = _indices(state, r"input_blocks\.(\d+)\.0\.op\.weight$")
    num_outputs = len(_indices(state, r"output_blocks\.(\d+)\."))
    num_res_blocks = downsamplers[0] - 1 if downsamplers else num_outputs - 1
    levels = num_outputs // (num_res_blocks + 1)
    if num_outputs % (num_res_blocks + 1) or len(downsamplers) != levels - 1:
        raise ArchitectureError(f"UNet state dict: {num_outputs} output blocks and downsamplers at input blocks "
                                f"{downsamplers} do not make a UNet with conv downsampling")
    first = [1 + level * (num_res_blocks + 1) for level in range(levels)]
    channel_mult = [state[f"input_blocks.{i}.0.out_layers.3.weight"].shape[0] // model_channels for i in first]
    attention_levels = [level for level, i in enumerate(first) if any(k.startswith(f"input_blocks.{i}.1.")
                                                                        for k in state)]
    spatial = "middle_block.1.proj_in.weight" in state
    arch: dict[str, Any] = dict(
        in_channels=int(in_channels), out_channels=int(out_channels), model_channels=int(model_channels),
        num_res_blocks=num_res_blocks, channel_mult=channel_mult,
        attention_resolutions=[2**level for level in attention_levels],
        use_scale_shift_norm=state["input_blocks.1.0.emb_layers.1.weight"].shape[0] == 2 * channel_mult[0] * model_channels)
    if "label_emb.weight" in state:
        arch["num_classes"] = int(state["label_emb.weight"].shape[0])
    if spatial:
        arch["transformer_depth"] = len(_indices(state, r"middle_block\.1\.transformer_blocks\.(\d+)\."))
        arch["context_dim"] = int(state["middle_block.1.transformer_blocks.0.attn2.to_k.weight"].shape[1])
        arch["use_linear_in_transformer"] = state["middle_block.1.proj_in.weight"].ndim == 2
    else:
        arch["use_spatial_transformer"] = False
    overrides = dict(overrides or {})
    if not set(HEAD_KEYS) & set(overrides):  # only a released layout's split is known; others must be given
        layout = known_unet_layout(arch)
        if layout is None:
            raise unknown_unet_layout(where, arch)
        overrides.update(KNOWN_UNETS[layout][1])
    arch.update(overrides)
    arch.setdefault("num_heads", -1)
    arch.setdefault("num_head_channels", -1)
    return arch


def unet_heads(arch: Mapping[str, Any], channels: int) -> int:
    """Heads of an attention layer over `channels` channels, by our UNet's rule."""
    if arch.get("num_head_channels", -1) != -1:
        return channels // arch["num_head_channels"]
    return arch["num_heads"]


def unet_arch_from_model(unet: nn.Module) -> dict[str, Any]:
    """Our UNet's constructor arguments, read from the module itself (for export)."""
    from ldm.modules.attention import SpatialTransformer
    from ldm.modules.unet_blocks import AttentionBlock

    split = {(m.norm.num_channels, m.transformer_blocks[0].attn1.heads) for m in unet.modules()
             if isinstance(m, SpatialTransformer)}
    split |= {(m.norm.num_channels, m.num_heads) for m in unet.modules() if isinstance(m, AttentionBlock)}
    if len({heads for _, heads in split}) == 1:
        heads = {"num_heads": next(iter(split))[1]}
    elif len({ch // h for ch, h in split}) == 1:
        heads = {"num_head_channels": next(iter(split))[0] // next(iter(split))[1]}
    else:
        raise ArchitectureError(f"UNet attention layers split channels into heads inconsistently: {sorted(split)}")
    arch = infer_unet_arch(unet.state_dict(), heads)
    arch["norm_groups"] = unet.out[0].num_groups
    return arch


def unet_arch_from_diffusers(config: Mapping[str, Any]) -> dict[str, Any]:
    """`UNetModel` arguments from a diffusers `UNet2DConditionModel` config.json; what our UNet cannot express
    (other block types, time embeddings, added conditioning) is an ArchitectureError naming the field."""
    where = "diffusers UNet config"
    if config.get("_class_name", "UNet2DConditionModel") != "UNet2DConditionModel":
        raise ArchitectureError(f"{where}: _class_name is {config['_class_name']!r}, expected UNet2DConditionModel")
    expected = {"center_input_sample": False, "flip_sin_to_cos": True, "freq_shift": 0, "downsample_padding": 1,
                "mid_block_scale_factor": 1, "act_fn": "silu", "norm_eps": 1e-5, "only_cross_attention": False,
                "dual_cross_attention": False, "class_embed_type": None, "addition_embed_type": None,
                "time_embedding_type": "positional", "time_embedding_dim": None, "time_cond_proj_dim": None,
                "conv_in_kernel": 3, "conv_out_kernel": 3, "encoder_hid_dim": None, "time_embedding_act_fn": None,
                "timestep_post_act": None, "resnet_skip_time_act": False, "resnet_out_scale_factor": 1.0,
                "attention_type": "default", "class_embeddings_concat": False, "cross_attention_norm": None,
                "mid_block_type": "UNetMidBlock2DCrossAttn", "num_attention_heads": None}
    for field, value in expected.items():
        if field in config and config[field] != value:
            raise ArchitectureError(f"{where}: {field}={config[field]!r} is not supported (our UNet has {value!r})")
    block_out = list(config.get("block_out_channels", (320, 640, 1280, 1280)))
    model_channels = block_out[0]
    if any(c % model_channels for c in block_out):
        raise ArchitectureError(f"{where}: block_out_channels {block_out} are not multiples of the first")
    channel_mult = [c // model_channels for c in block_out]
    down = list(config.get("down_block_types", ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"]))
    up = list(config.get("up_block_types", ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3))
    known = {"CrossAttnDownBlock2D", "DownBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"}
    if set(down + up) - known or len(down) != len(block_out) or len(up) != len(block_out):
        raise ArchitectureError(f"{where}: down_block_types {down} / up_block_types {up} must be {len(block_out)} "
                                f"each of {sorted(known)}")
    attention_levels = [level for level, kind in enumerate(down) if kind.startswith("CrossAttn")]
    if [len(down) - 1 - u for u, kind in enumerate(up) if kind.startswith("CrossAttn")][::-1] != attention_levels:
        raise ArchitectureError(f"{where}: up_block_types {up} do not mirror down_block_types {down}")
    layers = config.get("layers_per_block", 2)
    depth = config.get("transformer_layers_per_block", 1)
    if isinstance(depth, (list, tuple)) and len(set(depth)) == 1:  # one depth written per level
        depth = depth[0]
    if not isinstance(layers, int) or not isinstance(depth, int) or config.get("reverse_transformer_layers_per_block"):
        raise ArchitectureError(f"{where}: per-level layers_per_block={layers} / transformer_layers_per_block={depth} "
                                "are not supported (one number each)")
    heads = config.get("attention_head_dim", 8)  # diffusers' misnomer: this is the number of heads
    heads = list(heads) if isinstance(heads, (list, tuple)) else [heads] * len(block_out)
    # Levels whose heads matter: those with attention, and the last (the middle block uses heads[-1]).
    used = sorted(set(attention_levels) | {len(block_out) - 1})
    if len({heads[level] for level in used}) == 1:
        head_split = {"num_heads": heads[used[0]]}
    elif len({block_out[level] // heads[level] for level in used}) == 1:
        head_split = {"num_head_channels": block_out[used[0]] // heads[used[0]]}
    else:
        raise ArchitectureError(f"{where}: attention_head_dim {heads} is neither one head count nor one head width "
                                f"over block_out_channels {block_out}")
    arch: dict[str, Any] = dict(
        in_channels=config.get("in_channels", 4), out_channels=config.get("out_channels", 4),
        model_channels=model_channels, num_res_blocks=layers, channel_mult=channel_mult,
        attention_resolutions=[2**level for level in attention_levels], transformer_depth=depth,
        context_dim=config.get("cross_attention_dim", 1280),
        use_linear_in_transformer=bool(config.get("use_linear_projection", False)),
        use_scale_shift_norm=config.get("resnet_time_scale_shift", "default") == "scale_shift",
        norm_groups=config.get("norm_num_groups", 32), **{"num_heads": -1, "num_head_channels": -1, **head_split})
    if config.get("num_class_embeds") is not None:
        arch["num_classes"] = config["num_class_embeds"]
    return arch


def diffusers_unet_config(arch: Mapping[str, Any], sample_size: int = 64) -> dict[str, Any]:
    """A diffusers `UNet2DConditionModel` config.json for our UNet arguments."""
    channel_mult = list(arch["channel_mult"])
    if channel_mult[0] != 1:
        raise ArchitectureError(f"channel_mult {channel_mult}: diffusers' UNet needs channel_mult[0] == 1 (its conv_in "
                                "and time embedding are block_out_channels[0] wide)")
    if arch.get("use_spatial_transformer") is False or arch.get("context_dim") is None:
        raise ArchitectureError("only cross-attention UNets (context_dim set) map onto diffusers' "
                                "UNet2DConditionModel; this one uses self-attention AttentionBlocks")
    block_out = [arch["model_channels"] * m for m in channel_mult]
    levels = len(block_out)
    attention = [2**level in set(arch["attention_resolutions"]) for level in range(levels)]
    config = {
        "_class_name": "UNet2DConditionModel", "_diffusers_version": DIFFUSERS_VERSION,
        "sample_size": sample_size, "in_channels": arch["in_channels"], "out_channels": arch["out_channels"],
        "block_out_channels": block_out, "layers_per_block": arch["num_res_blocks"],
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention],
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)],
        "mid_block_type": "UNetMidBlock2DCrossAttn", "attention_head_dim": [unet_heads(arch, c) for c in block_out],
        "cross_attention_dim": arch["context_dim"], "transformer_layers_per_block": arch.get("transformer_depth", 1),
        "use_linear_projection": bool(arch.get("use_linear_in_transformer", False)),
        "norm_num_groups": arch.get("norm_groups", 32), "norm_eps": 1e-5, "act_fn": "silu",
        "center_input_sample": False, "flip_sin_to_cos": True, "freq_shift": 0, "downsample_padding": 1,
        "mid_block_scale_factor": 1, "dropout": 0.0,
        "resnet_time_scale_shift": "scale_shift" if arch.get("use_scale_shift_norm") else "default",
        "num_class_embeds": arch.get("num_classes"), "upcast_attention": False,
    }
    return config


# -------------------------------------------------------------------------------------------- autoencoder
def infer_vae_arch(state: Mapping[str, Any], resolution: int = 256, norm_groups: int = 32) -> dict[str, Any]:
    """`AutoencoderKL` (or, with a codebook, `VQModel`) keyword arguments from an autoencoder state dict in
    our/CompVis names (no prefix)."""
    try:
        ch, in_channels = state["encoder.conv_in.weight"].shape[:2]
        z_channels = state["decoder.conv_in.weight"].shape[1]
        embed_dim = state["post_quant_conv.weight"].shape[1]
        out_ch = state["decoder.conv_out.weight"].shape[0]
        moments = state["encoder.conv_out.weight"].shape[0]
    except KeyError as error:
        raise ArchitectureError(f"not a CompVis autoencoder state dict: {error} missing (keys start "
                                f"{sorted(state)[:3]})") from None
    vq = "quantize.embedding.weight" in state
    if moments != (1 if vq else 2) * z_channels:
        raise ArchitectureError(f"encoder.conv_out has {moments} channels for z_channels={z_channels}: neither a KL "
                                "(2 x z_channels) nor a VQ (z_channels and quantize.embedding) autoencoder")
    levels = _indices(state, r"encoder\.down\.(\d+)\.")
    num_res_blocks = len(_indices(state, r"encoder\.down\.0\.block\.(\d+)\."))
    ch_mult = [state[f"encoder.down.{level}.block.0.conv2.weight"].shape[0] // ch for level in levels]
    attn = [resolution >> level for level in levels if f"encoder.down.{level}.attn.0.q.weight" in state]
    arch = dict(embed_dim=int(embed_dim), ch=int(ch), ch_mult=ch_mult, num_res_blocks=num_res_blocks,
                z_channels=int(z_channels), attn_resolutions=attn, in_channels=int(in_channels), out_ch=int(out_ch),
                resolution=resolution, norm_groups=norm_groups)
    if vq:
        arch["n_embed"] = int(state["quantize.embedding.weight"].shape[0])
    return arch


def vae_arch_from_diffusers(config: Mapping[str, Any]) -> dict[str, Any]:
    where = "diffusers AutoencoderKL config"
    if config.get("_class_name", "AutoencoderKL") != "AutoencoderKL":
        raise ArchitectureError(f"{where}: _class_name is {config['_class_name']!r}, expected AutoencoderKL")
    block_out = list(config.get("block_out_channels", (64,)))
    down = set(config.get("down_block_types", ["DownEncoderBlock2D"]))
    up = set(config.get("up_block_types", ["UpDecoderBlock2D"]))
    checks = {"down_block_types": down <= {"DownEncoderBlock2D"}, "up_block_types": up <= {"UpDecoderBlock2D"},
              "act_fn": config.get("act_fn", "silu") == "silu",
              "use_quant_conv": config.get("use_quant_conv", True), "use_post_quant_conv": config.get("use_post_quant_conv", True),
              "mid_block_add_attention": config.get("mid_block_add_attention", True),
              "shift_factor": config.get("shift_factor") is None,
              "block_out_channels": all(c % block_out[0] == 0 for c in block_out)}
    for field, ok in checks.items():
        if not ok:
            raise ArchitectureError(f"{where}: {field}={config.get(field)!r} is not supported by our AutoencoderKL")
    latent = config.get("latent_channels", 4)
    return dict(embed_dim=latent, ch=block_out[0], ch_mult=[c // block_out[0] for c in block_out],
                num_res_blocks=config.get("layers_per_block", 1), z_channels=latent, attn_resolutions=[],
                in_channels=config.get("in_channels", 3), out_ch=config.get("out_channels", 3),
                resolution=config.get("sample_size", 32), norm_groups=config.get("norm_num_groups", 32))


def diffusers_vae_config(arch: Mapping[str, Any], scale_factor: float) -> dict[str, Any]:
    ch_mult = list(arch["ch_mult"])
    problems = [f"ch_mult[0]={ch_mult[0]} (diffusers' conv_in is block_out_channels[0] wide: must be 1)"] * (ch_mult[0] != 1)
    problems += [f"attn_resolutions={list(arch.get('attn_resolutions', []))} (diffusers' VAE attends only in the "
                 "middle block)"] * bool(arch.get("attn_resolutions"))
    problems += [f"embed_dim={arch['embed_dim']} != z_channels={arch['z_channels']}"] * (arch["embed_dim"] != arch["z_channels"])
    if problems:
        raise ArchitectureError("autoencoder does not map onto diffusers' AutoencoderKL: " + "; ".join(problems))
    levels = len(ch_mult)
    return {"_class_name": "AutoencoderKL", "_diffusers_version": DIFFUSERS_VERSION,
            "in_channels": arch.get("in_channels", 3), "out_channels": arch.get("out_ch", 3),
            "down_block_types": ["DownEncoderBlock2D"] * levels, "up_block_types": ["UpDecoderBlock2D"] * levels,
            "block_out_channels": [arch["ch"] * m for m in ch_mult], "layers_per_block": arch["num_res_blocks"],
            "act_fn": "silu", "latent_channels": arch["z_channels"], "norm_num_groups": arch.get("norm_groups", 32),
            "sample_size": arch.get("resolution", 256), "scaling_factor": float(scale_factor),
            "force_upcast": True, "use_quant_conv": True, "use_post_quant_conv": True, "mid_block_add_attention": True}


def vae_arch_from_model(model: nn.Module) -> dict[str, Any]:
    resolution = getattr(model.encoder, "resolution", 256)
    return infer_vae_arch(model.state_dict(), resolution=resolution, norm_groups=model.encoder.norm_out.num_groups)


# ------------------------------------------------------------------------------------------ CompVis YAML
def compvis_yaml(path: str) -> dict[str, Any]:
    """Read a CompVis/Stability model YAML (v1-inference.yaml, v2-inference-v.yaml, an LDM config.yaml):
    {"unet": UNetModel kwargs, "autoencoder": AutoencoderKL/VQModel kwargs, "scale_factor": float}, each
    present when the YAML has it. Keys our classes do not take (use_fp16, image_size, legacy, use_checkpoint, ...) are dropped."""
    import inspect

    from omegaconf import OmegaConf

    from ldm.models.autoencoder import AutoencoderKL, VQModel
    from ldm.models.unet import UNetModel

    params = OmegaConf.to_container(OmegaConf.load(path), resolve=True).get("model", {}).get("params", {})
    out: dict[str, Any] = {}
    unet = params.get("unet_config", {}).get("params")
    if unet is not None:
        accepted = inspect.signature(UNetModel).parameters
        out["unet"] = {k: v for k, v in unet.items() if k in accepted}  # use_checkpoint: trainer.activation_checkpointing
        out["unet"].setdefault("norm_groups", 32)  # CompVis' code: GroupNorm32(32, ...) everywhere
    first = params.get("first_stage_config", {})
    if "ddconfig" in first.get("params", {}):
        vq = "n_embed" in first["params"]
        accepted = inspect.signature(VQModel if vq else AutoencoderKL).parameters
        kwargs = {**first["params"]["ddconfig"], "embed_dim": first["params"].get("embed_dim")}
        if vq:
            kwargs["n_embed"] = first["params"]["n_embed"]
        out["autoencoder"] = {k: v for k, v in kwargs.items() if k in accepted}
        out["autoencoder"].setdefault("norm_groups", 32)  # CompVis' Normalize(): GroupNorm(32, ...)
    if "scale_factor" in params:
        out["scale_factor"] = float(params["scale_factor"])
    return out
