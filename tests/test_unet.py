"""UNetModel (paper §3.3): parameter counts of the reference models, shapes, conditioning."""
import math

import pytest
import torch

from ldm.models.unet import UNetModel
from ldm.modules.unet_blocks import AttentionBlock, timestep_embedding

CUDA = torch.cuda.is_available()
SD_V1 = dict(in_channels=4, out_channels=4, model_channels=320, num_res_blocks=2, attention_resolutions=[4, 2, 1],
             channel_mult=[1, 2, 4, 4], num_heads=8, context_dim=768)
SD_2 = dict(SD_V1, num_heads=-1, num_head_channels=64, context_dim=1024, use_linear_in_transformer=True)
TINY = dict(in_channels=4, out_channels=4, model_channels=32, num_res_blocks=1, attention_resolutions=[1, 2],
            channel_mult=[1, 2], num_heads=2, norm_groups=8)


def n_params(model):
    return sum(p.numel() for p in model.parameters())


def build_on_meta(**kwargs):
    with torch.device("meta"):
        return UNetModel(**kwargs)


def test_sd_v1_parameter_count_and_keys():
    model = build_on_meta(**SD_V1)
    assert n_params(model) == 859_520_964
    keys = model.state_dict().keys()
    assert len(keys) == 686  # the CompVis SD-v1 checkpoint's model.diffusion_model.* key count
    for key in ("input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight", "middle_block.1.proj_in.weight",
                "output_blocks.11.1.transformer_blocks.0.ff.net.0.proj.weight", "input_blocks.3.0.op.weight",
                "output_blocks.2.1.conv.weight", "out.2.weight", "time_embed.2.bias"):
        assert key in keys, key


def test_sd_2_parameter_count_and_linear_projection():
    model = build_on_meta(**SD_2)
    assert n_params(model) == 865_910_724
    assert model.state_dict()["input_blocks.1.1.proj_in.weight"].shape == (320, 320)
    assert model.input_blocks[4][1].transformer_blocks[0].attn1.heads == 640 // 64  # level 1: 640 channels


def test_class_conditional_adds_label_embedding_parameters():
    base = n_params(build_on_meta(**TINY))
    model = build_on_meta(**TINY, num_classes=10)
    assert n_params(model) - base == 10 * 4 * 32  # nn.Embedding(num_classes, 4 * model_channels)


def test_timestep_embedding_closed_form():
    t = torch.tensor([0.0, 3.0, 999.0])
    emb = timestep_embedding(t, 7)
    half = 3
    for i in range(half):
        freq = 10000 ** (-i / half)
        torch.testing.assert_close(emb[:, i], torch.cos(t * freq))
        torch.testing.assert_close(emb[:, half + i], torch.sin(t * freq))
    assert torch.all(emb[:, -1] == 0)  # odd dim is zero-padded


def perturb(model):
    """The output conv and every residual branch start at zero; randomise them so outputs depend on inputs."""
    torch.manual_seed(123)
    with torch.no_grad():
        for p in model.parameters():
            if p.abs().sum() == 0 and p.ndim > 1:
                p.normal_(0, 0.05)
    return model


@pytest.mark.parametrize("use_linear", [False, True], ids=["conv_proj", "linear_proj"])
def test_forward_shape_with_context(use_linear):
    torch.manual_seed(0)
    model = UNetModel(**TINY, context_dim=16, use_linear_in_transformer=use_linear)
    x, t, ctx = torch.randn(3, 4, 8, 8), torch.tensor([1, 500, 999]), torch.randn(3, 5, 16)
    out = model(x, t, context=ctx)
    assert out.shape == x.shape
    assert torch.all(out == 0)  # zero-initialised output conv: the model starts predicting zero
    perturb(model)
    assert not torch.allclose(model(x, t, context=ctx), model(x, t, context=ctx + 1))


def test_class_conditional_no_context_uses_self_attention_blocks():
    torch.manual_seed(0)
    model = perturb(UNetModel(**dict(TINY, out_channels=8), num_classes=10))
    assert isinstance(model.middle_block[1], AttentionBlock)
    x, t = torch.randn(2, 4, 8, 8), torch.tensor(10)  # scalar timestep broadcasts
    out = model(x, t, y=torch.tensor([1, 2]))
    assert out.shape == (2, 8, 8, 8)
    assert not torch.allclose(out, model(x, t, y=torch.tensor([3, 4])))


