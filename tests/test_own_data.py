"""A user's own folder of images, through the real commands: make_shards (captions optional), then the
README's "Your own images" lines exactly as written there (shrunk only by the overrides it documents)."""
import re
import shlex
import subprocess
import sys
import tarfile

import numpy as np
import pytest
from PIL import Image, ImageDraw

from ldm.data.webdataset import build_loader
from tests.launch import ENV, ROOT, launch_cmd, run

NO_GPU = {**ENV, "CUDA_VISIBLE_DEVICES": ""}  # the laptop path, also on a GPU machine
SIZES = [(96, 96), (128, 96), (160, 90)]  # 1:1, 4:3, 16:9
COLOURS = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (40, 60, 220)}


def image_folder(folder, n=60, captioned_every=3):
    """n images of mixed aspect ratios (1:1, 4:3, 16:9): a coloured disc on a plain background. Two in three
    have a same-name .txt caption, the others none. Returns the number captioned."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    captioned = 0
    for i in range(n):
        width, height = SIZES[i % len(SIZES)]
        name = list(COLOURS)[int(rng.integers(3))]
        image = Image.new("RGB", (width, height), tuple(int(v) for v in rng.integers(200, 256, 3)))
        x, y, r = int(rng.integers(20, width - 20)), int(rng.integers(20, height - 20)), int(rng.integers(8, 18))
        ImageDraw.Draw(image).ellipse((x - r, y - r, x + r, y + r), fill=COLOURS[name])
        sub = folder / ("holiday" if i % 2 else "")
        sub.mkdir(exist_ok=True)
        image.save(sub / f"img{i:03d}.{'jpg' if i % 4 else 'png'}")
        if i % captioned_every:
            (sub / f"img{i:03d}.txt").write_text(f"a {name} disc on a pale background\n")
            captioned += 1
    return captioned


def test_make_shards_cli_without_captions(tmp_path):
    """The documented command: the folder is positional; no caption anywhere gives caption-less shards that
    stage 1 reads with data.caption_field=null, and the tool says so."""
    folder = tmp_path / "photos"
    image_folder(folder, n=9, captioned_every=10**6)  # no captions at all
    for txt in folder.rglob("*.txt"):
        txt.unlink()
    proc = run([sys.executable, "-m", "data.make_shards", str(folder), "--out", str(tmp_path / "shards")], timeout=120)
    assert "[ldm] none has a caption: train stage 1 on every image with data.caption_field=null" in proc.stdout
    tars = sorted((tmp_path / "shards").glob("train-*.tar"))
    with tarfile.open(tars[0]) as tar:
        names = tar.getnames()
    assert names and not [n for n in names if n.endswith(".txt")]
    every = build_loader(str(tars[0]), batch_size=16, image_size=32, num_workers=0, epochs=1, caption_field=None)
    batch = next(iter(every))
    assert len(batch["key"]) == 9 and batch["caption"] == [""] * 9
    assert batch["image"].shape == (9, 3, 32, 32)
    wrong = run([sys.executable, "-m", "data.make_shards", str(tmp_path / "nope"), "--out", str(tmp_path / "x")],
                check=False, timeout=120)
    assert wrong.returncode != 0 and "Traceback" not in wrong.stderr
    assert wrong.stderr.strip() == f"[ldm] make_shards: image folder {str(tmp_path / 'nope')!r} does not exist"


def readme_commands() -> list[str]:
    """The command lines of the README's "Your own images" block."""
    text = (ROOT / "README.md").read_text()
    section = text.split("## Your own images", 1)[1].split("\n## ", 1)[0]
    block = section.split("```bash", 1)[1].split("```", 1)[0]
    return [line for line in block.splitlines() if line.startswith("python")]


def test_readme_commands_are_the_ones_tested():
    commands = readme_commands()
    assert [c.split()[1] for c in commands] == ["-m", "train/main.py", "train/main.py", "train/sample.py"]
    assert "--images" not in (ROOT / "README.md").read_text()


