"""Aspect-ratio buckets (`data.buckets`): bucket shapes, the nearest-bucket resize (never a square crop), and
the training order with buckets: one shape per micro-batch, every sample once, the same global order on 1, 2
and 4 processes, an exact resume (also onto another process count). Real shards, written with ShardSink."""
import io
import json
import math
import sys

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from ldm.data.buckets import make_buckets, nearest_bucket, parse_buckets
from ldm.data.decode import Augment, SampleDecoder, to_tensor
from ldm.data.order import build_global_loader
from ldm.data.shards import ShardSink
from ldm.errors import DataError
from tests.launch import ENV, run

SIZE, STEP = 32, 8  # buckets (40, 24), (32, 32), (24, 40)
BUCKETS = make_buckets(SIZE, STEP, 2.0)
SOURCE_SIZES = [(32, 32), (48, 36), (36, 48), (44, 30)]  # (width, height): 1:1, 4:3, 3:4, about 3:2
N_SHARDS, PER_SHARD = 6, 8


def _bucket_of_source(width, height):
    return nearest_bucket(width, height, BUCKETS)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """6 shards x 8 samples, each sample one of SOURCE_SIZES (chosen at random), key s<i>, json {"w", "h"}."""
    out = tmp_path_factory.mktemp("bucket_shards")
    rng = np.random.default_rng(0)
    with ShardSink(str(out), "train", max_count=PER_SHARD) as sink:
        for i in range(N_SHARDS * PER_SHARD):
            w, h = SOURCE_SIZES[rng.integers(len(SOURCE_SIZES))]
            sink.write(f"s{i:03d}", rng.integers(0, 256, (h, w, 3), dtype=np.uint8), f"caption {i}", {"w": w, "h": h})
    return sink.close().files


class EpochDecoder(SampleDecoder):
    """Also reports the epoch a sample was read in, so each (epoch, key) read can be followed."""

    def __call__(self, raw):
        sample = super().__call__(raw)
        sample["meta"] = {**sample["meta"], "epoch": raw["__epoch__"]}
        return sample


def _loader(urls, rank, world, workers=0, micro=2, global_batch=8, augment=None):
    decoder = EpochDecoder(SIZE, "txt", buckets=tuple(BUCKETS), augment=augment, seed=0)
    return build_global_loader(urls, decoder=decoder, global_batch=global_batch, micro_batch=micro, rank=rank,
                               world_size=world, num_workers=workers, seed=0, shuffle_buffer=4, resample=False,
                               buckets=BUCKETS)


def _global_batches(loaders, steps, accum):
    """Each global batch as the loop sees it: micro-batch a of rank r is micro-batch a*world + r, in order;
    each entry a micro-batch's list of (epoch, key), with its image shape checked against its samples."""
    iters = [iter(loader) for loader in loaders]
    batches = []
    for _ in range(steps):
        micro_batches = []
        for _ in range(accum):
            for it in iters:
                batch = next(it)
                shape = tuple(batch["image"].shape[-2:])
                expected = {_bucket_of_source(m["w"], m["h"]) for m in batch["meta"]}
                assert expected == {shape}, (shape, expected)  # one bucket, the right one for every sample
                micro_batches.append([(m["epoch"], k) for m, k in zip(batch["meta"], batch["key"])])
        batches.append(micro_batches)
    return batches


# ------------------------------------------------------------------------------------------- shapes
@pytest.mark.parametrize("size,step,ratio", [(32, 8, 2.0), (64, 8, 2.0), (64, 16, 2.0), (256, 64, 2.0),
                                             (512, 64, 2.0), (1024, 64, 4.0)])
def test_buckets_fit_the_budget_and_the_step(size, step, ratio):
    buckets = make_buckets(size, step, ratio)
    assert (size, size) in buckets and len(set(buckets)) == len(buckets)
    for h, w in buckets:
        assert h % step == 0 and w % step == 0 and h * w <= size * size
        assert max(h, w) / min(h, w) <= ratio
        assert (w, h) in buckets  # both orientations
        # the widest for its height, or the tallest for its width: no bucket wastes a whole step of pixels
        assert h * (w + step) > size * size or (h + step) * w > size * size


def test_known_buckets_and_nearest_choice():
    assert make_buckets(64, 8, 2.0) == [(80, 48), (72, 56), (64, 64), (56, 72), (48, 80)]
    assert make_buckets(512, 64, 2.0) == [(640, 384), (576, 448), (512, 512), (448, 576), (384, 640)]
    buckets = make_buckets(64, 8, 2.0)
    # (width, height) -> (height, width)
    assert nearest_bucket(100, 100, buckets) == (64, 64)
    assert nearest_bucket(400, 300, buckets) == (56, 72)  # 4:3 -> 72/56 = 1.29
    assert nearest_bucket(1920, 1080, buckets) == (48, 80)  # 16:9 -> 80/48 = 1.67
    assert nearest_bucket(300, 400, buckets) == (72, 56)  # 3:4
    assert nearest_bucket(1000, 100, buckets) == (48, 80)  # beyond the widest: the widest