def test_unconditional_without_context_and_scale_shift_norm():
    model = perturb(UNetModel(**TINY, use_scale_shift_norm=True, conv_resample=False))
    assert model.input_blocks[1][0].emb_layers[1].out_features == 2 * 32  # scale and shift
    out = model(torch.randn(2, 4, 8, 8), torch.tensor([5, 6]))
    assert out.shape == (2, 4, 8, 8) and torch.isfinite(out).all()


def test_channels_last_gives_same_output():
    model = perturb(UNetModel(**TINY, context_dim=16))
    x, t, ctx = torch.randn(2, 4, 8, 8), torch.tensor([3, 7]), torch.randn(2, 5, 16)
    expected = model(x, t, context=ctx)
    model = model.to(memory_format=torch.channels_last)
    torch.testing.assert_close(model(x.to(memory_format=torch.channels_last), t, context=ctx), expected,
                               atol=1e-5, rtol=1e-5)


def test_attention_block_matches_compvis_legacy_qkv_layout():
    """CompVis QKVAttentionLegacy on (B, 3·H·C, T) from a Conv1d, written out independently."""
    torch.manual_seed(0)
    block = AttentionBlock(32, num_heads=4, norm_groups=8)
    torch.nn.init.normal_(block.proj_out.weight)
    x = torch.randn(2, 32, 4, 3)
    b, c, heads = 2, 32, 4
    flat = x.reshape(b, c, -1)
    qkv = torch.nn.functional.conv1d(block.norm(flat), block.qkv.weight, block.qkv.bias)
    q, k, v = qkv.reshape(b * heads, 3 * c // heads, -1).split(c // heads, dim=1)
    scale = 1 / math.sqrt(math.sqrt(c // heads))
    weight = torch.einsum("bct,bcs->bts", q * scale, k * scale).softmax(-1)
    h = torch.einsum("bts,bcs->bct", weight, v).reshape(b, c, -1)
    expected = (flat + torch.nn.functional.conv1d(h, block.proj_out.weight, block.proj_out.bias)).reshape(x.shape)
    torch.testing.assert_close(block(x), expected, atol=1e-5, rtol=1e-5)


def test_bad_inputs_fail_with_clear_messages():
    model = UNetModel(**TINY, context_dim=16)
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([1, 2])
    with pytest.raises(ValueError, match=r"x must be \(B, 4, H, W\)"):
        model(torch.randn(2, 3, 8, 8), t, context=torch.randn(2, 5, 16))
    with pytest.raises(ValueError, match="divisible by 2"):
        model(torch.randn(2, 4, 7, 8), t, context=torch.randn(2, 5, 16))
    with pytest.raises(ValueError, match=r"timesteps must be \(B,\) = \(2,\)"):
        model(x, torch.tensor([1, 2, 3]), context=torch.randn(2, 5, 16))
    with pytest.raises(ValueError, match="context_dim=16 but got context=None"):
        model(x, t)
    with pytest.raises(ValueError, match=r"num_classes=None but got y=\(2,\)"):
        model(x, t, context=torch.randn(2, 5, 16), y=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="exactly one of num_heads"):
        UNetModel(**dict(TINY, num_heads=-1))
    with pytest.raises(ValueError, match="not divisible by norm_groups=32"):
        UNetModel(**dict(TINY, norm_groups=32, model_channels=16))


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_sd_v1_bf16_training_step_peak_memory():
    """One bf16-autocast AdamW step of the full SD-v1 UNet at 32×32 latents (256 px), batch 4."""
    from ldm.training.blocks import apply_activation_checkpointing

    model = UNetModel(**SD_V1).cuda()
    apply_activation_checkpointing(model, "full")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    x, ctx = torch.randn(4, 4, 32, 32, device="cuda"), torch.randn(4, 77, 768, device="cuda")
    t = torch.randint(0, 1000, (4,), device="cuda")
    torch.cuda.reset_peak_memory_stats()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = (model(x, t, context=ctx).float() - x).square().mean()
    loss.backward()
    opt.step()
    peak_gib = torch.cuda.max_memory_allocated() / 2**30
    print(f"SD-v1 UNet bf16 step, batch 4 @ 32x32: peak {peak_gib:.2f} GiB, loss {loss.item():.4f}")
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    assert peak_gib < 40  # weights+grads+Adam ≈ 13.7 GiB in fp32; activations are small at 32×32
