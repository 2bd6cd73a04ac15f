"""Pure parameter-name maps between our (= CompVis) layout and diffusers', for the UNet and the KL autoencoder.

Our `UNetModel` and `AutoencoderKL` use CompVis' module names unchanged, so a CompVis/Stability file needs only
its prefix removed (`model.diffusion_model.`, `first_stage_model.`). diffusers renames and regroups:

UNet (CompVis -> diffusers), with `n = num_res_blocks`:
  time_embed.{0,2}                       -> time_embedding.linear_{1,2}
  label_emb                              -> class_embedding
  input_blocks.0.0                       -> conv_in
  input_blocks.{1 + l(n+1) + j}.0        -> down_blocks.l.resnets.j           (j < n)
  input_blocks.{1 + l(n+1) + j}.1        -> down_blocks.l.attentions.j
  input_blocks.{1 + l(n+1) + n}.0.op     -> down_blocks.l.downsamplers.0.conv
  middle_block.{0,1,2}                   -> mid_block.{resnets.0, attentions.0, resnets.1}
  output_blocks.{u(n+1) + j}.0           -> up_blocks.u.resnets.j             (u = levels-1-l, j <= n)
  output_blocks.{u(n+1) + j}.1           -> up_blocks.u.attentions.j
  output_blocks.{u(n+1) + n}.{1|2}.conv  -> up_blocks.u.upsamplers.0.conv
  out.{0,2}                              -> conv_norm_out, conv_out
  in ResBlocks: in_layers.{0,2} -> norm1, conv1; emb_layers.1 -> time_emb_proj; out_layers.{0,3} -> norm2, conv2;
  skip_connection -> conv_shortcut. Inside SpatialTransformers the names are the same on both sides.

Autoencoder (CompVis -> diffusers), with `L` levels:
  encoder.down.l.block.j                 -> encoder.down_blocks.l.resnets.j
  encoder.down.l.downsample.conv         -> encoder.down_blocks.l.downsamplers.0.conv
  decoder.up.l.block.j                   -> decoder.up_blocks.{L-1-l}.resnets.j
  decoder.up.l.upsample.conv             -> decoder.up_blocks.{L-1-l}.upsamplers.0.conv
  {en,de}coder.mid.block_{1,2}           -> {en,de}coder.mid_block.resnets.{0,1}
  {en,de}coder.mid.attn_1.{norm,q,k,v,proj_out} -> ...mid_block.attentions.0.{group_norm,to_q,to_k,to_v,to_out.0}
                                            (1x1 conv weights (C,C,1,1) <-> linear weights (C,C))
  {en,de}coder.norm_out                  -> {en,de}coder.conv_norm_out;  nin_shortcut -> conv_shortcut
  quant_conv, post_quant_conv, conv_in, conv_out, norm1/2, conv1/2 keep their names.

Every function here is a string (or tensor-shape) transformation with no model built: tests check them against
the full-size SD key sets and against diffusers' own converter.
"""
from __future__ import annotations

import re
from typing import Callable, Mapping

import torch

RESNET_TO_DIFFUSERS = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
                       "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}
RESNET_FROM_DIFFUSERS = {v: k for k, v in RESNET_TO_DIFFUSERS.items()}
UNET_TOP_TO_DIFFUSERS = {"time_embed.0": "time_embedding.linear_1", "time_embed.2": "time_embedding.linear_2",
                         "label_emb": "class_embedding", "input_blocks.0.0": "conv_in", "out.0": "conv_norm_out",
                         "out.2": "conv_out"}
UNET_TOP_FROM_DIFFUSERS = {v: k for k, v in UNET_TOP_TO_DIFFUSERS.items()}
VAE_ATTN_TO_DIFFUSERS = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
VAE_ATTN_FROM_DIFFUSERS = {v: k for k, v in VAE_ATTN_TO_DIFFUSERS.items()}


class KeyMapError(KeyError):
    """A parameter name that has no counterpart in the other layout."""

    def __str__(self) -> str:  # KeyError would print the message with quotes
        return str(self.args[0])


def _rename_prefix(rest: str, table: Mapping[str, str], where: str) -> str:
    """Replace the longest `table` key that prefixes `rest` (followed by '.' or the end)."""
    for old in sorted(table, key=len, reverse=True):
        if rest == old or rest.startswith(old + "."):
            return table[old] + rest[len(old):]
    raise KeyMapError(f"{where}: no mapping for {rest!r}")


