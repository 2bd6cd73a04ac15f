"""Validation prompts (`trainer.validation`): config checks as one `[ldm]` line through the CLI, the same
starting noise at every validation, bit-identical resume with validation on, grids in images/ and
report.html, and FSDP at 2 processes through `accelerate launch`."""
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from PIL import Image
from safetensors.torch import load_file

from ldm.config import ConfigError, check_trainer, register_configs, validation_prompts
from tests.launch import ENV, launch_cmd, run
from tests.test_cache import argv_of, user_dir

ROOT = Path(__file__).resolve().parents[1]
register_configs()
PROMPTS = "trainer.validation.prompts=[a red circle,two blue squares,a green triangle at the top]"


def compose_cfg(*overrides):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("train", overrides=list(overrides))


def stage2(shards, first_stage, run_dir, *extra):
    return ["model=ldm_txt2img_tiny", "data=shapes", f"data.shards='{shards['train']}'",
            f"data.val_shards='{shards['val']}'", "data.image_size=32", "data.num_workers=1",
            "data.shuffle_buffer=16", "trainer=debug", "logger=none", f"model.first_stage.ckpt={first_stage}",
            f"run_dir={run_dir}", *extra]


def grid(run_dir, step) -> np.ndarray:
    return np.asarray(Image.open(Path(run_dir) / f"images/validation_{step:08d}.png").convert("RGB")).astype(int)


# ------------------------------------------------------------------------------------------ config
def test_prompts_from_a_list_or_a_file_with_negatives_for_all_or_each(tmp_path):
    base = ["model=ldm_txt2img_tiny", "model.first_stage.ckpt=x"]
    assert validation_prompts(compose_cfg(*base)) == ([], None)  # off by default
    cfg = compose_cfg(*base, "trainer.validation.prompts=[a cat,a dog]", "trainer.validation.negative_prompts=blurry")
    assert validation_prompts(cfg) == (["a cat", "a dog"], ["blurry", "blurry"])
    (tmp_path / "p.txt").write_text("a cat\n\n  a dog on a sofa \n")
    cfg = compose_cfg(*base, f"trainer.validation.prompts={tmp_path / 'p.txt'}",
                      "trainer.validation.negative_prompts=[x,y]")
    assert validation_prompts(cfg) == (["a cat", "a dog on a sofa"], ["x", "y"])
    check_trainer(cfg)
    for bad, says in ((["trainer.validation.prompts=[a,b,c]", "trainer.validation.negative_prompts=[x,y]"],
                       "2 negative prompts for 3 prompts"),
                      ([f"trainer.validation.prompts={tmp_path / 'none.txt'}"], "no such file"),
                      (["trainer.validation.prompts=[a]", "trainer.validation.every=-1"], "every=-1")):
        with pytest.raises(ConfigError, match=says):
            check_trainer(compose_cfg(*base, *bad))


