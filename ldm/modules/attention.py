"""Attention for the latent-diffusion UNet (Rombach et al. 2022, §3.3).

The conditioning mechanism of the paper is cross-attention: ``Q = W_Q · φ(z_t)`` from the flattened
UNet features, ``K = W_K · τ_θ(y)``, ``V = W_V · τ_θ(y)`` from the conditioning tokens, and
``Attention(Q, K, V) = softmax(Q Kᵀ / √d) · V`` (paper Eq. 3 and §3.3). The layer layout below is the
CompVis/Stability one (``ldm/modules/attention.py``) so that parameter names and counts match theirs
and their checkpoints load unchanged.

The attention kernel itself is picked by name from ``ATTENTION_BACKENDS``. Every backend takes
``q (B, Lq, H, D)``, ``k, v (B, Lk, H, D)`` — the layout the linear projections produce, and the one
xformers wants — and returns ``(B, Lq, H, D)``:

- ``sdpa`` (default): ``torch.nn.functional.scaled_dot_product_attention``; flash / memory-efficient
  kernels on CPU and GPU (at length 8192 on CPU: +20 MB instead of +4.6 GB for the naive product).
- ``xformers``: ``xformers.ops.memory_efficient_attention``; its kernels are CUDA-only, and a wheel
  built for another torch imports fine but has none (seen: xformers 0.0.35 on torch 2.11). A tiny
  probe call at model construction turns either case into one clear error (``xformers_problem``).
- ``math``: the explicit formula in float32, the reference the others are tested against.
"""
from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import nn

XFORMERS_ERROR = "attention_backend=xformers needs xformers on CUDA; use attention_backend=sdpa"


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """PyTorch's fused attention; it wants heads before length, so transpose (views, no copy)."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)


def xformers_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """xformers' memory-efficient kernel (Rabe & Staats 2021); takes (B, L, H, D) natively."""
    try:
        import xformers.ops as xops
    except ImportError as error:
        raise RuntimeError(f"{XFORMERS_ERROR} (import failed: {error})") from error
    if not q.is_cuda:
        raise RuntimeError(f"{XFORMERS_ERROR} (got tensors on {q.device})")
    return xops.memory_efficient_attention(q, k, v)


@functools.lru_cache(maxsize=None)
def xformers_problem(device: str | None = None) -> str | None:
    """Why ``attention_backend=xformers`` cannot run here, in one sentence, or None if it can. The
    kernels are probed with one tiny call on ``device`` (default: CUDA when this process has a GPU)."""
    try:
        import xformers
        import xformers.ops as xops
    except Exception as error:  # noqa: BLE001 - not installed (ImportError), or a broken install
        return f"attention_backend=xformers needs the xformers package ({error}); use attention_backend=sdpa"
    if device is None:
        if not torch.cuda.is_available():
            return ("attention_backend=xformers needs xformers on CUDA (its kernels are CUDA-only and this process "
                    "has no GPU); use attention_backend=sdpa")
        device = "cuda"
    dtype = torch.float16 if device.startswith("cuda") else torch.float32
    q = torch.zeros(1, 8, 1, 32, device=device, dtype=dtype)
    try:
        xops.memory_efficient_attention(q, q, q)
    except Exception as error:  # noqa: BLE001 - NotImplementedError "No operator found …", or a loader error
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        return (f"attention_backend=xformers: xformers {getattr(xformers, '__version__', '?')} has no working "
                f"attention kernel for torch {torch.__version__} on {device} ({reason}); install an xformers "
                f"built for this torch, or use attention_backend=sdpa")
    return None


def math_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(Q Kᵀ / √d) V written out, in float32 whatever the input dtype (paper Eq. 3)."""
    dtype = q.dtype
    q, k, v = (t.float().transpose(1, 2) for t in (q, k, v))  # (B, H, L, D)
    weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)
    return (weights @ v).transpose(1, 2).to(dtype)


ATTENTION_BACKENDS = {
    "sdpa": sdpa_attention,
    "xformers": xformers_attention,
    "math": math_attention,
}


def get_attention_backend(name: str):
    """Look a backend up by name; an unknown name, or xformers where it cannot run, fails at model
    construction, not mid-training."""
    if name not in ATTENTION_BACKENDS:
        raise ValueError(f"attention_backend={name!r} is unknown; choose one of {sorted(ATTENTION_BACKENDS)}")
    if name == "xformers" and (problem := xformers_problem()) is not None:
        raise RuntimeError(problem)
    return ATTENTION_BACKENDS[name]


class CrossAttention(nn.Module):
    """Multi-head attention; self-attention when ``context`` is None, cross-attention otherwise.

    ``to_q/to_k/to_v`` carry no bias and ``to_out`` is ``Sequential(Linear, Dropout)``, as in CompVis.
    """

    def __init__(self, query_dim: int, context_dim: int | None = None, heads: int = 8, dim_head: int = 64,
                 dropout: float = 0.0, backend: str = "sdpa"):
        super().__init__()
        inner_dim = heads * dim_head
        self.context_dim = query_dim if context_dim is None else context_dim
        self.heads, self.dim_head = heads, dim_head
        self.attend = get_attention_backend(backend)
        self.to_q = nn.Linear(query_dim, inner_dim, bias=False)
        self.to_k = nn.Linear(self.context_dim, inner_dim, bias=False)
        self.to_v = nn.Linear(self.context_dim, inner_dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner_dim, query_dim), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        context = x if context is None else context
        if context.shape[-1] != self.context_dim:
            raise ValueError(f"CrossAttention expects context of shape (B, M, {self.context_dim}), "
                             f"got {tuple(context.shape)}")
        (b, lq, _), lk = x.shape, context.shape[1]
        q = self.to_q(x).view(b, lq, self.heads, self.dim_head)
        k = self.to_k(context).view(b, lk, self.heads, self.dim_head)
        v = self.to_v(context).view(b, lk, self.heads, self.dim_head)
        out = self.attend(q, k, v).reshape(b, lq, self.heads * self.dim_head)
        return self.to_out(out)


class GEGLU(nn.Module):
    """Gated GELU (Shazeer 2020): one projection to twice the width, half of it gates the other."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)


