"""The README's pretrained-weights commands, run at tiny scale, and its quoted shard example.

A tiny random "Stable Diffusion" diffusers folder (UNet + unet_ema/, VAE, CLIP text encoder, tokenizer) stands
in for /models/stable-diffusion-v1-5; the README's commands run on it with the preset shrunk by overrides.
"""
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir

from ldm.config import register_configs

diffusers = pytest.importorskip("diffusers")

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
register_configs()
SHARD_EXAMPLE = "/data/laion/{000000..012345}.tar"
TINY_SD_V1 = ["model.task.unet.model_channels=32", "model.task.unet.channel_mult=[1,2]",
              "model.task.unet.num_res_blocks=1", "model.task.unet.attention_resolutions=[1]",
              "data.image_size=32", "data.num_workers=1",
              "data.shuffle_buffer=16", "trainer=debug", "trainer.max_steps=2", "logger=none",
              "model.ema.warmup=false"]


def readme_block(heading: str, language: str) -> str:
    section = README.split(f"## {heading}\n", 1)[1].split("\n## ", 1)[0]
    return re.search(rf"```{language}\n(.*?)```", section, re.S)[1]


def shell_words(line: str) -> list[str]:
    """The argv bash itself makes of a README line (quotes, braces and all)."""
    out = subprocess.run(["bash", "-c", f"printf '%s\\n' {line}"], capture_output=True, text=True, check=True)
    return out.stdout.splitlines()


def test_readme_shard_example_reaches_hydra_quoted():
    from hydra.core.override_parser.overrides_parser import OverridesParser

    lines = [line for line in README.splitlines() + (ROOT / "conf/data/webdataset.yaml").read_text().splitlines()
             if SHARD_EXAMPLE in line]
    assert len(lines) >= 3, lines  # training example, fine-tune example, webdataset.yaml
    parser = OverridesParser.create()
    for line in lines:
        words = [w for w in shell_words(line.lstrip("#").strip()) if w.startswith("data")]
        shards = next(w for w in words if w.startswith("data.shards="))
        assert parser.parse_overrides([shards])[0].value() == SHARD_EXAMPLE
        with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
            cfg = compose("train", overrides=[w for w in words if "=" in w])
        assert cfg.data.shards == SHARD_EXAMPLE
    # The form the README had: the shell strips the single quotes and Hydra chokes on the brace.
    with pytest.raises(Exception, match="mismatched input"):
        parser.parse_overrides(shell_words(f"data.shards='{SHARD_EXAMPLE}'"))


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory):
    """A diffusers SD-v1 pipeline folder at tiny width (same block layout as sd_v1), random weights, plus an
    EMA (unet_ema/) and the same weights as one CompVis single file."""
    from safetensors.torch import save_file
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from ldm.convert import keymap, read_unet_weights, read_vae_weights

    root = tmp_path_factory.mktemp("sd")
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(sample_size=16, block_out_channels=(32, 64), layers_per_block=1,
                                          down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                          up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                                          attention_head_dim=8)
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(0.02 * torch.randn_like(p))  # no zero-initialised layers left
    vae = diffusers.AutoencoderKL(block_out_channels=(32, 64), layers_per_block=1, latent_channels=4, sample_size=32,
                                  down_block_types=("DownEncoderBlock2D",) * 2,
                                  up_block_types=("UpDecoderBlock2D",) * 2, scaling_factor=0.25)
    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, **{t: i + 2 for i, t in enumerate(
        [*letters, *(c + "</w>" for c in letters)])}}
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[])
    text_encoder = CLIPTextModel(CLIPTextConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64,
                                                num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=77,
                                                bos_token_id=0, eos_token_id=1, pad_token_id=1))
    scheduler = diffusers.DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    diffusers.StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                      scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                      requires_safety_checker=False).save_pretrained(root / "sd15")
    ema = diffusers.UNet2DConditionModel.from_config(unet.config)
    with torch.no_grad():
        for p, q in zip(ema.parameters(), unet.parameters()):
            p.copy_(0.5 * q + 0.01)
    ema.save_pretrained(root / "sd15" / "unet_ema")
    raw, ema_state, _ = read_unet_weights(root / "sd15")
    vae_state, _, _ = read_vae_weights(root / "sd15")
    single = {**{"model.diffusion_model." + k: v for k, v in raw.items()},
              **{keymap.compvis_ema_key(k): v for k, v in ema_state.items()},
              **{"first_stage_model." + k: v for k, v in vae_state.items()}}
    save_file(single, str(root / "v1-5-pruned.safetensors"))
    return dict(root=root, folder=root / "sd15", raw=raw, ema=ema_state)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # diffusers' own numpy-2 warning in set_timesteps
