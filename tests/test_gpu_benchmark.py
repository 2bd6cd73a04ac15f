"""benchmarks/gpu.py: its arithmetic, its in-process parts at tiny size on CPU with nothing but torch
(+ diffusers), the loop's Hydra overrides, and (slow) the prepared device script and the wheel commands of
docs/gpu.md. The speed itself is measured on a GPU; here every code path runs."""
import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import gpu  # noqa: E402

# Runs gpu.py with hydra, omegaconf and webdataset made unimportable: the in-process parts must run on a
# GPU image that has only torch, accelerate and transformers (+ diffusers for its rows).
ONLY_TORCH = ("import runpy, sys\n"
              "for name in ('hydra', 'omegaconf', 'webdataset'): sys.modules[name] = None\n"
              "sys.argv = ['benchmarks/gpu.py', *sys.argv[1:]]\n"
              "runpy.run_path('benchmarks/gpu.py', run_name='__main__')\n")


def rows_of(out: Path) -> dict[tuple[str, str], dict]:
    return {(r["part"], r["setting"]): r for r in json.loads((out / "results.json").read_text())["rows"]}


def assert_table_is_last(stdout: str, rows: dict) -> None:
    lines = stdout.strip().splitlines()
    header = max(i for i, line in enumerate(lines) if line.startswith("part  setting"))
    assert len(lines) - header - 1 == len(rows), "the table must be the last thing printed, one line per row"


def test_flops_count_attention_and_linear_in_closed_form():
    b, h, length, d = 2, 3, 16, 8
    q, k, v = (torch.randn(b, h, length, d, requires_grad=True) for _ in range(3))
    attention = gpu.flops_per_image(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v).sum())
    assert attention == 12 * b * h * length**2 * d  # QKᵀ and AV forward (4), their four gradients (8)
    linear, x = torch.nn.Linear(7, 11), torch.randn(5, 7, requires_grad=True)
    assert gpu.flops_per_image(lambda: linear(x).sum()) == 6 * 5 * 7 * 11


def test_timed_divides_the_window_by_its_steps():
    calls = []

    def step():
        calls.append(time.perf_counter())
        time.sleep(0.02)

    per_step, first = gpu.timed(step, warmup=2, steps=3, device=torch.device("cpu"))
    assert len(calls) == 5  # 2 untimed + 3 timed
    assert 0.019 < per_step < 0.06 and 0.019 < first < 0.06
    assert gpu.throughput(0.5, 32, 2e12, 989)["img_s"] == 64
    assert gpu.throughput(0.5, 32, 2e12, 989)["mfu"] == pytest.approx(64 * 2 / 989)


def test_loop_metrics_leave_the_first_window_out(tmp_path):
    (tmp_path / "metrics.csv").write_text("step,name,value\n10,train/img_per_s,5\n10,train/loss,1\n"
                                          "20,train/img_per_s,100\n30,train/img_per_s,110\n30,val/psnr,9\n")
    assert gpu.loop_metrics(tmp_path) == {"train/img_per_s": 105, "train/loss": 1}


@pytest.mark.parametrize("ckpt", ["none", "full"])
def test_loop_overrides_compose_against_the_schema(ckpt):
    from hydra import compose, initialize_config_dir

    from ldm.config import register_configs

    register_configs()
    args = argparse.Namespace(loop_steps=30, peak_tflops=989.0)
    inputs = {"shards": "/data/train-{000000..000015}.tar", "first_stage": "/x/autoencoder.safetensors",
              "text_encoder": "/x/text_encoder"}
    setup = gpu.Setup(channels_last=True, ckpt=ckpt)
    overrides = gpu.loop_overrides(args, inputs, 256, 64, setup, tiny=True, cuda=True)
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=[*overrides, "run_dir=/tmp/x"])
    assert cfg.model.name == "sd_v1" and cfg.data.shards == inputs["shards"] and cfg.data.image_size == 256
    assert cfg.trainer.batch_size == 64 and cfg.trainer.max_steps == 30 and cfg.trainer.log_every == 10
    assert cfg.trainer.channels_last is True and cfg.trainer.mixed_precision.value == "bf16"
    assert cfg.model.task.unet.model_channels == gpu.TINY_UNET["model_channels"]
    assert cfg.trainer.activation_checkpointing == ckpt and cfg.trainer.compile is False


@pytest.mark.slow
def test_in_process_parts_run_on_torch_alone_and_compare_with_diffusers(tmp_path):
    """The unet and ae parts at tiny size: same parameter count as diffusers, img/s, FLOPs, MFU and ratios
    that add up, the table printed last, results.json and results.md written."""
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "-c", ONLY_TORCH, "--tiny", "--only", "unet,ae", "--steps", "1",
                           "--warmup", "1", "--variants", "eager,ckpt_full,diffusers", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    params = sum(p.numel() for p in gpu.UNetModel(**gpu.unet_arch(tiny=True)).parameters())
    assert f"unet parameters: ours {params:,}, diffusers {params:,} (match)" in done.stdout
    rows = rows_of(out)
    assert_table_is_last(done.stdout, rows)
    flops = json.loads((out / "results.json").read_text())["meta"]["flops_per_image"]["unet@64"]
    theirs, ours = rows[("unet", "diffusers eager")], rows[("unet", "ours eager")]
    assert theirs["ratio"] == 1.0 and ours["ratio"] == pytest.approx(ours["img_s"] / theirs["img_s"])
    assert ours["mfu"] == pytest.approx(ours["img_s"] * flops / 989e12)
    checkpointed = rows[("unet", "ours + channels_last + ckpt full")]
    assert checkpointed["img_s"] > 0, checkpointed["note"]
    assert rows[("ae", "ours eager")]["img_s"] > 0 and rows[("ae", "diffusers eager")]["ratio"] == 1.0
    assert "| unet | ours eager | 64 | 2 |" in (out / "results.md").read_text()