def test_an_image_keeps_its_aspect_ratio_and_is_never_square_cropped():
    """A 16:9 gradient goes to the 48x80 bucket whole but for the overflow: it matches PIL's own fit of the
    image to that shape (crop to the aspect ratio, then resize); a square crop would lose 44% of the width."""
    x = np.linspace(0, 255, 96)[None, :, None] * np.ones((54, 1, 1))
    y = np.linspace(0, 255, 54)[:, None, None] * np.ones((1, 96, 1))
    image = Image.fromarray(np.concatenate([x, y, 255 - x], axis=2).astype(np.uint8))
    buckets = make_buckets(64, 8, 2.0)
    decoder = SampleDecoder(64, None, buckets=tuple(buckets))
    raw = {"__key__": "k", "png": _png(image)}
    got = decoder(raw)["image"]
    assert got.shape == (3, 48, 80)
    # the aspect-ratio error is what the bucket step allows: at most the distance to the nearest bucket
    error = abs(math.log(80 / 48) - math.log(96 / 54))
    assert error == min(abs(math.log(w / h) - math.log(96 / 54)) for h, w in buckets) and error < 0.07
    reference = to_tensor(ImageOps.fit(image, (80, 48), Image.Resampling.BICUBIC))
    assert (got - reference).abs().mean() < 0.02
    square = to_tensor(ImageOps.fit(image, (64, 64), Image.Resampling.BICUBIC))
    assert got[0, :, 0].mean() < square[0, :, 0].mean() - 0.3  # the left edge survives (red channel is x)
    # the square default is unchanged, and a random crop with buckets keeps the bucket's shape
    assert SampleDecoder(64, None)(raw)["image"].shape == (3, 64, 64)
    for crop in ("random", "random_resized"):
        augmented = SampleDecoder(64, None, buckets=tuple(buckets), augment=Augment(flip=0.5, crop=crop))(raw)
        assert augmented["image"].shape == (3, 48, 80)


