"""WebDataset loader + shard writer + make_shards: real shards written with webdataset.ShardWriter."""

import io
import logging
import os
import tarfile

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

import ldm.data.decode as decode_module
from ldm.data.shards import ShardSink, shard_pattern, write_shards
from ldm.data.webdataset import build_loader, expand_urls
from data.make_shards import make_shards

N_SHARDS, PER_SHARD, SIDE = 6, 8, 8


def _image(i: int, size=(SIDE, SIDE)) -> np.ndarray:
    return np.random.default_rng(i).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """6 shards x 8 samples of 8x8 RGB png; caption 'caption {i}', json {'i': i, 'label': i % 3}."""
    out = tmp_path_factory.mktemp("shards")
    samples = ({"key": f"s{i:03d}", "image": _image(i), "caption": f"caption {i}", "meta": {"i": i, "label": i % 3}}
               for i in range(N_SHARDS * PER_SHARD))
    result = write_shards(samples, str(out), "train", max_count=PER_SHARD)
    return result


def _png(array) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def bad_shards(tmp_path_factory):
    """One shard of good + bad samples (TarWriter, raw bytes), and one truncated shard."""
    out = tmp_path_factory.mktemp("bad")
    good_png = _png(_image(100))
    jpeg = io.BytesIO()
    Image.fromarray(_image(101)).save(jpeg, format="JPEG")
    cut_jpeg = jpeg.getvalue()[: len(jpeg.getvalue()) // 2]
    sixteen_bit = io.BytesIO()
    Image.fromarray(np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000).save(sixteen_bit, format="PNG")
    assert Image.open(io.BytesIO(sixteen_bit.getvalue())).mode.startswith("I")
    rows = [
        {"__key__": "good0", "png": good_png, "txt": b"good 0", "json": b'{"label": 1}'},
        {"__key__": "garbage", "jpg": b"this is not a jpeg", "txt": b"x", "json": b'{"label": 1}'},
        {"__key__": "cutjpeg", "jpg": cut_jpeg, "txt": b"x", "json": b'{"label": 1}'},
        {"__key__": "nocaption", "png": good_png, "json": b'{"label": 1}'},
        {"__key__": "sixteen", "png": sixteen_bit.getvalue(), "txt": b"x", "json": b'{"label": 1}'},
        {"__key__": "noimage", "txt": b"only text", "json": b'{"label": 1}'},
        {"__key__": "nolabel", "png": good_png, "txt": b"x", "json": b'{"other": 1}'},
        {"__key__": "good1", "png": good_png, "txt": b"good 1", "json": b'{"label": 2}'},
    ]
    with wds.TarWriter(str(out / "bad-000000.tar"), encoder=False) as writer:
        for row in rows:
            writer.write(row)
    with wds.TarWriter(str(out / "bad-000001.tar"), encoder=False) as writer:
        for i in range(6):
            writer.write({"__key__": f"trunc{i}", "png": _png(_image(200 + i)), "txt": b"t", "json": b'{"label": 0}'})
    path = out / "bad-000001.tar"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # cut mid-archive
    return str(out / "bad-{000000..000001}.tar")


def _keys(loader, limit=None):
    keys = []
    for n, batch in enumerate(loader):
        if limit is not None and n == limit:
            break
        keys.extend(batch["key"])
    return keys


def test_batch_contract_and_pixels(shards):
    loader = build_loader(shards.pattern, batch_size=5, image_size=SIDE, num_workers=0, epochs=1,
                          label_field="label")
    batches = list(loader)
    batch = batches[0]
    assert set(batch) == {"image", "caption", "meta", "key", "label"}
    assert batch["image"].dtype == torch.float32 and batch["image"].shape == (5, 3, SIDE, SIDE)
    assert batch["label"].dtype == torch.long
    keys = [k for b in batches for k in b["key"]]
    assert sorted(keys) == [f"s{i:03d}" for i in range(48)]  # eval: every sample once, last partial kept
    assert [len(b["key"]) for b in batches][-1] == 48 % 5
    for b in batches:
        for j, meta in enumerate(b["meta"]):
            i = meta["i"]
            assert b["caption"][j] == f"caption {i}" and b["key"][j] == f"s{i:03d}" and b["label"][j] == i % 3
            # no resize at SIDE: the tensor is exactly the stored pixels mapped to [-1, 1]
            expected = torch.from_numpy(_image(i)).permute(2, 0, 1).double() / 127.5 - 1
            torch.testing.assert_close(b["image"][j].double(), expected, atol=1e-6, rtol=0)


def test_resize_and_center_crop_matches_reference(tmp_path):
    wide = np.zeros((20, 40, 3), dtype=np.uint8)
    wide[:, 10:30] = 255  # a white centre band exactly the width of the centre crop after resizing to 10x20
    write_shards([{"key": "wide", "image": wide, "caption": "w"}], str(tmp_path), "x")
    batch = next(iter(build_loader(str(tmp_path / "x-000000.tar"), batch_size=1, image_size=10, num_workers=0,
                                   epochs=1)))
    image = batch["image"][0]
    assert image.shape == (3, 10, 10)
    assert image[:, :, 1:-1].min() > 0.9  # the crop is the centre band: white, edges aside (bicubic ringing)


def test_color_modes_convert_to_rgb(tmp_path):
    gray = Image.fromarray(np.full((4, 4), 77, np.uint8), "L")
    transparent = Image.new("RGBA", (4, 4), (10, 20, 30, 0))  # fully transparent -> white
    palette = Image.new("P", (4, 4), 3)
    palette.putpalette([0, 0, 0] * 3 + [200, 100, 50] + [0, 0, 0] * 252)
    cmyk = Image.new("CMYK", (4, 4), (0, 255, 255, 0))  # pure red
    sink = ShardSink(str(tmp_path), "modes", image_format="png")
    for key, image in (("gray", gray), ("transparent", transparent), ("palette", palette)):
        sink.write(key, image, "c")
    sink.close()
    buffer = io.BytesIO()
    cmyk.save(buffer, format="JPEG", quality=100)
    with wds.TarWriter(str(tmp_path / "modes-000001.tar"), encoder=False) as writer:
        writer.write({"__key__": "cmykjpeg", "jpg": buffer.getvalue(), "txt": b"c"})
    batches = list(build_loader(str(tmp_path / "modes-*.tar"), batch_size=10, image_size=4, num_workers=0, epochs=1))
    pixels = {k: ((img[:, 0, 0] + 1) * 127.5).round().tolist() for b in batches for k, img in zip(b["key"], b["image"])}
    assert pixels["gray"] == [77, 77, 77]
    assert pixels["transparent"] == [255, 255, 255]
    assert pixels["palette"] == [200, 100, 50]
    assert pixels["cmykjpeg"][0] > 240 and max(pixels["cmykjpeg"][1:]) < 15


def test_url_forms_brace_glob_list_comma(shards, tmp_path):
    directory = os.path.dirname(shards.files[0])
    assert shards.pattern == f"{directory}/train-{{000000..000005}}.tar"
    expected = shards.files
    assert expand_urls(shards.pattern) == expected
    assert expand_urls(f"{directory}/train-*.tar") == expected
    assert expand_urls(list(expected)) == expected
    assert expand_urls(",".join(expected)) == expected
    assert expand_urls("pipe:cat x-{0..2}.tar") == ["pipe:cat x-0.tar", "pipe:cat x-1.tar", "pipe:cat x-2.tar"]
    glob_keys = _keys(build_loader(f"{directory}/train-*.tar", batch_size=4, image_size=SIDE, num_workers=0, epochs=1))
    assert sorted(glob_keys) == [f"s{i:03d}" for i in range(48)]


def test_missing_shards_raise(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing-here"):
        build_loader(str(tmp_path / "nothing-here-{000000..000003}.tar"), batch_size=1, image_size=8)
    with pytest.raises(FileNotFoundError, match=r"nothing-\*"):
        build_loader(str(tmp_path / "nothing-*.tar"), batch_size=1, image_size=8)


def test_rank_split_disjoint_and_complete(shards):
    per_rank = [set(_keys(build_loader(shards.pattern, batch_size=4, image_size=SIDE, rank=rank, world_size=2,
                                       num_workers=workers, epochs=1, shuffle=True, seed=3)))
                for rank, workers in ((0, 2), (1, 0))]
    assert per_rank[0].isdisjoint(per_rank[1])
    assert per_rank[0] | per_rank[1] == {f"s{i:03d}" for i in range(48)}
    assert len(per_rank[0]) == len(per_rank[1]) == 24


def test_more_ranks_than_shards_is_an_error_unless_resampled(shards):
    with pytest.raises(ValueError, match=r"6 shard\(s\) for world_size 7"):
        build_loader(shards.pattern, batch_size=2, image_size=SIDE, rank=0, world_size=7)
    loader = build_loader(shards.pattern, batch_size=4, image_size=SIDE, rank=6, world_size=7, num_workers=0,
                          resample=True, epochs=3)
    keys = _keys(loader)
    assert len(keys) >= 3 * 4 and set(keys) <= {f"s{i:03d}" for i in range(48)}


def test_bad_samples_skipped_and_counted(bad_shards, caplog):
    caplog.set_level(logging.WARNING, logger="ldm.data.webdataset")
    loader = build_loader(bad_shards, batch_size=2, image_size=SIDE, num_workers=0, epochs=1, label_field="label")
    keys = _keys(loader)
    assert loader.skipped == {"decode_error": 2, "missing_image": 1, "missing_caption": 1, "bad_mode": 1,
                              "missing_label": 1, "shard_error": 1, "checksum_error": 0}
    assert {"good0", "good1"} <= set(keys) and not {"garbage", "cutjpeg", "nocaption", "sixteen", "noimage",
                                                    "nolabel"} & set(keys)
    assert any(k.startswith("trunc") for k in keys)  # samples before the cut still arrive
    assert len(keys) == len(set(keys))
    assert any("bad-000000.tar" in r.getMessage() and "sixteen" in r.getMessage() and "bad_mode" in r.getMessage()
               for r in caplog.records)
    assert any("shard_error" in r.getMessage() and "bad-000001.tar" in r.getMessage() for r in caplog.records)
    # the same counts when two worker processes each see one shard (aggregated from the batches' counters)
    loader2 = build_loader(bad_shards, batch_size=2, image_size=SIDE, num_workers=2, epochs=1, label_field="label")
    assert sorted(_keys(loader2)) == sorted(keys) and loader2.skipped == loader.skipped


def _train_loader(urls, workers, seed=0, resample=False):
    return build_loader(urls, batch_size=3, image_size=SIDE, num_workers=workers, seed=seed, shuffle_buffer=10,
                        resample=resample)


@pytest.mark.parametrize("workers,stop,resample", [(2, 7, False), (2, 18, False), (0, 11, False), (2, 13, True),
                                                    (2, 14, False)])
def test_exact_resume(shards, bad_shards, workers, stop, resample):
    urls = f"{shards.pattern},{bad_shards.split(',')[0]}"  # 7 shards, 7 bad samples among 56: raw != batches
    total = 40  # ~2.3 epochs of 17 batches
    reference, uninterrupted = [], _train_loader(urls, workers, resample=resample)
    for batch in uninterrupted:
        reference.append((batch["key"], batch["image"]))
        if len(reference) == total:
            break
    first = _train_loader(urls, workers, resample=resample)
    head = []
    for batch in first:
        head.append(batch["key"])
        if len(head) == stop:
            break
    state = first.state_dict()
    resumed = _train_loader(urls, workers, resample=resample)
    resumed.load_state_dict(state)
    tail = []
    for batch in resumed:
        tail.append((batch["key"], batch["image"]))
        if len(head) + len(tail) == total:
            break
    assert head + [k for k, _ in tail] == [k for k, _ in reference]
    torch.testing.assert_close(tail[0][1], reference[stop][1])
    assert resumed.state_dict() == uninterrupted.state_dict()  # same position, same skip counts
    assert resumed.state_dict()["epoch"] >= 1


def test_resume_fast_forward_does_not_decode(shards, monkeypatch):
    first = _train_loader(shards.pattern, 0)
    for n, _ in enumerate(first):
        if n == 9:
            break
    state = first.state_dict()
    calls = []
    original = decode_module.load_rgb
    monkeypatch.setattr(decode_module, "load_rgb", lambda data: calls.append(1) or original(data))
    resumed = _train_loader(shards.pattern, 0)
    resumed.load_state_dict(state)
    next(iter(resumed))
    assert len(calls) == 3  # one batch decoded, the 30 consumed samples skipped undecoded


def test_state_layout_mismatch(shards):
    state = _train_loader(shards.pattern, 2).state_dict()
    with pytest.raises(ValueError, match="num_workers"):
        _train_loader(shards.pattern, 0).load_state_dict(state)
    loose = _train_loader(shards.pattern, 0)
    loose.load_state_dict({**state, "epoch": 4}, strict=False)
    assert loose.state_dict()["epoch"] == 4 and loose.state_dict()["consumed"] == [0]


def test_determinism_by_seed_and_epochs_differ(shards):
    a = _keys(_train_loader(shards.pattern, 2, seed=1), limit=32)
    b = _keys(_train_loader(shards.pattern, 2, seed=1), limit=32)
    c = _keys(_train_loader(shards.pattern, 2, seed=2), limit=32)
    assert a == b and a != c
    assert a[:48] != sorted(a[:48])  # shuffled
    assert sorted(a[:48]) == [f"s{i:03d}" for i in range(48)]  # one epoch = every sample once (48 = 16x3)
    assert len(a) == 96 and a[:48] != a[48:] and sorted(a[48:]) == sorted(a[:48])  # epoch 2: new order


def test_finite_pass_then_next_epoch(shards):
    loader = build_loader(shards.pattern, batch_size=4, image_size=SIDE, num_workers=2, epochs=1)
    first, second = _keys(loader), _keys(loader)
    assert first == second and len(first) == 48  # unshuffled eval: identical passes
    assert loader.state_dict()["epoch"] == 2


def test_shard_sink_counts_keys_and_bytes(tmp_path):
    jpeg = io.BytesIO()
    Image.fromarray(_image(1)).save(jpeg, format="JPEG")
    with ShardSink(str(tmp_path), "val", max_count=10) as sink:
        for i in range(25):
            sink.write(f"k{i}", jpeg.getvalue() if i == 0 else _image(i), f"c{i}", {"i": i})
        with pytest.raises(ValueError, match="no '.'"):
            sink.write("bad.key", _image(0))
    result = sink.close()
    assert result.count == 25 and result.pattern == f"{tmp_path}/val-{{000000..000002}}.tar"
    members = [tarfile.open(f).getnames() for f in result.files]
    assert [len(m) // 3 for m in members] == [10, 10, 5]
    assert members[0][:3] == ["k0.jpg", "k0.json", "k0.txt"]
    assert tarfile.open(result.files[0]).extractfile("k0.jpg").read() == jpeg.getvalue()  # stored unchanged
    again = write_shards(({"key": f"k{i}", "image": _image(i)} for i in range(3)), str(tmp_path / "a"), "x")
    again2 = write_shards(({"key": f"k{i}", "image": _image(i)} for i in range(3)), str(tmp_path / "b"), "x")
    assert open(again.files[0], "rb").read() == open(again2.files[0], "rb").read()  # reproducible bytes
    assert shard_pattern(["/d/a-000003.tar", "/d/a-000004.tar"]) == "/d/a-{000003..000004}.tar"


def test_make_shards_folder(tmp_path):
    folder = tmp_path / "images"
    (folder / "sub").mkdir(parents=True)
    Image.fromarray(_image(1, (12, 10))).save(folder / "cat.jpg")
    (folder / "cat.txt").write_text("a cat\n")
    Image.fromarray(_image(2)).save(folder / "sub" / "dog.png")
    (folder / "sub" / "dog.txt").write_text("a dog")
    Image.fromarray(_image(3)).save(folder / "bird.bmp")  # re-encoded as png, no caption
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff not really")
    report = make_shards(str(folder), str(tmp_path / "out"), max_count=2)
    assert report["written"] == 3 and report["without_caption"] == 1
    assert [path for path, _ in report["unreadable"]] == ["broken.jpg"]
    loader = build_loader(report["train"], batch_size=8, image_size=SIDE, num_workers=0, epochs=1)
    batch = next(iter(loader))
    assert dict(zip(batch["key"], batch["caption"])) == {"cat": "a cat", "sub_dog": "a dog"}
    assert loader.skipped["missing_caption"] == 1
    table = tmp_path / "captions.csv"
    table.write_text("filename,caption\ncat.jpg,from csv\nsub/dog.png,dog from csv\nbird.bmp,a bird\n")
    report = make_shards(str(folder), str(tmp_path / "out_csv"), captions=str(table))
    batch = next(iter(build_loader(report["train"], batch_size=8, image_size=SIDE, num_workers=0, epochs=1)))
    assert dict(zip(batch["key"], batch["caption"])) == {"cat": "from csv", "sub_dog": "dog from csv", "bird": "a bird"}


# ------------------------------------------------------------------------------- the global sample order
def _global(urls, rank, world, workers, global_batch=6, seed=0, **kw):
    from ldm.data.decode import SampleDecoder
    from ldm.data.order import build_global_loader

    return build_global_loader(expand_urls(urls), decoder=SampleDecoder(SIDE, "txt", "label"),
                               global_batch=global_batch, micro_batch=global_batch // world // kw.pop("accum", 1),
                               rank=rank, world_size=world, num_workers=workers, seed=seed, shuffle_buffer=10,
                               resample=False, **kw)


def _global_batches(loaders, steps, accum=1):
    """Global batches: each rank's micro-batches of a step, in the loop's order (micro a of rank r = a*W+r)."""
    iters = [iter(loader) for loader in loaders]
    batches = []
    for _ in range(steps):
        micro = [[next(it)["key"] for it in iters] for _ in range(accum)]
        batches.append([k for per_rank in micro for keys in per_rank for k in keys])
    return batches


def test_global_order_is_the_same_for_any_process_and_worker_count(shards, bad_shards):
    urls = [*shards.files, bad_shards.split(",")[0]]  # 7 shards, bad samples among them
    reference = _global_batches([_global(urls, 0, 1, 0)], 20)
    for world, workers, accum in ((2, 2, 1), (3, 0, 1), (2, 1, 3), (1, 3, 2)):
        loaders = [_global(urls, r, world, workers, accum=accum) for r in range(world)]
        got = _global_batches(loaders, 20, accum)
        assert [sorted(b) for b in got] == [sorted(b) for b in reference], (world, workers, accum)
    assert reference != _global_batches([_global(urls, 0, 1, 0, seed=1)], 20)


def test_global_position_resumes_on_another_process_count(shards):
    reference = _global_batches([_global(shards.pattern, 0, 1, 1)], 14)
    epoch = sorted(k for b in reference[:8] for k in b)  # 6 equal lanes of 8: 8 batches are one epoch
    assert epoch == [f"s{i:03d}" for i in range(48)]
    two = [_global(shards.pattern, r, 2, 1) for r in range(2)]
    head = _global_batches(two, 5)
    states = [loader.state_dict() for loader in two]
    assert states[0]["batch"] == 5 and set(states[0]["lanes"]).isdisjoint(states[1]["lanes"])  # each its lanes
    for world in (1, 3, 6):
        loaders = [_global(shards.pattern, r, world, 2) for r in range(world)]
        for loader in loaders:
            loader.load_state_dict(states)
        assert head + _global_batches(loaders, 9) == reference, world
    changed = _global(shards.pattern, 0, 1, 0, lanes=3)
    with pytest.raises(ValueError, match="lane_count"):
        changed.load_state_dict(states)


def test_global_order_validates_lanes(shards):
    with pytest.raises(ValueError, match="data.lanes=7 must be between 1 and the global batch"):
        _global(shards.pattern, 0, 1, 0, lanes=7)
    with pytest.raises(ValueError, match=r"data.lanes=6 > 5 shard"):
        _global(shards.files[:5], 0, 1, 0, lanes=6)


def test_per_sample_draws_do_not_depend_on_the_batch_split():
    from ldm.diffusion import draws

    seeds = [draws.sample_seed(0, i) for i in range(6)]
    with draws.per_sample(seeds):
        whole = (draws.randn((6, 2, 3)), draws.randint(0, 1000, (6,)), draws.rand((6,)))
    parts = []
    for chunk in (seeds[:2], seeds[2:3], seeds[3:]):
        with draws.per_sample(chunk):
            parts.append((draws.randn((len(chunk), 2, 3)), draws.randint(0, 1000, (len(chunk),)),
                          draws.rand((len(chunk),))))
    for i, tensor in enumerate(whole):
        assert torch.equal(tensor, torch.cat([p[i] for p in parts]))
    assert not torch.equal(whole[0][0], whole[0][1])  # rows differ
    torch.manual_seed(3)
    outside = draws.randn((6, 2, 3))
    torch.manual_seed(3)
    assert torch.equal(outside, torch.randn(6, 2, 3))  # outside per_sample: the global RNG, as before