@pytest.mark.parametrize("overrides, says", [
    (["model=autoencoder_kl_tiny", "trainer.validation.prompts=[a cat]"], "stage-1 autoencoder"),
    (["model=ldm_txt2img_tiny", "model.first_stage.ckpt=x", "trainer.validation.prompts=[a,b,c]",
      "trainer.validation.negative_prompts=[x,y]"], "2 negative prompts for 3 prompts"),
])
def test_bad_validation_config_is_one_line_through_the_cli(overrides, says, tmp_path):
    proc = run(launch_cmd(1, *overrides, "data=shapes", f"run_dir={tmp_path / 'run'}"), check=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("[ldm] config error: trainer.validation") and says in lines[0], lines
    assert not (tmp_path / "run/checkpoints").exists()  # refused before any training starts


# ------------------------------------------------------------------------------------------ one process
@pytest.mark.slow  # four short CLI runs: ~4.5 min on the shared 2-core machine
def test_same_noise_every_time_and_resume_stays_bit_identical(shapes_shards, tiny_autoencoder, tmp_path):
    # lr 0: the weights (and EMA) never change, so two grids at different steps are equal only if both
    # started from the same noise
    frozen = tmp_path / "frozen"
    run(launch_cmd(1, *stage2(shapes_shards, tiny_autoencoder, frozen, PROMPTS, "trainer.validation.every=2",
                              "trainer.max_steps=4", "model.optim.unet.lr=0")))
    first, last = grid(frozen, 2), grid(frozen, 4)
    assert np.array_equal(first, last)
    assert first[:100].std() > 10  # the samples are not blank
    # report.html shows the newest validation grid
    run([sys.executable, "train/report.py", str(frozen)])
    assert "validation at step 4" in (frozen / "report.html").read_text()

    # validation every step, interrupted at step 2 and resumed == no validation, straight to 4
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run(launch_cmd(1, *stage2(shapes_shards, tiny_autoencoder, straight, "trainer.max_steps=4")))
    for steps in (2, 4):
        run(launch_cmd(1, *stage2(shapes_shards, tiny_autoencoder, resumed, PROMPTS, "trainer.validation.every=1",
                                  f"trainer.max_steps={steps}")))
    assert sorted(p.name for p in (resumed / "images").glob("validation_*.png")) == \
        [f"validation_{s:08d}.png" for s in (1, 2, 3, 4)]
    assert not np.array_equal(grid(resumed, 1), grid(resumed, 4))  # with lr > 0 the model does change
    for name in ("model", "ema"):
        a = load_file(straight / f"checkpoints/step_00000004/{name}.safetensors")
        b = load_file(resumed / f"checkpoints/step_00000004/{name}.safetensors")
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), f"{name}: validation shifted the training stream"


# ------------------------------------------------------------------------------------------ FSDP, 2 processes
@pytest.mark.slow  # a 2-process FSDP run and a 1-process run: ~2.5 min on the shared 2-core machine
def test_fsdp_two_processes_sample_the_same_grid_as_one(shapes_shards, tiny_autoencoder, tmp_path):
    one, fsdp = tmp_path / "one", tmp_path / "fsdp"
    extra = [PROMPTS, "trainer.validation.every=1", "trainer.max_steps=2", "model.optim.unet.lr=0",
             "trainer.validation.negative_prompts=blurry"]
    run(launch_cmd(1, *stage2(shapes_shards, tiny_autoencoder, one, *extra)))
    proc = run(launch_cmd(2, *stage2(shapes_shards, tiny_autoencoder, fsdp, *extra, "trainer.strategy=fsdp")),
               timeout=600)
    assert "Traceback" not in proc.stderr
    for step in (1, 2):
        # same initial weights, same noise: the sharded forward gives the same pixels up to float rounding
        assert np.abs(grid(one, step) - grid(fsdp, step)).mean() < 1.0
    assert grid(fsdp, 1).shape == grid(one, 1).shape


# ------------------------------------------------------------------------------------------ documented command
def docs_command() -> str:
    text = (ROOT / "docs/training.md").read_text()
    section = text.split("## Validation prompts", 1)[1].split("\n## ", 1)[0]
    block = section.split("```bash\n", 1)[1].split("```", 1)[0]
    (line,) = [line for line in block.splitlines() if line and not line.startswith("#")]
    return line


@pytest.mark.slow  # one CLI run: ~40 s on the shared 2-core machine
def test_documented_command_writes_validation_grids(shapes_shards, tiny_autoencoder, tmp_path):
    import subprocess

    line = docs_command()
    readme = [x.strip() for x in (ROOT / "README.md").read_text().splitlines() if "trainer.validation." in x
              and x.startswith("python") and "data=images" not in x]  # (own images: tests/test_own_data.py)
    assert readme == [line]
    cwd = user_dir(tmp_path / "user", shapes_shards, tiny_autoencoder)
    (cwd / "prompts.txt").write_text("a red circle\ntwo blue squares\n")
    small = ["data.image_size=32", "data.num_workers=1", "data.shuffle_buffer=16", "trainer=debug", "logger=none"]
    argv = [w.replace("every=500", "every=2") for w in argv_of(line)]  # trainer=debug: 4 steps
    proc = subprocess.run([*argv, *small], cwd=cwd, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    images = cwd / "runs/ldm_txt2img_tiny-shapes/images"
    assert sorted(p.name for p in images.glob("validation_*.png")) == ["validation_00000002.png",
                                                                      "validation_00000004.png"]
