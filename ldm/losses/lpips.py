"""LPIPS perceptual distance (Zhang et al. 2018) for the stage-1 loss and metrics.

The `lpips` package ships its linear heads (`weights/v0.1/{net}.pth`) but not the torchvision backbone.
By default the backbone is the pretrained one, read from the torch hub cache
(`$TORCH_HOME/hub/checkpoints/<torchvision's file name>`). Where the file is missing it is fetched from
torchvision's URL, as torchvision does; if that fails (no internet) the run stops with ONE line naming the
file, where to put it, and the switch `model.task.loss.lpips_pretrained=false`, which builds a random
backbone on purpose. A random backbone is never used silently: the run says so, and its metric is named
`lpips_random` (ldm/metrics/image.py), never `lpips`.
"""
from __future__ import annotations

import copy
import functools
import os
import socket
import warnings

import torch
from torch import nn

from ldm.errors import RunError

# torchvision's backbone weights: file names in `<hub dir>/checkpoints/` and the URLs it fetches them from.
BACKBONE_WEIGHT_FILES = {
    "vgg": "vgg16-397923af.pth",
    "alex": "alexnet-owt-7be5be79.pth",
    "squeeze": "squeezenet1_1-b8a52dc0.pth",
}
BACKBONE_URL = "https://download.pytorch.org/models/{}"
FETCH_TIMEOUT_S = 20  # per socket operation: an offline machine fails at once, a stalled one within this


class LPIPSWeightsError(RunError):
    """The pretrained LPIPS backbone is neither cached nor downloadable."""


def cached_backbone_path(net: str) -> str:
    return os.path.join(torch.hub.get_dir(), "checkpoints", BACKBONE_WEIGHT_FILES[net])


def fetch_backbone(net: str) -> str:
    """The cached backbone file, downloaded first (with torchvision's URL and hash check) if missing."""
    path = cached_backbone_path(net)
    if os.path.isfile(path):
        return path
    url = BACKBONE_URL.format(BACKBONE_WEIGHT_FILES[net])
    previous = socket.getdefaulttimeout()
    try:
        socket.setdefaulttimeout(FETCH_TIMEOUT_S)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        torch.hub.download_url_to_file(url, path, hash_prefix=BACKBONE_WEIGHT_FILES[net].rsplit("-", 1)[1][:-4],
                                       progress=False)
    except Exception as exn:  # offline, proxy, disk, hash: all end the same way, in one line
        reason = getattr(exn, "reason", None) or exn
        raise LPIPSWeightsError(
            f"LPIPS needs the pretrained {net} backbone and could not fetch it ({type(exn).__name__}: {reason}): "
            f"place {BACKBONE_WEIGHT_FILES[net]} (from {url}) at {path} (the torch hub cache: $TORCH_HOME/hub/"
            f"checkpoints), or set model.task.loss.lpips_pretrained=false for a random backbone "
            f"(its metric is then named lpips_random)") from None
    finally:
        socket.setdefaulttimeout(previous)
    return path


class FrozenLPIPS(nn.Module):
    """Wraps `lpips.LPIPS` so it stays in eval() (its heads have dropout) when a parent calls .train().
    `pretrained` says whether the backbone is the published one (metric `lpips`) or random (`lpips_random`)."""

    def __init__(self, inner: nn.Module, pretrained: bool):
        super().__init__()
        self.inner = inner.eval().requires_grad_(False)
        self.pretrained = pretrained

    def train(self, mode: bool = True) -> "FrozenLPIPS":
        return super().train(False)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        # Frozen, but NOT under no_grad: the loss needs d(lpips)/d(reconstruction) to reach the decoder.
        return self.inner(x, y)


def build_lpips(net: str = "vgg", pretrained: bool = True) -> nn.Module:
    """A frozen LPIPS module: `lpips(x, y) -> (B, 1, 1, 1)` for images in [-1, 1], differentiable in x, y.
    pretrained=True: torchvision's backbone (fetched if missing, else LPIPSWeightsError); False: random."""
    if net not in BACKBONE_WEIGHT_FILES:
        raise ValueError(f"build_lpips: net must be one of {sorted(BACKBONE_WEIGHT_FILES)}, got {net!r}")
    if not pretrained:
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"[ldm] LPIPS: model.task.loss.lpips_pretrained=false: RANDOM {net} backbone (not the published "
                  f"LPIPS; its metric is named lpips_random)", flush=True)
        return copy.deepcopy(_build_lpips(net, None))
    return copy.deepcopy(_build_lpips(net, fetch_backbone(net)))


@functools.lru_cache(maxsize=None)
def _build_lpips(net: str, backbone_file: str | None) -> nn.Module:
    """Built once per process and backbone file (torchvision builds VGG's 120M-parameter classifier only to
    drop it: ~10 s on a small CPU). The random backbone is drawn from a fixed seed, so "random LPIPS" is
    the same function in every process and run, and building it never moves the caller's RNG."""
    import lpips

    with warnings.catch_warnings():  # torchvision's `pretrained=` deprecation notice inside lpips
        warnings.simplefilter("ignore")
        # real CPU tensors even under a `torch.device("meta")` context: this copy is cached and copied out
        with torch.random.fork_rng(), torch.device("cpu"):
            torch.manual_seed(0)
            model = lpips.LPIPS(net=net, pnet_rand=True, verbose=False)
    if backbone_file is not None:
        load_backbone(model.net, net, backbone_file)
    return FrozenLPIPS(model, pretrained=backbone_file is not None)


def load_backbone(backbone: nn.Module, net: str, path: str) -> None:
    """torchvision's `features.<i>.*` weights from `path` into lpips' backbone, whose slices keep torchvision's
    layer index i (`slice<k>.<i>.*`). Read with weights_only=True: a weight file cannot run code."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    ours = {}
    for name in backbone.state_dict():
        _slice, index, param = name.split(".", 2)
        ours[name] = f"features.{index}.{param}"
    missing = [theirs for theirs in ours.values() if theirs not in state]
    if missing:
        raise LPIPSWeightsError(f"{path} is not torchvision's {net} weight file (no {missing[0]}); delete it to "
                                f"fetch the right one, or set model.task.loss.lpips_pretrained=false")
    backbone.load_state_dict({name: state[theirs] for name, theirs in ours.items()})
