import numpy as np
import pytest
import torch

from ldm.metrics import psnr, ssim


def _pair(seed=0, shape=(3, 3, 32, 40), noise=0.3):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(shape, generator=g) * 2 - 1
    y = (x + noise * torch.randn(shape, generator=g)).clamp(-1, 1)
    return x, y


def test_psnr_matches_closed_form():
    x, y = _pair()
    a, b = ((x + 1) / 2).double().numpy(), ((y + 1) / 2).double().numpy()
    expected = [10 * np.log10(1.0 / np.mean((ai - bi) ** 2)) for ai, bi in zip(a, b)]
    np.testing.assert_allclose(psnr(x, y).numpy(), expected, rtol=1e-5)
    # a uniform offset of 0.1 on [0,1] (0.2 on [-1,1]) is exactly 20 dB
    z = torch.zeros(1, 3, 16, 16)
    assert psnr(z, z + 0.2).item() == pytest.approx(20.0, abs=1e-4)


@pytest.mark.parametrize("noise", [0.05, 0.3, 1.0])
def test_ssim_matches_scikit_image(noise):
    structural_similarity = pytest.importorskip("skimage.metrics").structural_similarity
    x, y = _pair(seed=1, noise=noise)
    expected = [structural_similarity(((a + 1) / 2).permute(1, 2, 0).double().numpy(),
                                      ((b + 1) / 2).permute(1, 2, 0).double().numpy(),
                                      gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                      data_range=1, channel_axis=2) for a, b in zip(x, y)]
    np.testing.assert_allclose(ssim(x, y).numpy(), expected, atol=1e-5)


def test_ssim_identity_is_one_and_bad_input_raises():
    x, _ = _pair()
    assert torch.allclose(ssim(x, x), torch.ones(3), atol=1e-6)
    with pytest.raises(ValueError, match="window"):
        ssim(torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 8, 8))
    with pytest.raises(ValueError, match="B, C, H, W"):
        psnr(torch.zeros(3, 8, 8), torch.zeros(3, 8, 8))
