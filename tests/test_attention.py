"""Attention backends, CrossAttention and SpatialTransformer (paper §3.3)."""
import math

import pytest
import torch

from ldm.modules.attention import (ATTENTION_BACKENDS, BasicTransformerBlock, CrossAttention, SpatialTransformer,
                                   math_attention, position_embedding_2d, sdpa_attention, xformers_attention)

CUDA = torch.cuda.is_available()


def reference_attention_float64(q, k, v):
    """softmax(QKᵀ/√d)V with einsum in float64: independent of every backend's code path."""
    q, k, v = (t.double() for t in (q, k, v))
    logits = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(q.shape[-1])
    return torch.einsum("bhqk,bkhd->bqhd", logits.softmax(-1), v)


def qkv(lq, lk, seed=0, b=2, h=3, d=16):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, length, h, d, generator=g, requires_grad=True) for length in (lq, lk, lk)]


@pytest.mark.parametrize("lq,lk", [(37, 37), (37, 11)], ids=["self", "cross"])
@pytest.mark.parametrize("backend", ["sdpa", "math"])
def test_backend_matches_float64_reference(backend, lq, lk):
    q, k, v = qkv(lq, lk)
    out = ATTENTION_BACKENDS[backend](q, k, v)
    assert out.shape == q.shape and out.dtype == torch.float32
    torch.testing.assert_close(out.double(), reference_attention_float64(q, k, v), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("lq,lk", [(37, 37), (37, 11)], ids=["self", "cross"])
def test_sdpa_and_math_same_output_and_gradients(lq, lk):
    q, k, v = qkv(lq, lk, seed=1)
    grad_out = torch.randn(q.shape)
    grads = {}
    for name, fn in (("sdpa", sdpa_attention), ("math", math_attention)):
        out = fn(q, k, v)
        grads[name] = (out, *torch.autograd.grad(out, (q, k, v), grad_out))
    for a, b in zip(grads["sdpa"], grads["math"]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_math_backend_computes_in_float32_for_bf16_inputs():
    q, k, v = (t.detach().bfloat16() for t in qkv(20, 20, seed=2))
    out = math_attention(q, k, v)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), reference_attention_float64(q, k, v), atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("context_dim", [None, 24], ids=["self", "cross"])
def test_cross_attention_module_backends_agree(context_dim):
    torch.manual_seed(0)
    x = torch.randn(2, 16, 32, requires_grad=True)
    context = None if context_dim is None else torch.randn(2, 7, context_dim)
    results = []
    for backend in ("sdpa", "math"):
        torch.manual_seed(1)  # identical weights for both modules
        attn = CrossAttention(32, context_dim, heads=4, dim_head=8, backend=backend)
        out = attn(x, context)
        grads = torch.autograd.grad(out.square().sum(), [x, *attn.parameters()])
        results.append((out, *grads))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_cross_attention_uses_context_for_keys_and_values():
    torch.manual_seed(0)
    attn = CrossAttention(16, 8, heads=2, dim_head=8)
    x, ctx = torch.randn(1, 5, 16), torch.randn(1, 3, 8)
    assert attn.to_k.in_features == 8 and attn.to_q.in_features == 16
    assert not torch.allclose(attn(x, ctx), attn(x, ctx + 1.0))


def test_xformers_on_cpu_raises_clear_error():
    q, k, v = qkv(8, 8)
    with pytest.raises(RuntimeError, match="attention_backend=xformers needs xformers on CUDA; use attention_backend=sdpa"):
        xformers_attention(q, k, v)
    attn = CrossAttention(16, heads=2, dim_head=8, backend="xformers")
    with pytest.raises(RuntimeError, match="use attention_backend=sdpa"):
        attn(torch.randn(1, 4, 16))


def test_unknown_backend_and_wrong_context_fail_with_names():
    with pytest.raises(ValueError, match="attention_backend='flash3' is unknown.*sdpa"):
        CrossAttention(16, backend="flash3")
    attn = CrossAttention(16, context_dim=8, heads=2, dim_head=8)
    with pytest.raises(ValueError, match=r"context of shape \(B, M, 8\)"):
        attn(torch.randn(1, 4, 16), torch.randn(1, 3, 9))
    st = SpatialTransformer(32, 2, 16, context_dim=8)
    with pytest.raises(ValueError, match="context_dim=8 but got context=None"):
        st(torch.randn(1, 32, 4, 4))


def test_spatial_transformer_linear_equals_conv_projection_with_same_weights():
    torch.manual_seed(0)
    conv = SpatialTransformer(32, 4, 8, context_dim=12, use_linear=False)
    linear = SpatialTransformer(32, 4, 8, context_dim=12, use_linear=True)
    for p in conv.proj_out.parameters():  # zero-initialised: give it weights so the test can fail
        torch.nn.init.normal_(p)
    state = {k: v.flatten(1) if k.endswith(("proj_in.weight", "proj_out.weight")) else v
             for k, v in conv.state_dict().items()}
    linear.load_state_dict(state)
    x, ctx = torch.randn(2, 32, 4, 6), torch.randn(2, 5, 12)
    torch.testing.assert_close(linear(x, ctx), conv(x, ctx), atol=1e-5, rtol=1e-5)
    # channels_last input gives the same result (the permute/reshape path is layout-agnostic)
    torch.testing.assert_close(conv(x.to(memory_format=torch.channels_last), ctx), conv(x, ctx), atol=1e-5, rtol=1e-5)


def test_spatial_transformer_starts_as_identity():
    st = SpatialTransformer(32, 4, 8, context_dim=12)
    x = torch.randn(2, 32, 4, 4)
    torch.testing.assert_close(st(x, torch.randn(2, 5, 12)), x)


def test_position_embedding_closed_form():
    h, w, dim = 3, 4, 8
    emb = position_embedding_2d(h, w, dim).view(h, w, dim)
    i, j = 2, 1  # row 2, column 1: relative coordinates y = 2.5/3, x = 1.5/4
    x, y = 1.5 / 4, 2.5 / 3
    f = [math.pi, 2 * math.pi]
    expected = [math.sin(x * f[0]), math.sin(x * f[1]), math.cos(x * f[0]), math.cos(x * f[1]),
                math.sin(y * f[0]), math.sin(y * f[1]), math.cos(y * f[0]), math.cos(y * f[1])]
    torch.testing.assert_close(emb[i, j], torch.tensor(expected))
    assert torch.cdist(emb.view(h * w, dim), emb.view(h * w, dim)).add(torch.eye(h * w)).min() > 0.1  # distinct
    # Relative coordinates: a 1x1 map's only token and a 3x3 map's centre token both sit at (0.5, 0.5).
    torch.testing.assert_close(position_embedding_2d(1, 1, 16)[0], position_embedding_2d(3, 3, 16)[4])
    with pytest.raises(ValueError, match="divisible by 4"):
        position_embedding_2d(2, 2, 6)


def test_pos_embed_lets_tokens_tell_where_they_are():
    """On a spatially uniform input, a SpatialTransformer without position embedding gives every token
    the same output (it is permutation-equivariant); with `pos_embed` the outputs differ by position.
    It adds no parameters, so checkpoints of the paper's UNets are unaffected."""
    torch.manual_seed(0)
    plain = SpatialTransformer(32, 2, 16, context_dim=8, norm_groups=8)
    placed = SpatialTransformer(32, 2, 16, context_dim=8, norm_groups=8, pos_embed=True)
    placed.load_state_dict(plain.state_dict())
    for block in (plain, placed):
        torch.nn.init.normal_(block.proj_out.weight)  # leave the identity start
    x = torch.randn(2, 32, 1, 1).expand(2, 32, 4, 4) + 0.1 * torch.randn(2, 32, 1, 1)
    context = torch.randn(2, 5, 8)
    out_plain, out_placed = plain(x, context), placed(x, context)
    assert (out_plain - out_plain[..., :1, :1]).abs().max() < 1e-5
    assert (out_placed - out_placed[..., :1, :1]).abs().amax(dim=(0, 1)).flatten()[1:].min() > 1e-2
    assert sum(p.numel() for p in plain.parameters()) == sum(p.numel() for p in placed.parameters())


def test_transformer_block_checkpointing_same_gradients():
    torch.manual_seed(0)
    plain = BasicTransformerBlock(32, 4, 8, context_dim=12)
    ckpt = BasicTransformerBlock(32, 4, 8, context_dim=12, use_checkpoint=True)
    ckpt.load_state_dict(plain.state_dict())
    x, ctx = torch.randn(2, 10, 32), torch.randn(2, 5, 12)
    grads = [torch.autograd.grad(m(x, ctx).square().sum(), list(m.parameters())) for m in (plain, ckpt)]
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_xformers_matches_sdpa_on_cuda():
    pytest.importorskip("xformers")
    q, k, v = (t.detach().cuda().half().requires_grad_() for t in qkv(300, 77, d=64))
    grad_out = torch.randn_like(q)
    out_x = xformers_attention(q, k, v)
    gx = torch.autograd.grad(out_x, (q, k, v), grad_out)
    out_s = sdpa_attention(q, k, v)
    gs = torch.autograd.grad(out_s, (q, k, v), grad_out)
    torch.testing.assert_close(out_x, out_s, atol=2e-3, rtol=2e-3)
    for a, b in zip(gx, gs):
        torch.testing.assert_close(a, b, atol=5e-3, rtol=5e-3)