# ------------------------------------------------------------------------------------------------- UNet
def unet_key_to_diffusers(key: str, num_res_blocks: int) -> str:
    """Our/CompVis UNet parameter name -> diffusers `UNet2DConditionModel` name."""
    n = num_res_blocks
    for old, new in UNET_TOP_TO_DIFFUSERS.items():
        if key == old or key.startswith(old + "."):
            return new + key[len(old):]
    if m := re.fullmatch(r"input_blocks\.(\d+)\.(\d+)\.(.+)", key):
        i, k, rest = int(m[1]), int(m[2]), m[3]
        level, j = divmod(i - 1, n + 1)
        if j == n:  # the downsampler closing the level
            if k != 0 or not rest.startswith("op."):
                raise KeyMapError(f"unet: {key!r} is not a downsampler (expected input_blocks.{i}.0.op.*)")
            return f"down_blocks.{level}.downsamplers.0.conv.{rest[3:]}"
        if k == 0:
            return f"down_blocks.{level}.resnets.{j}." + _rename_prefix(rest, RESNET_TO_DIFFUSERS, key)
        if k == 1:
            return f"down_blocks.{level}.attentions.{j}.{rest}"
    if m := re.fullmatch(r"middle_block\.(\d)\.(.+)", key):
        k, rest = int(m[1]), m[2]
        if k == 1:
            return f"mid_block.attentions.0.{rest}"
        if k in (0, 2):
            return f"mid_block.resnets.{k // 2}." + _rename_prefix(rest, RESNET_TO_DIFFUSERS, key)
    if m := re.fullmatch(r"output_blocks\.(\d+)\.(\d+)\.(.+)", key):
        i, k, rest = int(m[1]), int(m[2]), m[3]
        up, j = divmod(i, n + 1)
        if k == 0:
            return f"up_blocks.{up}.resnets.{j}." + _rename_prefix(rest, RESNET_TO_DIFFUSERS, key)
        if rest.startswith("conv."):  # Upsample (after the ResBlock, and the attention if the level has one)
            return f"up_blocks.{up}.upsamplers.0.{rest}"
        if k == 1:
            return f"up_blocks.{up}.attentions.{j}.{rest}"
    raise KeyMapError(f"unet: no diffusers name for {key!r} (num_res_blocks={num_res_blocks}); the UNet must be the "
                      "SpatialTransformer (cross-attention) layout")


def unet_key_from_diffusers(key: str, num_res_blocks: int, has_attention: Callable[[str, int], bool]) -> str:
    """diffusers `UNet2DConditionModel` name -> our/CompVis name. `has_attention(kind, block)` says whether
    down/up block `block` has attentions: it decides whether an upsampler sits at index 1 or 2."""
    n = num_res_blocks
    for old, new in UNET_TOP_FROM_DIFFUSERS.items():
        if key == old or key.startswith(old + "."):
            return new + key[len(old):]
    if m := re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions|downsamplers)\.(\d+)\.(.+)", key):
        level, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        first = 1 + level * (n + 1)
        if kind == "resnets":
            return f"input_blocks.{first + j}.0." + _rename_prefix(rest, RESNET_FROM_DIFFUSERS, key)
        if kind == "attentions":
            return f"input_blocks.{first + j}.1.{rest}"
        if rest.startswith("conv."):
            return f"input_blocks.{first + n}.0.op.{rest[5:]}"
    if m := re.fullmatch(r"mid_block\.(resnets|attentions)\.(\d)\.(.+)", key):
        kind, j, rest = m[1], int(m[2]), m[3]
        if kind == "attentions":
            return f"middle_block.1.{rest}"
        return f"middle_block.{2 * j}." + _rename_prefix(rest, RESNET_FROM_DIFFUSERS, key)
    if m := re.fullmatch(r"up_blocks\.(\d+)\.(resnets|attentions|upsamplers)\.(\d+)\.(.+)", key):
        up, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        first = up * (n + 1)
        if kind == "resnets":
            return f"output_blocks.{first + j}.0." + _rename_prefix(rest, RESNET_FROM_DIFFUSERS, key)
        if kind == "attentions":
            return f"output_blocks.{first + j}.1.{rest}"
        return f"output_blocks.{first + n}.{2 if has_attention('up', up) else 1}.{rest}"
    raise KeyMapError(f"unet: no CompVis name for diffusers key {key!r}")