def docs_block(title: str, language: str = "bash") -> list[str]:
    """The command lines of the first ```language block under `title` in docs/gpu.md (comments and blanks
    left out)."""
    text = (ROOT / "docs" / "gpu.md").read_text()
    block = re.search(re.escape(title) + r".*?```" + language + r"\n(.*?)```", text, re.S)
    assert block, f"docs/gpu.md has no bash block under {title!r}"
    return [line.split("  #")[0].strip() for line in block.group(1).splitlines()
            if line.strip() and not line.startswith("#")]


def test_the_documented_gpu_commands_parse():
    """docs/gpu.md's gpu.py lines (they need a GPU to run; the gpu test runs the same code): valid flags,
    parts and variants."""
    lines = docs_block("# GPU speed", "text")
    assert len(lines) == 4 and all(line.startswith("python benchmarks/gpu.py") for line in lines)
    for line in lines:
        argv = shlex.split(line)[2:]
        if argv == ["--help"]:
            with pytest.raises(SystemExit) as exit_:
                gpu.parse_args(argv)
            assert exit_.value.code == 0
        else:
            args = gpu.parse_args(argv)
            assert set(args.only) <= {"unet", "ae", "loop"} and args.unet == [(256, 64), (512, 32)]
    assert gpu.parse_args(["--only", "loop", "--loop", "256:64,512:32"]).loop == [(256, 64), (512, 32)]
    with pytest.raises(SystemExit, match="unknown part or variant"):
        gpu.parse_args(["--variants", "eager,turbo"])


@pytest.mark.slow
def test_device_script_dry_run_on_cpu(tmp_path):
    """docs/gpu.md's CPU dry run of the prepared device script: every part at tiny size, the real loop too."""
    (command,) = docs_block("CPU dry run")
    out = tmp_path / "out"
    env = {**os.environ, "PYTHON": sys.executable, "WHEELS": "", "OUT": str(out), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(shlex.split(command), cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = rows_of(out)
    assert_table_is_last(done.stdout, rows)
    assert (out / "log.txt").read_text().strip().endswith(done.stdout.strip().splitlines()[-1])
    # the loop's settings (channels_last, no checkpointing) were measured by the unet part already
    assert ("loop", "unet step: ours + channels_last") not in rows
    reference = rows[("unet", "ours + channels_last")]
    online = rows[("loop", "sd_v1 loop, online encode")]
    assert online["img_s"] > 0 and online["ratio"] == pytest.approx(online["img_s"] / reference["img_s"])
    cached = rows[("loop", "sd_v1 loop, cached latents")]
    assert cached["img_s"] > 0, cached["note"]


@pytest.mark.slow
def test_wheel_commands_of_the_docs_fetch_what_the_device_lacks(tmp_path):
    """docs/gpu.md's wheel commands (they reach PyPI): one wheel per package, under the carry limit, and
    they install the way device_run.sh installs them."""
    wheels = tmp_path / ".whl"
    for line in docs_block("Wheels to carry"):
        words = [sys.executable if w == "python3" else str(wheels) if w == ".whl" else w for w in shlex.split(line)]
        subprocess.run(words, cwd=tmp_path, check=True, capture_output=True, timeout=300)
    names = sorted(re.sub(r"-.*", "", p.name).lower() for p in wheels.glob("*.whl"))
    assert names == ["antlr4_python3_runtime", "braceexpand", "diffusers", "hydra_core", "lpips", "omegaconf",
                     "webdataset"]
    assert sum(p.stat().st_size for p in wheels.glob("*.whl")) < 16 * 2**20  # the carry limit is 64 MiB in all
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--target", str(site),
                    *map(str, wheels.glob("*.whl"))], check=True, timeout=300)
    assert (site / "hydra" / "__init__.py").exists() and (site / "antlr4" / "__init__.py").exists()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_sd_unet_step_on_gpu(tmp_path):
    """On a GPU (the device tool: pytest -m gpu tests/test_gpu_benchmark.py): the real SD-v1 sizes at a small
    batch; FLOPs per image at 256 px as counted on these machines (0.54 T on an H200), peak memory read."""
    rows = gpu.main(["--only", "unet", "--unet", "256:4", "--variants", "eager,diffusers", "--steps", "2",
                     "--out", str(tmp_path)])
    meta = json.loads((tmp_path / "results.json").read_text())
    assert meta["checks"]["unet_ours"] == gpu.SD_UNET_PARAMS and meta["checks"]["unet_match"]
    assert meta["meta"]["flops_per_image"]["unet@256"] == pytest.approx(0.537e12, rel=0.02)
    assert all(r.img_s > 0 and r.peak_gib > 3 for r in rows)
