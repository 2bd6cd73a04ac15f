"""logger=tensorboard: a tiny run's event files read back with TensorBoard's own reader hold the same
scalars as metrics.csv (what W&B gets) and the captioned image grids; `tensorboard --logdir` serves them."""
import io
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_tensorboard_logger_writes_scalars_and_images(shapes_shards, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = tmp_path / "run"
    # the README's command, with the tiny model and shards of this test
    cmd = [sys.executable, "train/main.py", "model=autoencoder_kl_tiny", "data=shapes", "logger=tensorboard",
           f"data.shards='{shapes_shards['train']}'", f"data.val_shards='{shapes_shards['val']}'",
           "data.image_size=32", "data.num_workers=0", "trainer=debug", "trainer.eval_every=2",
           "++model.task.loss.perceptual_weight=0", f"run_dir={run_dir}"]
    out = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"TensorBoard: logging to {run_dir}/tensorboard" in out.stdout
    assert not (run_dir / "wandb").exists()

    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"images": 0, "scalars": 0}).Reload()
    tags = events.Tags()
    csv_rows = [r.split(",") for r in (run_dir / "metrics.csv").read_text().splitlines()[1:]]
    assert set(tags["scalars"]) == {name for _, name, _ in csv_rows}  # every series the CSV (and W&B) gets
    assert {"train/loss", "train/img_per_s", "lr/autoencoder", "lr/discriminator", "grad_norm/autoencoder",
            "val/psnr", "val/ssim"} <= set(tags["scalars"])
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3, 4]
    assert [e.step for e in events.Scalars("val/psnr")] == [2, 4]
    by_step = {(int(s), n): float(v) for s, n, v in csv_rows}
    for name in ("train/loss", "val/psnr", "lr/autoencoder"):  # same values (the CSV keeps 6 digits)
        for e in events.Scalars(name):
            assert abs(e.value - by_step[(e.step, name)]) <= 1e-5 * max(1.0, abs(e.value))

    # the image is the same captioned grid as the PNG in run_dir/images (input | reconstruction pairs)
    assert tags["images"] == ["reconstructions"]
    logged = events.Images("reconstructions")
    assert [e.step for e in logged] == [2, 4]
    tb_image = np.asarray(Image.open(io.BytesIO(logged[-1].encoded_image_string)).convert("RGB"))
    png = np.asarray(Image.open(run_dir / "images/reconstructions_00000004.png").convert("RGB"))
    assert np.array_equal(tb_image, png)
    assert png.shape[0] > 128 and png.shape[1] >= 8 * 128  # 4 pairs of >=128-px tiles per row

    # the README's `tensorboard --logdir runs`: the server lists this run's scalars and images
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = subprocess.Popen([str(Path(sys.executable).parent / "tensorboard"), "--logdir", str(tmp_path),
                               "--host", "127.0.0.1", "--port", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline, served = time.monotonic() + 60, {}
        while not served and time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/data/plugin/scalars/tags", timeout=5) as r:
                    served = json.loads(r.read())
            except OSError:
                time.sleep(0.3)
        assert {"train/loss", "val/psnr"} <= set(served.get("run/tensorboard", {})), served
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/data/plugin/images/tags", timeout=5) as r:
            assert "reconstructions" in json.loads(r.read())["run/tensorboard"]
    finally:
        server.terminate()
        server.wait(timeout=30)
