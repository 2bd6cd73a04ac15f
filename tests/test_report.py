"""train/report.py on real tiny runs (stage 1 and stage 2): one self-contained HTML file whose every
image decodes, with the curves, grids, metrics, checkpoints and config; train/sample.py's captioned grid.
The `slow` test renders the page in headless Chromium and checks the screenshot is not blank."""
import base64
import io
import json
import os
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from PIL import Image

from ldm.config import register_configs

ROOT = Path(__file__).resolve().parents[1]
register_configs()


def train(shards, run_dir, *overrides):
    from ldm.training.loop import train as run

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=[
            "data=shapes", f"data.shards='{shards['train']}'", f"data.val_shards='{shards['val']}'",
            "data.image_size=32", "data.num_workers=0", "trainer=debug", "trainer.eval_every=2", "logger=none",
            f"run_dir={run_dir}", *overrides])
    return run(cfg)


@pytest.fixture(scope="module")
def runs(shapes_shards, tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    ae = train(shapes_shards, root / "ae", "model=autoencoder_kl_tiny", "++model.task.loss.perceptual_weight=0")
    ldm = train(shapes_shards, root / "ldm", "model=ldm_txt2img_tiny", "trainer.max_steps=2",
                f"model.first_stage.ckpt={ae / 'autoencoder.safetensors'}", "model.task.sample_steps=2")
    return {"ae": ae, "ldm": ldm}


class Images(HTMLParser):
    """Every <img> of a page, and every URL it would fetch (a self-contained page fetches none)."""

    def __init__(self):
        super().__init__()
        self.images, self.external = [], []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.images.append(attrs)
        for key in ("src", "href"):
            if attrs.get(key) and not attrs[key].startswith("data:"):
                self.external.append(attrs[key])


def parse(page: str) -> tuple[Images, dict[str, Image.Image]]:
    parser = Images()
    parser.feed(page)
    decoded = {}
    for img in parser.images:
        head, data = img["src"].split(",", 1)
        assert head == "data:image/png;base64", head
        image = Image.open(io.BytesIO(base64.b64decode(data, validate=True)))
        image.load()  # raises on a truncated or corrupt PNG
        decoded[img["alt"]] = image.convert("RGB")
    return parser, decoded


def report(run_dir) -> Path:
    """The README's command, as a user runs it."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "train/report.py", str(run_dir)], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == f"[ldm] report: {run_dir / 'report.html'}"
    return run_dir / "report.html"


def test_stage1_report_has_every_curve_grid_metric_and_checkpoint(runs):
    run_dir = runs["ae"]
    page = report(run_dir).read_text()
    parser, images = parse(page)
    assert parser.external == []  # opens from a file, offline, copied anywhere
    names = {line.split(",")[1] for line in (run_dir / "metrics.csv").read_text().splitlines()[1:]}
    curves = {n for n in names if not n.startswith("data/")}  # data/skipped_* stay at 0 here: not plotted
    assert {"train/loss", "lr/autoencoder", "train/img_per_s", "val/psnr", "val/ssim"} <= curves
    assert curves <= set(images) and "data/skipped_samples" not in images
    for name in curves:  # each chart has its line drawn in matplotlib's first colour, not only axes
        pixels = np.asarray(images[name]).astype(int)
        assert (np.abs(pixels - [31, 119, 180]).sum(-1) < 60).sum() > 20, f"{name}: no curve drawn"
    grid = images["reconstructions at step 4"]
    assert np.array_equal(np.asarray(grid), np.asarray(Image.open(run_dir / "images/reconstructions_00000004.png")
                                                          .convert("RGB")))
    final = json.loads((run_dir / "final_metrics.json").read_text())
    assert f"{final['val/psnr']:.4g}" in page
    assert "step_00000004" in page and "autoencoder.safetensors" in page
    assert "name: autoencoder_kl_tiny" in page  # the resolved config


def test_stage2_report_and_captioned_sample_grids(runs, shapes_shards):
    run_dir = runs["ldm"]
    _, images = parse(report(run_dir).read_text())
    assert {"train/loss", "lr/unet", "val/loss", "samples at step 2", "references at step 2"} <= set(images)
    samples = images["samples at step 2"]
    assert samples.width == 4 * (128 + 4) + 4  # the 4 held-out samples as 128-px tiles, readable

    # the grid's captions are the prompts each sample was generated from
    import torch

    from ldm.training.build import build_eval_loader
    from ldm.training.runs import load_run

    cfg, task, _ = load_run(run_dir)
    batch = next(iter(build_eval_loader(cfg, batch_size=3)))
    panel = task.visualize(batch)["samples"]
    assert panel.captions == batch["caption"] and panel.images.shape == (3, 3, 32, 32)
    assert torch.isfinite(panel.images).all()


def test_sample_command_writes_a_captioned_grid(runs, tmp_path):
    out = tmp_path / "samples"
    prompts = '["a red circle in the center on a white background","a blue square on the left on a black background"]'
    cmd = [sys.executable, "train/sample.py", f"run_dir={runs['ldm']}", f"prompts={prompts}", "steps=2",
           f"out_dir={out}"]
    res = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    grid = np.asarray(Image.open(out / "grid.png").convert("L"))
    assert grid.shape[1] == 2 * 128 + 3 * 4  # two 32-px samples upscaled 4x, 4-px gaps
    below = grid[4 + 128 + 2:, 4:4 + 128]  # the caption area under the first tile holds dark text
    assert (below < 100).sum() > 50
    assert len(list(out.glob("000*_a_*.png"))) == 2  # the per-image PNGs stay at full resolution


def test_report_on_a_live_or_broken_run(runs, tmp_path):
    from train.report import write_report

    run_dir = tmp_path / "live"
    shutil.copytree(runs["ae"], run_dir)
    for name in ("final_metrics.json", "autoencoder.safetensors", "report.html"):
        (run_dir / name).unlink(missing_ok=True)
    with (run_dir / "metrics.csv").open("a") as f:
        f.write("5,train/lo\n6,train/loss,not-a-number\n")  # a row cut off mid-write, a damaged one
    page = write_report(run_dir, tmp_path / "out.html").read_text()
    assert "None yet (final_metrics.json is written when training ends)" in page
    (run_dir / "eval.json").write_text('{"psnr": 2')  # cut short
    (run_dir / "config.yaml").write_text("model: [unclosed")
    page = write_report(run_dir, tmp_path / "out.html").read_text()
    assert "eval.json</h3><p>unreadable" in page and "model: [unclosed" in page and "? on ?" in page
    assert not (run_dir / "report.html").exists()

    with pytest.raises(FileNotFoundError, match="has no config.yaml"):
        write_report(tmp_path)
    res = subprocess.run([sys.executable, "train/report.py", str(tmp_path / "nope")], cwd=ROOT, capture_output=True,
                         text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert res.returncode == 2 and "nope is not a directory" in res.stderr


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("chromium") is None, reason="needs chromium (apt-get install chromium)")
def test_report_renders_in_headless_chromium(runs, tmp_path):
    page = report(runs["ldm"])
    shot = tmp_path / "shot.png"
    subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    f"--screenshot={shot}", "--window-size=1280,2000", page.resolve().as_uri()],
                   check=True, capture_output=True, timeout=120)
    pixels = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    assert pixels.shape[:2] == (2000, 1280)
    # the charts' blue lines and the grids' colours are on screen, not a blank or error page
    assert (np.abs(pixels - [31, 119, 180]).sum(-1) < 60).sum() > 500
    assert pixels.std() > 30
