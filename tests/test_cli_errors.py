"""Mistakes a user makes with train/main.py end in ONE `[ldm] …` line and a non-zero exit, never a
traceback. Config mistakes are caught before Hydra makes the run directory (ldm/training/preflight.py)."""
import json
import os
import pickle
import sys

import pytest
import torch
from safetensors.torch import save_file

from tests.launch import ENV, launch_cmd, run

NO_GPU = {**ENV, "CUDA_VISIBLE_DEVICES": ""}  # the CPU path, also on a GPU machine


def data_args(shards):
    return ["data=shapes", f"data.shards='{shards['train']}'", f"data.val_shards='{shards['val']}'",
            "data.image_size=32", "data.num_workers=0", "logger=none"]


def one_line(proc) -> str:
    """The single `[ldm]` line of a clean failure (non-zero exit, no traceback)."""
    assert proc.returncode not in (0, None), proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("[ldm]")]
    assert len(lines) == 1, lines
    assert proc.stderr.strip().splitlines()[-1] == lines[0]
    return lines[0]


def read_only_runs(tmp_path) -> str:
    """A folder nothing can be created in: a 0555 folder, or (root ignores modes) one inside sysfs."""
    if os.geteuid() == 0:
        return "/sys/ldm-runs"
    folder = tmp_path / "read_only"
    folder.mkdir()
    folder.chmod(0o555)
    return str(folder / "runs")


CONFIG_CASES = {
    "stage 2 without a first stage": (["model=ldm_txt2img_tiny", "trainer=debug"],
                                      "[ldm] config error: model.first_stage.ckpt is not set: model=ldm_txt2img_tiny"),
    "fsdp on stage 1": (["model=autoencoder_kl_tiny", "trainer=debug", "trainer.strategy=fsdp"],
                        "[ldm] config error: trainer.strategy=fsdp: model=autoencoder_kl_tiny (AutoencoderTask) names "
                        "no modules to shard"),
    "GPU trainer defaults on a CPU": (["model=autoencoder_kl_tiny"],
                                      "[ldm] config error: no GPU here, and trainer=default is sized for GPUs"),
    "random crop with a latent cache": (["model=autoencoder_kl_tiny", "trainer=debug", "data.latents=/tmp/none",
                                         "data.augment.crop=random"], "[ldm] config error: data.latents=/tmp/none "
                                                                       "with data.augment"),
}


@pytest.mark.parametrize("case", sorted(CONFIG_CASES))
def test_config_mistake_is_one_line_before_the_run_dir_exists(case, shapes_shards, tmp_path):
    overrides, expected = CONFIG_CASES[case]
    run_dir = tmp_path / "run"
    line = one_line(run([sys.executable, "train/main.py", *data_args(shapes_shards), f"run_dir={run_dir}", *overrides],
                        check=False, env=NO_GPU, timeout=300))
    assert line.startswith(expected), line
    assert not run_dir.exists()  # checked before Hydra makes it: no .hydra/, no main.log, no lock


def test_read_only_runs_folder(shapes_shards, tmp_path):
    runs = read_only_runs(tmp_path)
    line = one_line(run([sys.executable, "train/main.py", "model=autoencoder_kl_tiny", "trainer=debug",
                         *data_args(shapes_shards), f"paths.runs={runs}"], check=False, env=NO_GPU, timeout=300))
    assert line.startswith(f"[ldm] config error: cannot write the run directory {runs}/autoencoder_kl_tiny-shapes")
    assert "paths.runs=" in line


@pytest.mark.slow
def test_under_the_launcher_a_failure_is_one_line_not_a_child_failed_report(shapes_shards, tmp_path):
    """A rank's non-zero exit makes torch elastic's agent print a ChildFailedError report (a traceback and a
    block per rank). A runtime error on the ranks (an unsafe first stage, found while building) ends in its
    one line and the launcher's quiet 143 (a config error: test_scaleout.py, 3 processes)."""
    first_stage = tmp_path / "first_stage.ckpt"
    first_stage.write_bytes(pickle.dumps({"state_dict": Payload(tmp_path / "PWNED")}))
    proc = run(launch_cmd(2, *data_args(shapes_shards), "trainer=debug", "model=ldm_txt2img_tiny",
                          f"model.first_stage.ckpt={first_stage}", f"run_dir={tmp_path / 'run'}"),
               check=False, env=NO_GPU, timeout=300)
    text = proc.stdout + proc.stderr
    assert proc.returncode == 143, text[-3000:]
    assert "Traceback" not in text and "ChildFailedError" not in text, text[-3000:]
    lines = {line for line in text.splitlines() if line.startswith("[ldm]")}  # each rank may say it
    assert len(lines) == 1 and lines.pop().startswith(f"[ldm] {first_stage} cannot be read with torch.load("), text
    assert not (tmp_path / "PWNED").exists()


