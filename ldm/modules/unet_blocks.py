"""Building blocks of the time-conditional UNet ε_θ(z_t, t, τ_θ(y)) (Rombach et al. 2022, §3.3, App. E).

The layout (module names, zero-initialised output layers, GroupNorm(32)) follows the ADM UNet as
shipped in CompVis ``openaimodel.py`` so that state-dict keys and parameter counts match theirs.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ldm.modules.attention import SpatialTransformer, get_attention_backend, zero_module


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps, ``[cos, sin]`` order as in CompVis.

    Frequencies ``max_period^(-i/half)`` for ``i < half = dim // 2`` (Vaswani et al. 2017, §3.5).
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half)
    args = timesteps.float()[:, None] * freqs[None]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    return embedding


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32 when the weights/activations are half precision (ADM's
    ``GroupNorm32``): statistics over few channels in bf16 are too coarse. No extra op in fp32."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:
            return super().forward(x)
        return F.group_norm(x.float(), self.num_groups, self.weight.float(), self.bias.float(), self.eps).to(x.dtype)


def normalization(channels: int, groups: int = 32) -> nn.Module:
    if channels % groups:
        raise ValueError(f"GroupNorm: {channels} channels are not divisible by norm_groups={groups}")
    return GroupNorm32(groups, channels)


class Upsample(nn.Module):
    """Nearest-neighbour ×2, then an optional 3×3 conv (``conv``, as in CompVis)."""

    def __init__(self, channels: int, use_conv: bool, out_channels: int | None = None):
        super().__init__()
        out_channels = out_channels or channels
        self.use_conv = use_conv
        if use_conv:
            self.conv = nn.Conv2d(channels, out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2, mode="nearest")
        return self.conv(x) if self.use_conv else x


class Downsample(nn.Module):
    """Stride-2 3×3 conv, or 2×2 average pooling when ``use_conv`` is False (``op``, as in CompVis)."""

    def __init__(self, channels: int, use_conv: bool, out_channels: int | None = None):
        super().__init__()
        out_channels = out_channels or channels
        self.op = (nn.Conv2d(channels, out_channels, 3, stride=2, padding=1) if use_conv
                   else nn.AvgPool2d(kernel_size=2, stride=2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class ResBlock(nn.Module):
    """Residual block conditioned on the time (and class) embedding.

    ``use_scale_shift_norm``: FiLM-style ``norm(h)·(1+scale)+shift`` (ADM, Dhariwal & Nichol 2021);
    otherwise the embedding is added before the second norm (DDPM; Stable Diffusion's choice).
    """

    def __init__(self, channels: int, emb_channels: int, dropout: float, out_channels: int | None = None,
                 use_scale_shift_norm: bool = False, norm_groups: int = 32):
        super().__init__()
        out_channels = out_channels or channels
        self.use_scale_shift_norm = use_scale_shift_norm
        self.in_layers = nn.Sequential(normalization(channels, norm_groups), nn.SiLU(),
                                       nn.Conv2d(channels, out_channels, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(),
                                        nn.Linear(emb_channels, 2 * out_channels if use_scale_shift_norm else out_channels))
        self.out_layers = nn.Sequential(normalization(out_channels, norm_groups), nn.SiLU(), nn.Dropout(dropout),
                                        zero_module(nn.Conv2d(out_channels, out_channels, 3, padding=1)))
        self.skip_connection = nn.Identity() if out_channels == channels else nn.Conv2d(channels, out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.in_layers(x)
        emb_out = self.emb_layers(emb).to(h.dtype)[:, :, None, None]
        if self.use_scale_shift_norm:
            scale, shift = emb_out.chunk(2, dim=1)
            h = self.out_layers[0](h) * (1 + scale) + shift
            h = self.out_layers[1:](h)
        else:
            h = self.out_layers(h + emb_out)
        return self.skip_connection(x) + h


class AttentionBlock(nn.Module):
    """Self-attention over spatial positions (ADM), used where the UNet has no context.

    Parameters are kept in CompVis' shapes (``qkv``/``proj_out`` as 1×1 ``Conv1d``, per-head
    interleaved ``[q, k, v]`` channels, the "legacy" order) so their checkpoints load, but the
    products are computed with ``F.linear`` on ``(B, h·w, C)`` tokens: the same math without the
    ``(B, C, T)`` reshapes, and channels_last inputs stay copy-free.
    """

    def __init__(self, channels: int, num_heads: int = 1, num_head_channels: int = -1, backend: str = "sdpa",
                 norm_groups: int = 32):
        super().__init__()
        if num_head_channels != -1:
            if channels % num_head_channels:
                raise ValueError(f"AttentionBlock: {channels} channels not divisible by num_head_channels={num_head_channels}")
            num_heads = channels // num_head_channels
        if channels % num_heads:
            raise ValueError(f"AttentionBlock: {channels} channels not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.attend = get_attention_backend(backend)
        self.norm = normalization(channels, norm_groups)
        self.qkv = nn.Conv1d(channels, channels * 3, 1)
        self.proj_out = zero_module(nn.Conv1d(channels, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        tokens = self.norm(x).permute(0, 2, 3, 1).reshape(b, h * w, c)
        qkv = F.linear(tokens, self.qkv.weight[..., 0], self.qkv.bias)
        qkv = qkv.view(b, h * w, self.num_heads, 3, c // self.num_heads)
        out = self.attend(qkv[:, :, :, 0], qkv[:, :, :, 1], qkv[:, :, :, 2]).reshape(b, h * w, c)
        out = F.linear(out, self.proj_out.weight[..., 0], self.proj_out.bias)
        return x + out.reshape(b, h, w, c).permute(0, 3, 1, 2)


class TimestepEmbedSequential(nn.Sequential):
    """A sequential block that hands each layer what it consumes: ResBlocks the embedding,
    SpatialTransformers the context, everything else only the features."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            else:
                x = layer(x)
        return x
