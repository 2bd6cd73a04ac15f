"""Attention backends, CrossAttention and SpatialTransformer (paper §3.3)."""
import math
import sys
import types

import pytest
import torch

from ldm.models.unet import UNetModel
from ldm.modules.attention import (ATTENTION_BACKENDS, CrossAttention, SpatialTransformer, math_attention,
                                   position_embedding_2d, sdpa_attention, xformers_attention, xformers_problem)

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


def test_xformers_on_cpu_fails_at_construction(monkeypatch, fresh_probe):
    """No GPU here: asking for xformers fails when the model is built, in one sentence, not at the first step:
    whether xformers is missing (this venv) or installed (a stand-in package)."""
    with pytest.raises(RuntimeError, match=r"^attention_backend=xformers needs (the xformers package|xformers on CUDA)"
                                           r".*; use attention_backend=sdpa$"):
        CrossAttention(16, heads=2, dim_head=8, backend="xformers")
    with pytest.raises(RuntimeError, match="use attention_backend=sdpa"):
        UNetModel(4, 4, 32, 1, [1], channel_mult=[1], num_heads=2, norm_groups=8, attention_backend="xformers")
    q, k, v = qkv(8, 8)  # the kernel itself still refuses CPU tensors (a model built on a GPU host, run on CPU)
    with pytest.raises(RuntimeError, match="attention_backend=xformers needs xformers on CUDA; use attention_backend=sdpa"):
        xformers_attention(q, k, v)
    if not CUDA:
        fake_xformers(monkeypatch, sdpa_attention)
        with pytest.raises(RuntimeError) as error:
            CrossAttention(16, heads=2, dim_head=8, backend="xformers")
        assert str(error.value) == ("attention_backend=xformers needs xformers on CUDA (its kernels are CUDA-only and "
                                    "this process has no GPU); use attention_backend=sdpa")


def fake_xformers(monkeypatch, attention):
    """Install a stand-in `xformers` package (the real one is not in this venv) whose kernel is `attention`."""
    package, ops = types.ModuleType("xformers"), types.ModuleType("xformers.ops")
    package.__version__, package.ops, ops.memory_efficient_attention = "0.0.35", ops, attention
    monkeypatch.setitem(sys.modules, "xformers", package)
    monkeypatch.setitem(sys.modules, "xformers.ops", ops)
    xformers_problem.cache_clear()


@pytest.fixture
def fresh_probe():
    xformers_problem.cache_clear()
    yield
    xformers_problem.cache_clear()  # no fake's verdict outlives the test


def test_xformers_without_kernels_for_this_torch_is_one_clear_sentence(monkeypatch, fresh_probe):
    """An xformers wheel built for another torch imports, but its dispatcher finds no kernel (the 0.0.35 wheel on
    torch 2.11 said `No operator found for memory_efficient_attention_forward`). The probe's tiny call turns that
    into one sentence naming both versions. (Probed on CPU here; on a GPU host the probe runs on CUDA.)"""
    calls = []

    def no_kernel(q, k, v):
        calls.append(q.shape)
        raise NotImplementedError("No operator found for `memory_efficient_attention_forward` with inputs:\n"
                                  "     query : shape=(1, 8, 1, 32) (torch.float32)")

    fake_xformers(monkeypatch, no_kernel)
    problem = xformers_problem("cpu")
    assert calls == [(1, 8, 1, 32)]
    assert problem == (f"attention_backend=xformers: xformers 0.0.35 has no working attention kernel for torch "
                       f"{torch.__version__} on cpu (No operator found for `memory_efficient_attention_forward` with "
                       f"inputs:); install an xformers built for this torch, or use attention_backend=sdpa")
    assert "\n" not in problem

    # with working kernels the probe passes, and the backend calls them
    fake_xformers(monkeypatch, lambda q, k, v: sdpa_attention(q, k, v) + 1.0)
    assert xformers_problem("cpu") is None
    q, k, v = qkv(8, 8)
    with pytest.raises(RuntimeError, match="got tensors on cpu"):
        xformers_attention(q, k, v)


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


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_xformers_matches_sdpa_on_cuda():
    problem = xformers_problem()  # not installed, or no kernels for this torch build: skip, saying which
    if problem is not None:
        pytest.skip(problem)
    q, k, v = (t.detach().cuda().half().requires_grad_() for t in qkv(300, 77, d=64))
    grad_out = torch.randn_like(q)
    out_x = xformers_attention(q, k, v)
    gx = torch.autograd.grad(out_x, (q, k, v), grad_out)
    out_s = sdpa_attention(q, k, v)
    gs = torch.autograd.grad(out_s, (q, k, v), grad_out)
    torch.testing.assert_close(out_x, out_s, atol=2e-3, rtol=2e-3)
    for a, b in zip(gx, gs):
        torch.testing.assert_close(a, b, atol=5e-3, rtol=5e-3)
