"""`train/sample.py` with the inference options, on the CPU and (marked `gpu`) on a CUDA GPU: fp32 matches
the CPU (the noise is drawn on the CPU), bf16/fp16 give finite
images with the VAE kept in fp32, and the command runs with img2img and negative prompts."""
import runpy
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

GPU = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.fixture(scope="module")
def run_dir(tiny_runs):
    return tiny_runs["ldm"]


@GPU[0]
@GPU[1]
def test_cuda_matches_cpu_and_half_precision_is_finite(run_dir):
    from ldm.training.runs import load_run
    from ldm.inference import autocast, generate

    _, task, _ = load_run(run_dir)
    items = [{"caption": "a red circle in the center on a white background", "negative_caption": "blue"}] * 3
    kw = dict(latent_size=(8, 8), batch_size=3, seed=0, steps=4, guidance_scale=2.0)
    cpu = generate(task, items, **kw)
    task.cuda()
    gpu = generate(task, items, **kw)
    assert gpu.device.type == "cpu" and gpu.dtype == torch.float32
    torch.testing.assert_close(gpu, cpu, rtol=0, atol=2e-3)
    for precision in ("bf16", "fp16"):
        with autocast(torch.device("cuda"), precision):
            half = generate(task, items, **kw)
        assert torch.isfinite(half).all() and (half - cpu).abs().mean() < 0.1, precision


@pytest.mark.parametrize("device,precision", [("cpu", "bf16"), pytest.param("cuda", "fp16", marks=GPU)])
def test_sample_command(device, precision, run_dir, tmp_path, monkeypatch, capsys):
    """The README's sampling command with the GPU options, img2img and negative prompts."""
    from PIL import Image

    Image.new("RGB", (32, 32), (200, 30, 30)).save(tmp_path / "init.png")
    out = tmp_path / "out"
    monkeypatch.setattr(sys, "argv", ["sample.py", f"run_dir={run_dir}", f"device={device}", f"precision={precision}",
                                      "prompts=['a red circle in the center on a white background']",
                                      "negative_prompts=[blue]", f"init_image={tmp_path / 'init.png'}",
                                      "strength=0.6", "repeats=2", f"out_dir={out}"])
    runpy.run_path(str(ROOT / "train/sample.py"), run_name="__main__")
    assert f"on {device} ({precision})" in capsys.readouterr().out
    assert len(list(out.glob("0*.png"))) == 2 and (out / "grid.png").is_file()


def test_a_stage1_run_is_refused_in_one_line(tiny_runs, tmp_path):
    """The task says it does not generate images (`generates_images`): one `[ldm]` line, no traceback."""
    from tests.launch import run

    done = run([sys.executable, "train/sample.py", f"run_dir={tiny_runs['ae']}", "prompts=[a]",
                f"out_dir={tmp_path / 'out'}", "device=cpu"], check=False, timeout=300)
    assert done.returncode != 0 and "Traceback" not in done.stderr, done.stderr
    assert "[ldm]" in done.stderr and "does not generate images" in done.stderr
    assert not (tmp_path / "out" / "grid.png").exists()