class FeedForward(nn.Module):
    """Transformer MLP, ``net = [GEGLU | Linear+GELU, Dropout, Linear]`` (CompVis key layout)."""

    def __init__(self, dim: int, dim_out: int | None = None, mult: int = 4, glu: bool = True, dropout: float = 0.0):
        super().__init__()
        inner_dim = int(dim * mult)
        project_in = GEGLU(dim, inner_dim) if glu else nn.Sequential(nn.Linear(dim, inner_dim), nn.GELU())
        self.net = nn.Sequential(project_in, nn.Dropout(dropout), nn.Linear(inner_dim, dim_out or dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """Pre-norm block: self-attention, cross-attention to τ_θ(y), gated feed-forward (paper §3.3)."""

    def __init__(self, dim: int, n_heads: int, d_head: int, dropout: float = 0.0, context_dim: int | None = None,
                 gated_ff: bool = True, backend: str = "sdpa"):
        super().__init__()
        self.attn1 = CrossAttention(dim, None, n_heads, d_head, dropout, backend)
        self.ff = FeedForward(dim, dropout=dropout, glu=gated_ff)
        self.attn2 = CrossAttention(dim, context_dim, n_heads, d_head, dropout, backend)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


def zero_module(module: nn.Module) -> nn.Module:
    """Zero a residual branch's last layer so every block starts as the identity (as in ADM/CompVis)."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def position_embedding_2d(h: int, w: int, dim: int, device=None, dtype=None) -> torch.Tensor:
    """Fixed 2D sine-cosine embedding ``(h·w, dim)`` of each token's *relative* position (DiT / MAE
    style, but on coordinates in (0, 1) so a position means the same at every resolution): a quarter of
    the channels each for sin/cos of x and y at frequencies π·2^k."""
    if dim % 4:
        raise ValueError(f"position_embedding_2d: dim={dim} must be divisible by 4")
    freqs = math.pi * 2.0 ** torch.arange(dim // 4, device=device, dtype=torch.float32)
    ys = ((torch.arange(h, device=device, dtype=torch.float32) + 0.5) / h)[:, None] * freqs  # (h, dim/4)
    xs = ((torch.arange(w, device=device, dtype=torch.float32) + 0.5) / w)[:, None] * freqs  # (w, dim/4)
    ys = torch.cat([ys.sin(), ys.cos()], dim=-1)[:, None].expand(h, w, dim // 2)
    xs = torch.cat([xs.sin(), xs.cos()], dim=-1)[None].expand(h, w, dim // 2)
    return torch.cat([xs, ys], dim=-1).reshape(h * w, dim).to(dtype)


class SpatialTransformer(nn.Module):
    """Transformer over the ``h·w`` positions of a feature map, with cross-attention to ``context``.

    GroupNorm → projection in (1×1 conv, or linear as in SD-2) → ``depth`` transformer blocks →
    projection out (zero-initialised) → residual. Norm eps 1e-6 as in CompVis ``Normalize``.

    ``pos_embed`` (off in the paper and SD) adds ``position_embedding_2d`` to the tokens, so self- and
    cross-attention queries know where they are: a prompt's "on the left" needs that, and convolutions
    learn absolute position only slowly, from their zero padding. It has no parameters.
    """

    def __init__(self, in_channels: int, n_heads: int, d_head: int, depth: int = 1, dropout: float = 0.0,
                 context_dim: int | None = None, use_linear: bool = False, backend: str = "sdpa",
                 norm_groups: int = 32, pos_embed: bool = False):
        super().__init__()
        inner_dim = n_heads * d_head
        self.context_dim, self.use_linear, self.pos_embed = context_dim, use_linear, pos_embed
        self.norm = nn.GroupNorm(norm_groups, in_channels, eps=1e-6)
        projection = nn.Linear if use_linear else (lambda i, o: nn.Conv2d(i, o, kernel_size=1))
        self.proj_in = projection(in_channels, inner_dim)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(inner_dim, n_heads, d_head, dropout, context_dim, backend=backend)
            for _ in range(depth))
        self.proj_out = zero_module(projection(inner_dim, in_channels))

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        if self.context_dim is not None and context is None:
            raise ValueError(f"SpatialTransformer was built with context_dim={self.context_dim} but got context=None")
        b, _, h, w = x.shape
        x_in = x
        x = self.norm(x)
        if not self.use_linear:
            x = self.proj_in(x)
        # permute+reshape: a free view when x is channels_last, one copy otherwise.
        x = x.permute(0, 2, 3, 1).reshape(b, h * w, -1)
        if self.use_linear:
            x = self.proj_in(x)
        if self.pos_embed:
            x = x + position_embedding_2d(h, w, x.shape[-1], x.device, x.dtype)
        for block in self.transformer_blocks:
            x = block(x, context)
        if self.use_linear:
            x = self.proj_out(x)
        x = x.reshape(b, h, w, -1).permute(0, 3, 1, 2)
        if not self.use_linear:
            x = self.proj_out(x)
        return x + x_in