@pytest.mark.parametrize("size,step", [(64, 8), (64, 16), (512, 64)])
def test_the_aspect_error_is_at_most_half_the_gap_between_buckets(size, step):
    """Any image between the tallest and the widest bucket lands in a bucket whose aspect ratio is off by at
    most half the largest gap between neighbouring buckets' (log) ratios: the step, not a square crop, bounds
    the distortion (beyond them, the extreme bucket is the nearest)."""
    buckets = make_buckets(size, step, 2.0)
    logs = sorted(math.log(w / h) for h, w in buckets)
    half_gap = max(b - a for a, b in zip(logs, logs[1:])) / 2
    for aspect in np.exp(np.linspace(logs[0], logs[-1], 41)):
        width, height = round(1000 * aspect), 1000
        h, w = nearest_bucket(width, height, buckets)
        assert abs(math.log(w / h) - math.log(width / height)) <= half_gap + 1e-9
        decoded = SampleDecoder(size, None, buckets=tuple(buckets))
        if size == 64 and step == 8:  # real decodes of a 100-px-high image: the bucket's shape
            image = Image.new("RGB", (width // 10, height // 10))
            expected = nearest_bucket(*image.size, buckets)
            assert decoded({"__key__": "k", "png": _png(image)})["image"].shape == (3, *expected)


def _png(image) -> bytes:
    import io

    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.parametrize("spec,message", [
    ("yes", "data.buckets='yes': give true"),
    ([[30, 40]], r"\[30, 40\] is not a \[height, width\] pair of positive multiples of 8"),
    ([[32, 32, 32]], "is not a"),
    ([], r"data.buckets=\[\]"),
    ([[32, 32], [32, 32]], "lists a shape twice"),
])
def test_bad_bucket_specs_name_the_key(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_buckets(spec, 32, 8)


def test_bad_bucket_geometry_names_the_key():
    with pytest.raises(ValueError, match="data.bucket_step=12: must be a positive multiple of 8"):
        parse_buckets(True, 48, 12)
    with pytest.raises(ValueError, match="data.image_size=40 is not a multiple of data.bucket_step=16"):
        parse_buckets(True, 40, 16)
    with pytest.raises(ValueError, match="data.bucket_max_ratio=0.5"):
        parse_buckets(True, 32, 8, 0.5)
    with pytest.raises(ValueError, match=r"data.buckets=true makes only the 64x64 square with data.bucket_step=64 "
                                         r"and data.bucket_max_ratio=2.0: lower the step \(e.g. 16\)"):
        parse_buckets(True, 64)
    assert parse_buckets(None, 32) is None and parse_buckets(False, 32) is None
    assert parse_buckets([[48, 32]], 32) == [(48, 32)]


# ------------------------------------------------------------------------------------ the order
def test_one_shape_per_micro_batch_and_every_sample_once(shards):
    batches = _global_batches([_loader(shards, 0, 1)], 24, accum=4)  # 4 epochs' worth of samples
    reads = [pair for batch in batches for micro in batch for pair in micro]
    assert len(reads) == len(set(reads))  # no (epoch, key) read is handed out twice
    first_epoch = sorted(k for e, k in reads if e == 0)
    assert first_epoch == [f"s{i:03d}" for i in range(N_SHARDS * PER_SHARD)]  # and none of epoch 0 is lost
    shapes = {len(micro) for batch in batches for micro in batch}
    assert shapes == {2}


def test_global_order_is_the_same_on_1_2_and_4_processes(shards):
    reference = _global_batches([_loader(shards, 0, 1)], 12, accum=4)
    flat = lambda batches: [micro for batch in batches for micro in batch]  # noqa: E731
    for world, workers in ((2, 0), (4, 0), (2, 2)):
        loaders = [_loader(shards, r, world, workers) for r in range(world)]
        got = _global_batches(loaders, 12, accum=4 // world)
        assert flat(got) == flat(reference), (world, workers)  # the same micro-batches, in the same order
    other_seed = build_global_loader(shards, decoder=EpochDecoder(SIZE, "txt", buckets=tuple(BUCKETS)),
                                     global_batch=8, micro_batch=2, rank=0, world_size=1, num_workers=0, seed=1,
                                     shuffle_buffer=4, resample=False, buckets=BUCKETS)
    assert flat(_global_batches([other_seed], 12, accum=4)) != flat(reference)


@pytest.mark.parametrize("stop", [5, 9])  # 9: samples of two epochs wait in the buffers
def test_resume_continues_the_same_sequence_on_any_process_count(shards, stop):
    augment = Augment(flip=0.5, crop="random")  # the re-decoded waiting samples draw the same crops and flips
    images, reference = [], []
    it = iter(_loader(shards, 0, 1, augment=augment))
    for _ in range(16 * 4):
        batch = next(it)
        images.append(batch["image"])
        reference.append([(m["epoch"], k) for m, k in zip(batch["meta"], batch["key"])])
    two = [_loader(shards, r, 2, augment=augment) for r in range(2)]
    head = _global_batches(two, stop, accum=2)
    assert [micro for batch in head for micro in batch] == reference[:stop * 4]
    states = json.loads(json.dumps([loader.state_dict() for loader in two]))  # JSON-friendly, as saved
    waiting = [w for state in states for lane in state["lanes"].values() for w in lane[2]]
    assert waiting  # samples sit in bucket buffers: the resume must re-read exactly these
    assert stop < 9 or len({e for e, _ in waiting}) > 1
    assert states[0]["micro_batch"] == 2 and states[0]["buckets"] == [list(b) for b in BUCKETS]
    for world, workers in ((1, 0), (2, 1), (4, 0)):
        loaders = [_loader(shards, r, world, workers, augment=augment) for r in range(world)]
        for loader in loaders:
            loader.load_state_dict(states)
        iters = [iter(loader) for loader in loaders]
        rest = []
        for _ in range((16 - stop) * 4 // world):
            for it in iters:
                batch = next(it)
                rest.append((batch["image"], [(m["epoch"], k) for m, k in zip(batch["meta"], batch["key"])]))
        assert [keys for _, keys in rest] == reference[stop * 4:], world
        assert all(torch.equal(image, images[stop * 4 + i]) for i, (image, _) in enumerate(rest)), world


def test_a_resume_with_another_micro_batch_is_refused(shards):
    one = _loader(shards, 0, 1)
    _global_batches([one], 3, accum=4)
    state = one.state_dict()
    other = _loader(shards, 0, 1, micro=4)
    with pytest.raises(DataError, match=r"resume with trainer.micro_batch_size=2"):
        other.load_state_dict([state])
    # switching buckets on or off changes the order too, even where the lane count stays the same
    square = build_global_loader(shards, decoder=SampleDecoder(SIZE), global_batch=8, micro_batch=2, rank=0,
                                 world_size=1, num_workers=0, seed=0, shuffle_buffer=4, resample=False, lanes=4)
    with pytest.raises(ValueError, match="'buckets'"):
        square.load_state_dict([state])
    with pytest.raises(ValueError, match="'buckets'"):
        _loader(shards, 0, 1).load_state_dict([square.state_dict()])


def test_bucket_lanes_need_a_shard_each(shards):
    with pytest.raises(ValueError, match="data.buckets reads 8 lanes .* but there are 6 shard"):
        _loader(shards, 0, 1, micro=1)
    with pytest.raises(ValueError, match="data.lanes=2 with data.buckets"):
        build_global_loader(shards, decoder=SampleDecoder(SIZE, buckets=tuple(BUCKETS)), global_batch=8,
                            micro_batch=2, rank=0, world_size=1, num_workers=0, seed=0, shuffle_buffer=4,
                            resample=False, lanes=2, buckets=BUCKETS)


def test_the_histogram_counts_the_samples_handed_out(shards):
    loader = _loader(shards, 0, 1)
    seen = {}
    for _, batch in zip(range(12), loader):
        shape = tuple(batch["image"].shape[-2:])
        seen[shape] = seen.get(shape, 0) + len(batch["key"])
    assert dict(loader.bucket_counts) == seen and sum(seen.values()) == 24 and len(seen) > 1


def test_cli_refuses_a_bad_bucket_spec_in_one_line(tmp_path, shards):
    proc = run([sys.executable, "train/main.py", "model=autoencoder_kl_tiny", "trainer=debug", "data=shapes",
                f"data.shards={shards[0]}", "data.image_size=32", "data.buckets=true", "data.bucket_step=12",
                "logger=none", f"run_dir={tmp_path / 'run'}"], check=False, env={**ENV, "CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == ("[ldm] config error: data.bucket_step=12: must be a positive "
                                                    "multiple of 8 (bucket sides must divide by the autoencoder's "
                                                    "downsampling factor; 64 suits f8 autoencoders with an SD-like "
                                                    "UNet)")
    assert not (tmp_path / "run").exists()


def test_latent_cache_keeps_each_images_bucket_and_trains_one_shape_per_micro_batch(shards, tiny_autoencoder,
                                                                                     tmp_path):
    """`train/cache_latents.py` with data.buckets encodes each image at its bucket (the same latent as the
    image alone), the cache records the buckets (a run without them is refused), and training from it
    fills every micro-batch with one latent shape."""
    from omegaconf import OmegaConf

    from ldm.convert import load_autoencoder
    from ldm.data.latent_cache import cache_shards, check_cache
    from ldm.data.webdataset import SkipCounter, read_shard
    from ldm.errors import CacheError
    from ldm.training.build import build_task, build_train_loader
    from ldm.training.cache_latents import build_cache
    from train.cache_latents import compose_train_config

    out = tmp_path / "cache"
    overrides = ["model=ldm_txt2img_tiny", "data=shapes", f"data.image_size={SIZE}", "debug=default",
                 f"data.shards='{','.join(shards)}'", f"data.val_shards='{shards[0]}'",
                 f"model.first_stage.ckpt={tiny_autoencoder}", f"data.latents={out}"]
    cfg = compose_train_config([*overrides, "data.buckets=true", f"data.bucket_step={STEP}"])
    manifest = build_cache(cfg, out, batch_size=5)  # batches of 5 of one shape, from a stream of mixed shapes
    assert manifest["count"] == N_SHARDS * PER_SHARD and manifest["parts"]["buckets"] == [list(b) for b in BUCKETS]
    autoencoder = load_autoencoder(tiny_autoencoder).eval()
    f = autoencoder.downsample_factor
    decoder = SampleDecoder(SIZE, "txt", buckets=tuple(BUCKETS))
    raws = {r["__key__"]: r for url in shards for r in read_shard(url, SkipCounter(0))}
    cached = [r for shard in cache_shards(out) for r in read_shard(shard, SkipCounter(0))]
    assert sorted(r["__key__"] for r in cached) == sorted(raws)
    for raw in cached[:: 7]:
        meta = json.loads(raws[raw["__key__"]]["json"])
        height, width = _bucket_of_source(meta["w"], meta["h"])
        mean = torch.from_numpy(np.load(io.BytesIO(raw["mean.npy"])))
        assert tuple(mean.shape[-2:]) == (height // f, width // f)
        image = decoder(raws[raw["__key__"]])["image"][None]
        with torch.no_grad():
            alone = autoencoder.posterior(image).mean[0]
        torch.testing.assert_close(mean, alone, atol=1e-5, rtol=1e-5)
    square = compose_train_config(overrides)
    with pytest.raises(CacheError, match=r"data.buckets is None but the cache was built with \[\[40, 24\]"):
        check_cache(square, build_task(square).task)
    loader = build_train_loader(OmegaConf.merge(cfg, {"trainer": {"batch_size": 8, "micro_batch_size": 2}}), 2, 0, 1)
    shapes = []
    for _, batch in zip(range(6), loader):
        assert len({tuple(batch["latent_mean"].shape)}) == 1 and batch["latent_mean"].shape[0] == 2
        shapes.append(tuple(batch["latent_mean"].shape[-2:]))
    assert len(set(shapes)) > 1  # several buckets were trained on
