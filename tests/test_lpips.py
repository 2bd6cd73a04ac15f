"""LPIPS: the pretrained backbone by default, read from the torch hub cache ($TORCH_HOME); without the file
(and with no internet, as here) the run stops in one line; a random backbone only on request, named
`lpips_random`."""
import sys

import pytest
import torch

from ldm.losses.lpips import BACKBONE_WEIGHT_FILES, LPIPSWeightsError, build_lpips
from ldm.metrics import lpips_metric_name
from tests.launch import ENV, run


@pytest.fixture(scope="module")
def hub_with_vgg(tmp_path_factory):
    """A torch home whose hub cache holds a vgg16 weight file under torchvision's name: torchvision's vgg16
    architecture with random weights, saved as a state dict (its `features.*`, the part LPIPS uses)."""
    import torchvision

    torch.manual_seed(123)
    state = {k: v for k, v in torchvision.models.vgg16(weights=None).state_dict().items() if k.startswith("features.")}
    home = tmp_path_factory.mktemp("torch_home")
    (home / "hub" / "checkpoints").mkdir(parents=True)
    torch.save(state, home / "hub" / "checkpoints" / BACKBONE_WEIGHT_FILES["vgg"])
    return home, state


def test_cached_backbone_file_is_loaded(hub_with_vgg, monkeypatch, capsys):
    home, state = hub_with_vgg
    monkeypatch.setenv("TORCH_HOME", str(home))
    model = build_lpips("vgg")
    assert model.pretrained and lpips_metric_name(model) == "lpips"
    backbone = model.inner.net.state_dict()
    assert len(backbone) == len(state) == 26
    for name, tensor in backbone.items():  # slice<k>.<i>.weight holds torchvision's features.<i>.weight
        assert torch.equal(tensor, state["features." + name.split(".", 1)[1]]), name
    assert "RANDOM" not in capsys.readouterr().out
    x, y = torch.rand(2, 3, 32, 32) * 2 - 1, torch.rand(2, 3, 32, 32) * 2 - 1
    assert model(x, y).shape == (2, 1, 1, 1) and float(model(x, x).abs().max()) == 0.0

    from ldm.losses.autoencoder import AutoencoderLoss

    loss = AutoencoderLoss(disc_start=10, disc_ndf=8, disc_num_layers=2)  # the default: pretrained vgg
    assert loss.lpips.pretrained and loss.lpips_name == "lpips"
    assert torch.equal(loss.lpips.inner.net.slice1[0].weight, state["features.0.weight"])


def test_random_backbone_only_on_request_and_named_so(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # empty: nothing cached
    with pytest.raises(LPIPSWeightsError) as info:
        build_lpips("alex")
    message = str(info.value)
    assert "\n" not in message and str(tmp_path / "hub" / "checkpoints" / BACKBONE_WEIGHT_FILES["alex"]) in message
    assert "model.task.loss.lpips_pretrained=false" in message and "download.pytorch.org" in message
    model = build_lpips("alex", pretrained=False)
    assert not model.pretrained and lpips_metric_name(model) == "lpips_random"
    assert "RANDOM alex backbone" in capsys.readouterr().out  # the run says so


def test_training_without_the_backbone_stops_in_one_line(shapes_shards, tmp_path):
    """The real CLI, a paper-default LPIPS (pretrained vgg) and an empty torch home: one `[ldm]` line naming
    the file, the path and the switch; no traceback, no checkpoint."""
    run_dir = tmp_path / "run"
    proc = run([sys.executable, "train/main.py", "model=autoencoder_kl_tiny", "model.task.loss.lpips_pretrained=true",
                "data=shapes", f"data.shards='{shapes_shards['train']}'", f"data.val_shards='{shapes_shards['val']}'",
                "data.image_size=32", "data.num_workers=0", "trainer=debug", "logger=none", f"run_dir={run_dir}"],
               check=False, env={**ENV, "TORCH_HOME": str(tmp_path / "torch")}, timeout=300)
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("[ldm] LPIPS needs the pretrained vgg backbone")
    assert str(tmp_path / "torch" / "hub" / "checkpoints" / "vgg16-397923af.pth") in line
    assert "model.task.loss.lpips_pretrained=false" in line
    assert not (run_dir / "checkpoints").exists()
