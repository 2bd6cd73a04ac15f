"""`data.augment`: random crop / random resized crop / horizontal flip, drawn per sample from
(seed, epoch, key), so a resumed loader draws the same ones."""
import io
import random

import numpy as np
import pytest
import torch
from PIL import Image

from ldm.data.decode import Augment, SampleDecoder, random_resized_box, resize_center_crop, to_tensor
from ldm.data.shards import write_shards
from ldm.data.webdataset import build_loader

SIZE = 16


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _ramp(width: int, height: int) -> np.ndarray:
    """Every pixel distinct: red = x, green = y, so a crop's position can be read back exactly."""
    x, y = np.meshgrid(np.arange(width), np.arange(height))
    return np.stack([x * 4, y * 4, np.full_like(x, 7)], axis=-1).astype(np.uint8)


def _raw(key: str, array: np.ndarray, epoch: int = 0) -> dict:
    return {"__key__": key, "__epoch__": epoch, "png": _png(array), "txt": b"a caption"}


def test_same_key_and_epoch_same_draw_and_others_differ():
    decoder = SampleDecoder(SIZE, augment=Augment(flip=0.5, crop="random_resized"), seed=3)
    image = _ramp(40, 24)
    first = decoder(_raw("k1", image))["image"]
    assert torch.equal(first, decoder(_raw("k1", image))["image"])  # a pure function of (seed, epoch, key)
    others = [decoder(_raw(f"k{i}", image))["image"] for i in range(2, 8)]
    assert any(not torch.equal(first, o) for o in others)  # other keys draw other crops
    epochs = [decoder(_raw("k1", image, epoch=e))["image"] for e in range(1, 7)]
    assert any(not torch.equal(first, e) for e in epochs)  # a new epoch draws anew
    reseeded = SampleDecoder(SIZE, augment=Augment(flip=0.5, crop="random_resized"), seed=4)
    assert any(not torch.equal(decoder(_raw(f"k{i}", image))["image"], reseeded(_raw(f"k{i}", image))["image"])
               for i in range(6))


def test_default_changes_nothing():
    image = _ramp(40, 24)
    reference = to_tensor(resize_center_crop(Image.fromarray(image), SIZE))
    for decoder in (SampleDecoder(SIZE), SampleDecoder(SIZE, augment=Augment())):
        assert torch.equal(decoder(_raw("k", image))["image"], reference)


@pytest.mark.parametrize("p", [0.0, 0.3, 1.0])
def test_flip_probability_and_exact_mirror(p):
    image = _ramp(SIZE, SIZE)  # square: the centre crop is the whole image
    plain = to_tensor(Image.fromarray(image))
    decoder = SampleDecoder(SIZE, augment=Augment(flip=p), seed=0)
    n, flipped = 600, 0
    for i in range(n):
        out = decoder(_raw(f"key{i}", image))["image"]
        if torch.equal(out, plain.flip(-1)):
            flipped += 1
        else:
            assert torch.equal(out, plain)  # either untouched or exactly mirrored
    assert abs(flipped / n - p) < 0.06, flipped / n  # binomial sd at p=0.3, n=600: 0.019


def test_random_crop_stays_inside_and_reaches_both_ends():
    width, height = 48, SIZE  # already SIZE tall: a random crop only slides horizontally
    image = _ramp(width, height)
    decoder = SampleDecoder(SIZE, augment=Augment(crop="random"), seed=0)
    lefts = set()
    for i in range(300):
        out = decoder(_raw(f"key{i}", image))["image"]
        red = ((out[0] + 1) * 127.5).round().to(torch.int64)
        left = int(red[0, 0]) // 4
        assert 0 <= left <= width - SIZE
        expected = to_tensor(Image.fromarray(image[:, left:left + SIZE]))
        assert torch.equal(out, expected)  # an exact window of the image, nothing resampled
        lefts.add(left)
    assert {0, width - SIZE} <= lefts and len(lefts) > 20


def test_random_resized_box_bounds_scale_and_ratio():
    scale, ratio = (0.3, 0.9), (0.75, 4 / 3)
    for width, height in ((64, 64), (120, 40), (30, 90)):
        for i in range(300):
            left, top, w, h = random_resized_box(width, height, scale, ratio, random.Random(i))
            assert 0 <= left and left + w <= width and 0 <= top and top + h <= height and w > 0 and h > 0
            if (w, h) != (width, height) and i < 250:  # not a fallback: area and ratio within range (+rounding)
                assert scale[0] - 0.05 <= w * h / (width * height) <= scale[1] + 0.05
                assert ratio[0] - 0.1 <= w / h <= ratio[1] + 0.1


def test_random_resized_box_falls_back_to_a_centred_crop_within_ratio():
    class Never(random.Random):  # areas that never fit: every try misses
        def uniform(self, a, b):
            return b * 100

    assert random_resized_box(100, 20, (0.5, 1.0), (0.75, 4 / 3), Never(0)) == (36, 0, 27, 20)
    assert random_resized_box(50, 50, (0.5, 1.0), (0.75, 4 / 3), Never(0)) == (0, 0, 50, 50)


def test_bad_settings_refused():
    with pytest.raises(ValueError, match="flip"):
        Augment(flip=1.5)
    with pytest.raises(ValueError, match="crop"):
        Augment(crop="corner")
    with pytest.raises(ValueError, match="scale"):
        Augment(scale=(0.5, 2.0))


def test_loader_resume_draws_the_same_augmentation(tmp_path):
    """Through the real loader: the batches after a resume equal the uninterrupted run's, images included."""
    samples = ({"key": f"s{i:03d}", "image": _ramp(24 + i % 5, 20), "caption": f"c{i}", "meta": {}}
               for i in range(40))
    pattern = write_shards(samples, str(tmp_path), "train", max_count=10).pattern
    augment = Augment(flip=0.5, crop="random_resized")

    def loader():
        return build_loader(pattern, batch_size=4, image_size=SIZE, num_workers=2, seed=5, shuffle_buffer=8,
                            decoder=SampleDecoder(SIZE, augment=augment, seed=5))

    reference = []
    for batch in loader():
        reference.append(batch["image"])
        if len(reference) == 25:  # 2.5 epochs of 10 batches
            break
    first, stop = loader(), 13
    for n, _ in enumerate(first, 1):
        if n == stop:
            break
    resumed = loader()
    resumed.load_state_dict(first.state_dict())
    tail = []
    for batch in resumed:
        tail.append(batch["image"])
        if stop + len(tail) == len(reference):
            break
    for got, want in zip(tail, reference[stop:]):
        assert torch.equal(got, want)
    plain = build_loader(pattern, batch_size=4, image_size=SIZE, num_workers=2, seed=5, shuffle_buffer=8)
    assert not torch.equal(next(iter(plain))["image"], reference[0])  # the augmentation did something
