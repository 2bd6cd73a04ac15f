"""The time-conditional UNet ε_θ(z_t, t, τ_θ(y)) of latent diffusion (Rombach et al. 2022, §3.3).

An ADM-style UNet (Dhariwal & Nichol 2021): ResBlocks conditioned on a sinusoidal timestep embedding,
attention at the chosen downsampling rates — self-attention ``AttentionBlock`` for unconditional /
class-conditional models, ``SpatialTransformer`` cross-attention to the conditioning tokens when
``context_dim`` is set — a middle block, and skip connections from every input block to the output
path. Module names and layout follow CompVis ``openaimodel.UNetModel``, so parameter counts match:
SD-v1 859,520,964 and SD-2 865,910,724 (see tests/test_unet.py).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from ldm.modules.attention import SpatialTransformer, zero_module
from ldm.modules.unet_blocks import (AttentionBlock, Downsample, ResBlock, TimestepEmbedSequential, Upsample,
                                     normalization, timestep_embedding)


class UNetModel(nn.Module):
    """ε-, x0- or v-predicting UNet over latents ``(B, in_channels, H, W)``.

    ``attention_resolutions`` are downsampling rates (1 = full latent resolution, 2 = half, ...).
    Heads: ``num_heads`` fixes the head count, ``num_head_channels`` the width per head (SD-2 style);
    exactly one of them must be set wherever attention is used. ``transformer_pos_embed`` adds a fixed 2D
    position embedding to the SpatialTransformer tokens (no parameters; off in the paper's and SD's
    UNets, on in the small demo, where prompts name positions).
    """

    def __init__(self, in_channels: int, out_channels: int, model_channels: int, num_res_blocks: int,
                 attention_resolutions: Sequence[int], channel_mult: Sequence[int] = (1, 2, 4, 8),
                 num_heads: int = -1, num_head_channels: int = -1, transformer_depth: int = 1,
                 context_dim: int | None = None, use_linear_in_transformer: bool = False,
                 num_classes: int | None = None, dropout: float = 0.0,
                 attention_backend: str = "sdpa", conv_resample: bool = True,
                 use_spatial_transformer: bool | None = None, use_scale_shift_norm: bool = False,
                 norm_groups: int = 32, transformer_pos_embed: bool = False):
        super().__init__()
        if use_spatial_transformer is None:
            use_spatial_transformer = context_dim is not None
        if context_dim is not None and not use_spatial_transformer:
            raise ValueError("UNetModel: context_dim is set but use_spatial_transformer=False; "
                             "cross-attention to the context needs SpatialTransformer blocks")
        if (num_heads == -1) == (num_head_channels == -1):  # the middle block always attends
            raise ValueError(f"UNetModel: set exactly one of num_heads ({num_heads}) and "
                             f"num_head_channels ({num_head_channels}); -1 means unset")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.model_channels, self.num_classes, self.context_dim = model_channels, num_classes, context_dim
        self.num_levels = len(channel_mult)
        attention_resolutions = set(attention_resolutions)
        time_embed_dim = model_channels * 4

        def res_block(ch_in: int, ch_out: int) -> ResBlock:
            return ResBlock(ch_in, time_embed_dim, dropout, ch_out, use_scale_shift_norm, norm_groups)

        def attention(ch: int) -> nn.Module:
            heads = num_heads if num_head_channels == -1 else ch // num_head_channels
            if ch % heads:
                raise ValueError(f"UNetModel: {ch} channels are not divisible into {heads} heads")
            if use_spatial_transformer:
                return SpatialTransformer(ch, heads, ch // heads, transformer_depth, dropout, context_dim,
                                          use_linear_in_transformer, attention_backend, norm_groups,
                                          transformer_pos_embed)
            return AttentionBlock(ch, heads, -1, attention_backend, norm_groups)

        # Timestep t -> sinusoid -> MLP (DDPM, Ho et al. 2020 App. B); class labels add to it.
        self.time_embed = nn.Sequential(nn.Linear(model_channels, time_embed_dim), nn.SiLU(),
                                        nn.Linear(time_embed_dim, time_embed_dim))
        if num_classes is not None:
            self.label_emb = nn.Embedding(num_classes, time_embed_dim)

        # Encoder: per level num_res_blocks ResBlocks (+attention), then a downsample except at the last level.
        self.input_blocks = nn.ModuleList([TimestepEmbedSequential(nn.Conv2d(in_channels, model_channels, 3, padding=1))])
        skip_channels, ch, rate = [model_channels], model_channels, 1
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers = [res_block(ch, mult * model_channels)]
                ch = mult * model_channels
                if rate in attention_resolutions:
                    layers.append(attention(ch))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                skip_channels.append(ch)
            if level != len(channel_mult) - 1:
                self.input_blocks.append(TimestepEmbedSequential(Downsample(ch, conv_resample)))
                skip_channels.append(ch)
                rate *= 2

        # Middle block: always attends, whatever attention_resolutions says (as in CompVis).
        self.middle_block = TimestepEmbedSequential(res_block(ch, ch), attention(ch), res_block(ch, ch))

        # Decoder: num_res_blocks + 1 ResBlocks per level, each consuming one skip connection.
        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for i in range(num_res_blocks + 1):
                layers = [res_block(ch + skip_channels.pop(), model_channels * mult)]
                ch = model_channels * mult
                if rate in attention_resolutions:
                    layers.append(attention(ch))
                if level and i == num_res_blocks:
                    layers.append(Upsample(ch, conv_resample))
                    rate //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        self.out = nn.Sequential(normalization(ch, norm_groups), nn.SiLU(),
                                 zero_module(nn.Conv2d(ch, out_channels, 3, padding=1)))
        # (CompVis writes model_channels here, which only works when channel_mult[0] == 1.)

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor | None = None,
                y: torch.Tensor | None = None) -> torch.Tensor:
        """x ``(B, C, H, W)``; timesteps ``(B,)`` (or a scalar); context ``(B, M, context_dim)``; y ``(B,)``."""
        self._check_inputs(x, context, y)
        if timesteps.ndim == 0:
            timesteps = timesteps.expand(x.shape[0])
        if timesteps.shape != (x.shape[0],):
            raise ValueError(f"UNetModel.forward: timesteps must be (B,) = ({x.shape[0]},) or a scalar, "
                             f"got {tuple(timesteps.shape)}")
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels).to(self.time_embed[0].weight.dtype))
        if self.num_classes is not None:
            emb = emb + self.label_emb(y)
        skips = []
        h = x
        for block in self.input_blocks:
            h = block(h, emb, context)
            skips.append(h)
        h = self.middle_block(h, emb, context)
        for block in self.output_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb, context)
        return self.out(h)

    def _check_inputs(self, x: torch.Tensor, context: torch.Tensor | None, y: torch.Tensor | None) -> None:
        """Fail with a message naming the argument, instead of a shape error deep in a conv."""
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"UNetModel.forward: x must be (B, {self.in_channels}, H, W), got {tuple(x.shape)}")
        factor = 2 ** (self.num_levels - 1)
        if x.shape[2] % factor or x.shape[3] % factor:
            raise ValueError(f"UNetModel.forward: H and W must be divisible by {factor} "
                             f"({self.num_levels} levels), got {tuple(x.shape[2:])}")
        if (self.context_dim is None) != (context is None):
            raise ValueError(f"UNetModel.forward: built with context_dim={self.context_dim} but got "
                             f"context={'None' if context is None else tuple(context.shape)}")
        if (self.num_classes is None) != (y is None):
            raise ValueError(f"UNetModel.forward: built with num_classes={self.num_classes} but got "
                             f"y={'None' if y is None else tuple(y.shape)}")