@pytest.mark.slow
@pytest.mark.parametrize("processes", [1, 2])
def test_readme_own_images_path_end_to_end(processes, tmp_path):
    """Folder of 60 mixed-aspect images (a third without captions) -> shards -> stage 1 on all of them in
    aspect-ratio buckets with flips and random-resized crops -> stage 2 on the captioned ones with
    validation prompts -> non-square samples. Each README line run as written, relocated to tmp_path and
    shrunk by the README's own smoke-test override; on 2 processes the training lines start with the
    README's `accelerate launch --multi_gpu --num_processes 2`, on shards of 20 (N processes need N shards)."""
    captioned = image_folder(tmp_path / "my_photos")
    smoke = "trainer.max_steps=4"  # README: "add trainer.max_steps=4 to each training line for a quick check"
    outputs = []
    for command in readme_commands():
        args = shlex.split(command)
        args = [a.replace("my_photos/", f"{tmp_path / 'my_photos'}/").replace("shards/images", str(tmp_path / "shards"
                / "images")).replace("runs/", f"{tmp_path / 'runs'}/") for a in args]
        if args[1] == "-m" and processes > 1:
            args[args.index("--max-count") + 1] = "20"
        if args[1] == "train/main.py":
            args = [a for a in args if not a.startswith("trainer.max_steps=")] + [
                smoke, f"paths.data={tmp_path / 'shards'}", f"paths.runs={tmp_path / 'runs'}"]
            argv = launch_cmd(processes, *args[2:]) if processes > 1 else [sys.executable, *args[1:]]
        else:
            argv = [sys.executable, *args[1:]]
        proc = subprocess.run(argv, env=NO_GPU, cwd=ROOT, capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, f"{command}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        outputs.append(proc.stdout)
    shards_out, stage1, stage2, sample = outputs
    assert f"'written': 60, 'without_caption': {60 - captioned}" in shards_out
    assert f"[ldm] {60 - captioned} of 60 have no caption: train stage 1 on every image" in shards_out
    assert f"{processes} process(es)" in stage1 and f"{processes} process(es)" in stage2
    assert "RANDOM alex backbone" in stage1  # the run says its LPIPS is random
    runs = tmp_path / "runs"
    assert (runs / "autoencoder_kl_demo-images" / "autoencoder.safetensors").is_file()
    config = (runs / "autoencoder_kl_demo-images" / "config.yaml").read_text()
    assert re.search(r"augment:\n\s+flip: 0.5\n\s+crop: random_resized", config)
    shapes = []  # the bucket histograms (4 steps each): 1:1, 4:3 and 16:9 photos in more than one shape
    for out in (stage1, stage2):
        histogram = re.search(r"\[ldm\] buckets \(samples handed to this process so far\): (.*)", out)
        assert histogram, out[-2000:]
        shapes += re.findall(r"(\d+x\d+) \d+", histogram.group(1))
    assert len(set(shapes)) > 1, shapes

    def skipped_missing_caption(run):
        csv = (runs / run / "metrics.csv").read_text().splitlines()
        return [float(r.split(",")[2]) for r in csv if ",data/skipped_missing_caption," in r]

    stage1_skips = skipped_missing_caption("autoencoder_kl_demo-images")
    assert stage1_skips and not any(stage1_skips)  # stage 1 read every image
    assert max(skipped_missing_caption("ldm_txt2img_demo-images")) > 0  # stage 2 skipped the uncaptioned ones
    validation = sorted((runs / "ldm_txt2img_demo-images" / "images").glob("validation_*.png"))
    assert validation, stage2[-2000:]  # the validation prompts' grid (made at the end at least)
    grid = re.search(r"-> (\S+grid\.png)", sample)
    assert grid and (ROOT / grid.group(1)).is_file(), sample[-2000:]
    pictures = [f for f in (ROOT / grid.group(1)).parent.glob("*.png") if f.name != "grid.png"]
    assert pictures and all(Image.open(f).size == (80, 48) for f in pictures)  # width x height as asked