# -------------------------------------------------------------------------------------------- autoencoder
def vae_key_to_diffusers(key: str, num_levels: int) -> str:
    """Our/CompVis AutoencoderKL parameter name -> diffusers `AutoencoderKL` name."""
    if m := re.fullmatch(r"(encoder|decoder)\.(.+)", key):
        part, rest = m[1], m[2]
        if m2 := re.fullmatch(r"(down|up)\.(\d+)\.(block|downsample|upsample)\.(.+)", rest):
            direction, level, kind, tail = m2[1], int(m2[2]), m2[3], m2[4]
            index = level if direction == "down" else num_levels - 1 - level
            if kind == "block":
                j, _, tail = tail.partition(".")
                tail = tail.replace("nin_shortcut", "conv_shortcut")
                return f"{part}.{direction}_blocks.{index}.resnets.{j}.{tail}"
            return f"{part}.{direction}_blocks.{index}.{kind}rs.0.{tail}"  # downsamplers / upsamplers
        if m2 := re.fullmatch(r"mid\.block_([12])\.(.+)", rest):
            return f"{part}.mid_block.resnets.{int(m2[1]) - 1}.{m2[2].replace('nin_shortcut', 'conv_shortcut')}"
        if m2 := re.fullmatch(r"mid\.attn_1\.(.+)", rest):
            return f"{part}.mid_block.attentions.0." + _rename_prefix(m2[1], VAE_ATTN_TO_DIFFUSERS, key)
        if rest.startswith("norm_out."):
            return f"{part}.conv_norm_out.{rest[9:]}"
        if re.fullmatch(r"(conv_in|conv_out)\.(weight|bias)", rest):
            return key
    if re.fullmatch(r"(post_)?quant_conv\.(weight|bias)", key):
        return key
    raise KeyMapError(f"autoencoder: no diffusers name for {key!r} (attention is only supported in the mid block)")


def vae_key_from_diffusers(key: str, num_levels: int) -> str:
    """diffusers `AutoencoderKL` name -> our/CompVis name."""
    if m := re.fullmatch(r"(encoder|decoder)\.(.+)", key):
        part, rest = m[1], m[2]
        if m2 := re.fullmatch(r"(down|up)_blocks\.(\d+)\.(resnets|downsamplers|upsamplers)\.(\d+)\.(.+)", rest):
            direction, index, kind, j, tail = m2[1], int(m2[2]), m2[3], m2[4], m2[5]
            level = index if direction == "down" else num_levels - 1 - index
            if kind == "resnets":
                return f"{part}.{direction}.{level}.block.{j}.{tail.replace('conv_shortcut', 'nin_shortcut')}"
            return f"{part}.{direction}.{level}.{kind[:-2]}.{tail}"
        if m2 := re.fullmatch(r"mid_block\.resnets\.([01])\.(.+)", rest):
            return f"{part}.mid.block_{int(m2[1]) + 1}.{m2[2].replace('conv_shortcut', 'nin_shortcut')}"
        if m2 := re.fullmatch(r"mid_block\.attentions\.0\.(.+)", rest):
            return f"{part}.mid.attn_1." + _rename_prefix(m2[1], VAE_ATTN_FROM_DIFFUSERS, key)
        if rest.startswith("conv_norm_out."):
            return f"{part}.norm_out.{rest[14:]}"
        if re.fullmatch(r"(conv_in|conv_out)\.(weight|bias)", rest):
            return key
    if re.fullmatch(r"(post_)?quant_conv\.(weight|bias)", key):
        return key
    raise KeyMapError(f"autoencoder: no CompVis name for diffusers key {key!r}")


def vae_tensor_to_diffusers(key: str, tensor: torch.Tensor) -> torch.Tensor:
    """The mid-block attention projections are 1x1 convs in CompVis and linear layers in diffusers."""
    if ".mid.attn_1." in key and key.endswith(".weight") and tensor.ndim == 4:
        return tensor[:, :, 0, 0]
    return tensor


def vae_tensor_from_diffusers(key: str, tensor: torch.Tensor) -> torch.Tensor:
    if ".mid_block.attentions.0." in key and key.endswith(".weight") and tensor.ndim == 2:
        return tensor[:, :, None, None]
    return tensor


def rename_state(state: Mapping[str, torch.Tensor], key_fn: Callable[[str], str],
                 tensor_fn: Callable[[str, torch.Tensor], torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Apply a key map to a whole state dict; `tensor_fn(source_name, tensor)` reshapes where layouts differ.
    Two names landing on one would silently drop a tensor, so that is an error."""
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        new = key_fn(key)
        if new in out:
            raise KeyMapError(f"two parameters map to {new!r} (one of them {key!r})")
        out[new] = tensor if tensor_fn is None else tensor_fn(key, tensor)
    return out


def compvis_ema_key(name: str, prefix: str = "diffusion_model.") -> str:
    """CompVis `LitEma` stores a parameter `model.<prefix><name>` as buffer `model_ema.<prefix+name without dots>`
    (e.g. `model_ema.diffusion_modelinput_blocks00weight`): dot removal is not invertible, so the map goes
    from the model's own names to the file's."""
    return "model_ema." + (prefix + name).replace(".", "")
