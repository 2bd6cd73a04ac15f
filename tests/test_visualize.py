"""ldm/visualize.py: tiles upscaled nearest-neighbour to >= 128 px, captions wrapped inside their tile."""
import numpy as np
import pytest
import torch
from PIL import ImageFont

from ldm.visualize import PAD, caption_font, captioned_grid, side_by_side, to_uint8, wrap

LONG = "a magenta triangle at the bottom on a gray background, drawn with a supercalifragilistic outline"


def test_tiles_are_exact_nearest_neighbour_upscales():
    torch.manual_seed(0)
    x = torch.rand(3, 3, 32, 32) * 2 - 1
    grid = np.asarray(captioned_grid(x, None, nrow=3))
    assert grid.shape == (PAD + 128 + PAD, PAD + 3 * (128 + PAD), 3)  # no captions: no text rows
    pixels = to_uint8(x)
    for i in range(3):
        tile = grid[PAD:PAD + 128, PAD + i * (128 + PAD):PAD + i * (128 + PAD) + 128]
        assert np.array_equal(tile, pixels[i].repeat(4, axis=0).repeat(4, axis=1))  # 4x4 blocks, no blur
    for size, scale in ((64, 2), (100, 2), (256, 1)):  # integer factors only, never below 128 px
        assert captioned_grid(torch.zeros(1, 3, size, size)).size[0] == size * scale + 2 * PAD


def test_captions_are_printed_under_their_tile_and_stay_inside_it():
    x = torch.ones(4, 3, 32, 32)  # white tiles: every dark pixel is text
    grid = np.asarray(captioned_grid(x, [LONG, "", "red", LONG], nrow=4).convert("L"))
    text = grid[PAD + 128:]
    assert text.shape[0] > 3 * 11  # the long caption wrapped over several lines of a >= 11 px font
    cols = [text[:, PAD + i * (128 + PAD):PAD + i * (128 + PAD) + 128] for i in range(4)]
    ink = [(c < 128).sum() for c in cols]
    assert ink[1] == 0 and 0 < ink[2] < ink[0] == ink[3]
    for i in range(5):  # the gaps between tiles stay white: no caption runs into its neighbour
        gap = text[:, i * (128 + PAD):i * (128 + PAD) + PAD]
        assert (gap > 250).all()


@pytest.mark.parametrize("font", [caption_font(12), ImageFont.load_default(size=12)], ids=["dejavu", "pillow"])
def test_wrap_fits_width_breaks_long_words_and_caps_lines(font):
    lines = wrap(LONG, font, 126)
    assert all(font.getlength(line) <= 126 for line in lines)
    assert len(lines) == 4 and lines[-1].endswith("…")
    assert wrap("a red circle", font, 126) == ["a red circle"]
    assert "".join(wrap("x" * 60, font, 50, max_lines=99)) == "x" * 60
    assert wrap("wide", font, 1, max_lines=9) == ["w", "i", "d", "e"]  # narrower than a letter: one per line


def test_caption_font_prints_accents_not_boxes():
    font = caption_font(16)  # a file inside the matplotlib package: the same on every node
    assert "DejaVu" in font.getname()[0]
    missing = font.getmask("\uffff").getbbox()  # the font's box for a character it lacks
    assert all(font.getmask(ch).getbbox() != missing for ch in "éßøΩж")


def test_pairs_and_bad_input():
    a, b = torch.zeros(2, 3, 8, 8), torch.ones(2, 3, 8, 8)
    pairs = side_by_side(a, b)
    assert [float(p.mean()) for p in pairs] == [0, 1, 0, 1]
    grid = captioned_grid(pairs, ["input", "output"] * 2, group=2)
    assert grid.size[0] == PAD + 4 * (128 + PAD) + 12  # a wider gap between the two pairs
    with pytest.raises(ValueError, match="4 images but 3 captions"):
        captioned_grid(pairs, ["a"] * 3)
    with pytest.raises(ValueError, match=r"must be \(N, 1\|3, H, W\)"):
        captioned_grid(torch.zeros(3, 8, 8))
    with pytest.raises(ValueError, match="no images"):
        captioned_grid(torch.zeros(0, 3, 8, 8), [])
    with pytest.raises(ValueError, match="differ in shape"):
        side_by_side(a, torch.zeros(3, 3, 8, 8))


def test_stage2_captions_name_each_samples_condition():
    from types import SimpleNamespace

    from ldm.modules.encoders import ClassEmbedder, Composite, LowResConcat, Unconditional
    from ldm.tasks.latent_diffusion import LatentDiffusionTask

    def captions(conditioner, batch):  # the method reads only self.conditioner
        return LatentDiffusionTask.condition_captions(SimpleNamespace(conditioner=conditioner), batch)

    batch = {"caption": ["a red circle", "a blue square"], "label": torch.tensor([3, 7]),
             "image": torch.zeros(2, 3, 8, 8)}
    assert captions(ClassEmbedder(10, 8), batch) == ["class 3", "class 7"]
    assert captions(Unconditional(), batch) is None  # an unconditional sample is not labelled with a prompt
    assert captions(Composite({"y": ClassEmbedder(10, 8), "lr": LowResConcat()}), batch) == ["class 3", "class 7"]