def test_finetune_export_and_sample_in_diffusers(tiny_sd, shapes_shards, tmp_path):
    from ldm.convert import load_unet
    from ldm.training.build import build_task
    from ldm.training.loop import train

    # 1. The README's fine-tune command, with the tiny folder, the shapes shards and the preset shrunk.
    commands = [line for line in readme_block("Pretrained weights: fine-tune and export", "bash").splitlines()
                if line and not line.startswith("#")]
    assert commands[0].startswith("SD=") and commands[1].startswith("python train/main.py experiment=sd_v1")
    line = commands[1].replace("$SD", str(tiny_sd["folder"])).replace(SHARD_EXAMPLE, shapes_shards["train"])
    overrides = shell_words(line)[2:] + TINY_SD_V1 + [f"paths.runs={tmp_path / 'runs'}",
                                                      f"data.val_shards='{shapes_shards['val']}'"]
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    task, pretrained_ema = build_task(cfg)  # what train() builds first: the pretrained weights are in place
    assert all(torch.equal(v, tiny_sd["raw"][k]) for k, v in task.unet.state_dict().items())
    assert all(torch.equal(v, tiny_sd["ema"][k]) for k, v in pretrained_ema.items())
    assert task.first_stage.scale_factor.item() == pytest.approx(0.25)  # the VAE config's scaling_factor
    run_dir = train(cfg)
    assert run_dir == tmp_path / "runs" / "sd_v1-webdataset"

    # 2. The README's export command, as a real subprocess.
    export = shell_words(commands[2].replace("runs/", f"{tmp_path}/runs/").replace("exported/", f"{tmp_path}/"))
    assert export[:2] == ["python", "train/export.py"]
    subprocess.run([sys.executable, *export[1:]], check=True, cwd=ROOT, timeout=300)
    out = tmp_path / "sd15-finetuned"
    assert {p.name for p in out.iterdir()} == {"unet", "vae", "scheduler", "text_encoder", "tokenizer",
                                               "model_index.json"}
    # EMA weights exported: two updates at decay 0.9999 from the folder's unet_ema/ barely move them.
    exported = load_unet(out).state_dict()
    flat = lambda s: torch.cat([v.flatten() for k, v in sorted(s.items())])  # noqa: E731
    assert (flat(exported) - flat(tiny_sd["ema"])).norm() / flat(tiny_sd["ema"]).norm() < 1e-3
    assert (flat(exported) - flat(tiny_sd["raw"])).norm() / flat(tiny_sd["raw"]).norm() > 0.1
    scheduler = json.loads((out / "scheduler/scheduler_config.json").read_text())
    assert scheduler["_class_name"] == "DPMSolverMultistepScheduler"  # sd_v1 samples with dpmpp_2m
    assert (scheduler["beta_schedule"], scheduler["prediction_type"]) == ("scaled_linear", "epsilon")

    # 3. The README's Python block: diffusers samples from the export; our loaders read the single file.
    code = readme_block("Pretrained weights: fine-tune and export", "python")
    code = code.replace("exported/sd15-finetuned", str(out)).replace("/models/", f"{tiny_sd['root']}/")
    # The tiny stand-in is not SD-v1's layout, so its single file must say what the real one's shapes do.
    tiny = code.replace('ema=True)', 'ema=True, config={"num_heads": 8, "norm_groups": 32})')
    tiny = tiny.replace('v1-5-pruned.safetensors")', 'v1-5-pruned.safetensors", config={"norm_groups": 32})')
    assert tiny.count("config=") == 2
    code = tiny
    namespace = {}
    exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102 - our own README
    assert namespace["image"].size == (32, 32)
    assert np.asarray(namespace["image"]).std() > 0  # an image, not a constant
    pipe = namespace["pipe"]
    torch.testing.assert_close(pipe.scheduler.betas, task.schedule.betas, rtol=1e-6, atol=1e-9)
    assert all(torch.equal(v, tiny_sd["ema"][k]) for k, v in namespace["unet"].state_dict().items())
    assert namespace["vae"].scale_factor.item() == pytest.approx(0.18215)


@pytest.mark.slow
def test_export_of_our_own_txt2img_run(shapes_shards, tmp_path):
    """A run with our jointly trained text encoder exports UNet, VAE and scheduler (no pipeline index); diffusers'
    UNet from the folder computes what the run's EMA UNet computes. A stage-1 run, or an existing output
    folder, is refused without writing anything."""
    from ldm.training.export import export_run
    from ldm.training.loop import train
    from ldm.training.runs import load_run

    data = ["data=shapes", f"data.shards='{shapes_shards['train']}'", f"data.val_shards='{shapes_shards['val']}'",
            "data.image_size=32", "data.num_workers=1", "data.shuffle_buffer=16", "trainer=debug",
            "trainer.max_steps=2", "logger=none"]
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        ae_cfg = compose("train", overrides=["model=autoencoder_kl_tiny", *data, f"run_dir={tmp_path / 'ae'}",
                                             "++model.task.loss.perceptual_weight=0"])
        ldm_cfg = compose("train", overrides=["model=ldm_txt2img_tiny", *data, f"run_dir={tmp_path / 'ldm'}",
                                              f"model.first_stage.ckpt={tmp_path / 'ae/autoencoder.safetensors'}"])
    train(ae_cfg)
    train(ldm_cfg)
    out = export_run(tmp_path / "ldm", tmp_path / "out")
    assert {p.name for p in out.iterdir()} == {"unet", "vae", "scheduler"}
    _, task, _ = load_run(tmp_path / "ldm")  # EMA weights, as exported
    unet = diffusers.UNet2DConditionModel.from_pretrained(out / "unet").eval()
    g = torch.Generator().manual_seed(0)
    x, context = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 16, 64, generator=g)
    t = torch.tensor([3, 900])
    with torch.no_grad():
        expected = task.unet(x, t, context)
        assert ((unet(x, t, context).sample - expected).norm() / expected.norm()).item() <= 1e-5
    vae = diffusers.AutoencoderKL.from_pretrained(out / "vae")
    assert vae.config.scaling_factor == pytest.approx(task.first_stage.scale_factor.item())
    with pytest.raises(FileExistsError, match="nothing was written"):
        export_run(tmp_path / "ldm", out)
    with pytest.raises(ValueError, match="only stage-2"):
        export_run(tmp_path / "ae", tmp_path / "out2")
    assert not (tmp_path / "out2").exists() and not (tmp_path / "out2.tmp").exists()
