"""The README's main job (`python -m train.demo`) end to end, with step counts cut to a smoke run."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_demo_main_job_runs_every_phase_and_scores(tmp_path):
    env = {**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "train.demo", "--train", "64", "--samples", "8", "--seeds", "2",
           "--data", str(tmp_path / "shards"), "--runs", str(tmp_path / "runs"),
           "--", "trainer.max_steps=2", "trainer.batch_size=4", "data.num_workers=0", "logger=none"]
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "prompt alignment on 2 x 8 fresh samples" in out.stdout
    demo = tmp_path / "runs" / "ldm_txt2img_demo-shapes" / "demo"
    result = json.loads((demo / "alignment.json").read_text())
    assert result["samples"] == 8 and result["seeds"] == 2 and 0.0 <= result["all_three"] <= 1.0
    per_seed = result["per_seed"]  # each seed's own score, and the headline score is their mean
    assert [r["seed"] for r in per_seed] == [1234, 1234 + 10_000]
    for key in ("all_three", "colour", "shape", "position", "background"):
        assert abs(result[key] - (per_seed[0][key] + per_seed[1][key]) / 2) < 1e-12
    assert "all right per seed: " in out.stdout and "(seed 11234)" in out.stdout
    assert set(result["seconds"]) == {"data", "autoencoder", "latent_cache", "diffusion", "sample_and_score", "total"}
    cache = tmp_path / "shards" / "shapes_latents"  # stage 2 trained from the latent cache, not from pixels
    assert (cache / "cache.json").exists() and list(cache.glob("latents-*.tar"))
    assert f"latents: {cache}" in (tmp_path / "runs/ldm_txt2img_demo-shapes/config.yaml").read_text()
    assert len((demo / "grid_prompts.txt").read_text().splitlines()) == 16
    from PIL import Image

    assert Image.open(demo / "grid.png").size[0] == 4 + 4 * (128 + 4)  # 4 columns of readable 128-px tiles
    for run in ("autoencoder_kl_shapes-shapes", "ldm_txt2img_demo-shapes"):  # a report per stage, path printed
        report = tmp_path / "runs" / run / "report.html"
        assert f"report: {report}" in out.stdout
        assert "data:image/png;base64," in report.read_text()
    assert "demo/alignment.json" in (tmp_path / "runs/ldm_txt2img_demo-shapes/report.html").read_text()