def test_only_the_first_failing_rank_of_a_node_signals_its_agent(tmp_path, monkeypatch):
    """Two ranks failing at once used to signal their agent twice; the second signal landed while the agent
    logged the first and it printed that signal's traceback. Now the first rank of an attempt to create the
    marker in the agent's attempt directory tells it; the others of that node do not."""
    from ldm.training.exits import _first_to_tell_agent

    attempt = tmp_path / "torchelastic_x" / "none_y" / "attempt_0"
    for rank in (0, 1):
        (attempt / str(rank)).mkdir(parents=True)
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(attempt / "0" / "error.json"))
    assert _first_to_tell_agent()
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(attempt / "1" / "error.json"))
    assert not _first_to_tell_agent()
    next_attempt = attempt.parent / "attempt_1" / "1"  # a restarted attempt is told again
    next_attempt.mkdir(parents=True)
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(next_attempt / "error.json"))
    assert _first_to_tell_agent()
    monkeypatch.delenv("TORCHELASTIC_ERROR_FILE")  # no agent directory known: tell it
    assert _first_to_tell_agent()


def test_folder_of_images_as_shards_says_how_to_make_shards(shapes_shards, tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "a.png").write_bytes(b"not really")
    line = one_line(run([sys.executable, "train/main.py", "model=autoencoder_kl_tiny", "trainer=debug",
                         *data_args(shapes_shards), f"data.shards={folder}", f"run_dir={tmp_path / 'run'}"],
                        check=False, env=NO_GPU, timeout=300))
    assert f"python -m data.make_shards {folder} --out {folder}-shards" in line, line


class Payload:
    """Unpickling this runs `touch MARKER` (what a hostile checkpoint does)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _hostile_autoencoder(path, victim):
    from ldm.models.autoencoder import CONFIG_METADATA_KEY

    config = {"_target_": "builtins.open", "file": str(victim), "mode": "w"}
    save_file({"w": torch.zeros(1)}, str(path), metadata={CONFIG_METADATA_KEY: json.dumps(config)})


@pytest.mark.slow
@pytest.mark.parametrize("case", ["unsafe .ckpt first stage", "unsafe .bin init_from", "hostile _target_"])
def test_unsafe_weight_files_are_refused_in_one_line(case, shapes_shards, tiny_autoencoder, tmp_path):
    marker, victim = tmp_path / "PWNED", tmp_path / "victim.txt"
    victim.write_text("precious")
    first_stage, extra = tiny_autoencoder, []
    if case == "unsafe .ckpt first stage":
        first_stage = tmp_path / "first_stage.ckpt"
        first_stage.write_bytes(pickle.dumps({"state_dict": Payload(marker)}))
        expected = f"[ldm] {first_stage} cannot be read with torch.load(weights_only=True)"
    elif case == "unsafe .bin init_from":
        evil = tmp_path / "unet.bin"
        evil.write_bytes(pickle.dumps({"state_dict": Payload(marker)}))
        extra = [f"model.init_from={evil}"]
        expected = f"[ldm] {evil} cannot be read with torch.load(weights_only=True)"
    else:
        first_stage = tmp_path / "first_stage.safetensors"
        _hostile_autoencoder(first_stage, victim)
        expected = f"[ldm] {first_stage}: its metadata names `_target_` 'builtins.open', which is not an autoencoder"
    line = one_line(run([sys.executable, "train/main.py", "model=ldm_txt2img_tiny", "trainer=debug",
                         *data_args(shapes_shards), f"model.first_stage.ckpt={first_stage}", *extra,
                         f"run_dir={tmp_path / 'run'}"], check=False, env=NO_GPU, timeout=300))
    assert line.startswith(expected), line
    assert not marker.exists() and victim.read_text() == "precious"
    assert not (tmp_path / "run" / "checkpoints").exists()


# ---------------------------------------------------------------- sample.py, evaluate.py, report.py
# Each option mistake is refused before anything is read: the run directory does not even exist here, so
# a line about the option (not about the missing run) shows the check came first.
@pytest.mark.parametrize("options, says", [
    (["device=cuda", "prompts=[a]"], "no CUDA GPU"),
    (["device=cpu", "precision=fp16", "prompts=[a]"], "precision=fp16 on the CPU"),
    (["prompts=[]"], "nothing to sample"),
    (["prompts=[a,b,c]", "negative_prompts=[x,y]"], "negative_prompts has 2 entries"),
    (["prompts=[a]", "image=photo.png"], "inpainting needs both image=… and mask=…"),
], ids=["cuda without a GPU", "fp16 on a CPU", "no prompts", "negative prompts count", "image without mask"])
@pytest.mark.slow
def test_sample_option_mistakes_are_one_line_before_loading(tmp_path, options, says):
    proc = run([sys.executable, "train/sample.py", f"run_dir={tmp_path / 'no_run'}", f"out_dir={tmp_path / 'out'}",
                *options], check=False, env=NO_GPU)
    assert says in one_line(proc)
    assert not list((tmp_path / "out").glob("*.png"))


@pytest.mark.parametrize("script", ["train/evaluate.py", "train/report.py"])
def test_evaluate_and_report_on_a_folder_that_is_not_a_run(tmp_path, script):
    proc = run([sys.executable, script, str(tmp_path)], check=False)
    assert "run directory written by train/main.py" in one_line(proc)
