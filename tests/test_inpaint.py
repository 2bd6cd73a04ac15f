"""Inpainting (paper §4.5): random masks, the masked-image conditioner's layout, and end to end: train the
tiny preset a few steps on the shapes shards, inpaint with `train/sample.py image=… mask=…`, and check the
region outside the mask is kept."""
import runpy
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from PIL import Image

from ldm.config import register_configs
from ldm.data.masks import masked_image, masks_for_keys, random_mask

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
register_configs()


def test_masks_are_deterministic_per_key_and_seed_and_mix_boxes_and_strokes():
    keys = [f"{i:06d}" for i in range(32)]
    a, b = masks_for_keys(keys, 32, seed=0), masks_for_keys(list(reversed(keys)), 32, seed=0).flip(0)
    assert a.shape == (32, 1, 32, 32) and set(a.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(a, b)  # a key's mask does not depend on its batch neighbours
    assert not torch.equal(a, masks_for_keys(keys, 32, seed=1))
    coverage = a.mean(dim=(1, 2, 3))
    assert (coverage > 0).all() and (coverage <= 0.75).all() and len(set(coverage.tolist())) > 16
    rng = np.random.default_rng(0)
    boxes = random_mask(64, rng, kinds=("box",))
    rows, cols = boxes[0].nonzero().T  # one or more axis-aligned rectangles: every row segment is filled
    assert boxes.sum() > 0 and len(rows) == len(cols)
    with pytest.raises(ValueError, match="kinds"):
        random_mask(32, rng, kinds=("blob",))
    image = torch.ones(1, 3, 4, 4)
    mask = torch.zeros(1, 1, 4, 4)
    mask[..., :2, :] = 1
    assert masked_image(image, mask)[..., :2, :].abs().sum() == 0 and masked_image(image, mask)[..., 2:, :].eq(1).all()


def test_masked_image_conditioner_layout():
    from ldm.models.autoencoder import AutoencoderKL
    from ldm.modules.encoders import MaskedImageConcat

    ae = AutoencoderKL(embed_dim=3, ch=16, ch_mult=[1, 2], num_res_blocks=1, z_channels=3, norm_groups=8).eval()
    image = torch.rand(2, 3, 16, 16) * 2 - 1
    mask = torch.zeros(2, 1, 16, 16)
    mask[:, :, 4:12, 4:12] = 1
    sd, ldm = MaskedImageConcat(ae), MaskedImageConcat(ae, mask_first=False)
    assert sd.concat_channels == 4 and list(sd.state_dict()) == []  # 2c+1 with c=3; the AE is not its weight
    out = sd({"image": image, "mask": mask}, latent_size=(8, 8))["concat"]
    z = ae.encode_latent(masked_image(image, mask), sample=False) * ae.scale_factor
    assert out.shape == (2, 4, 8, 8)
    torch.testing.assert_close(out[:, :1], mask[:, :, ::2, ::2])
    torch.testing.assert_close(out[:, 1:], z)
    torch.testing.assert_close(ldm({"image": image, "mask": mask}, latent_size=(8, 8))["concat"],
                               torch.cat([z, mask[:, :, ::2, ::2]], 1))
    dropped = sd({"image": image, "mask": mask}, torch.tensor([True, False]), latent_size=(8, 8))["concat"]
    assert dropped[0].abs().sum() == 0 and torch.equal(dropped[1], out[1])
    drawn = sd({"image": image, "key": ["a", "b"]}, latent_size=(8, 8))["concat"][:, :1]
    torch.testing.assert_close(drawn, masks_for_keys(["a", "b"], 16, 0)[:, :, ::2, ::2])
    with pytest.raises(ValueError, match=r"batch\['mask'\] must be"):
        sd({"image": image, "mask": mask[:, :, :8]}, latent_size=(8, 8))


@pytest.mark.slow
def test_inpainting_trains_samples_and_keeps_the_unmasked_region(shapes_shards, tmp_path, monkeypatch):
    from ldm.training.loop import train
    from ldm.training.runs import load_run

    def cfg(*overrides):
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            return compose("train", overrides=["data=shapes", f"data.shards='{shapes_shards['train']}'",
                                               f"data.val_shards='{shapes_shards['val']}'", "data.image_size=32",
                                               "data.num_workers=0", "data.shuffle_buffer=16", "trainer=debug",
                                               "logger=none", *overrides])

    ae_dir, run_dir = tmp_path / "ae", tmp_path / "inpaint"
    train(cfg("model=autoencoder_kl_tiny", "trainer.max_steps=2", f"run_dir={ae_dir}",
              "++model.task.loss.perceptual_weight=0"))
    train(cfg("model=ldm_inpaint_tiny", f"model.first_stage.ckpt={ae_dir / 'autoencoder.safetensors'}",
              "trainer.max_steps=3", f"run_dir={run_dir}"))
    assert list((run_dir / "images").glob("masked_*.png"))  # the training grids show the masked inputs
    _, task, _ = load_run(run_dir)
    assert task.unet.input_blocks[0][0].in_channels == 2 * 4 + 1

    from data.shapes import generate
    image_pil = next(iter(generate(1, size=32, seed=7)))[0]
    image_pil.save(tmp_path / "image.png")
    mask = np.zeros((32, 32), np.uint8)
    mask[8:20, 12:24] = 255  # the box to inpaint
    Image.fromarray(mask).save(tmp_path / "mask.png")
    from ldm.tasks.latent_diffusion import LatentDiffusionTask

    latents = []  # what the sampler returned, before decoding
    decode = LatentDiffusionTask.decode
    monkeypatch.setattr(LatentDiffusionTask, "decode", lambda self, z: latents.append(z) or decode(self, z))

    def sample_cli(out, *extra):
        monkeypatch.setattr(sys, "argv", ["sample.py", f"run_dir={run_dir}", f"image={tmp_path / 'image.png'}",
                                          f"mask={tmp_path / 'mask.png'}", f"out_dir={out}", "progress=false", *extra])
        runpy.run_path(str(ROOT / "train/sample.py"), run_name="__main__")  # the command, in this process
        files = sorted(out.glob("0*.png"))
        assert (out / "grid.png").is_file()
        return torch.stack([torch.from_numpy(np.asarray(Image.open(f), np.float32) / 127.5 - 1).permute(2, 0, 1)
                            for f in files])

    inpainted = sample_cli(tmp_path / "out", "repeats=2")
    assert len(inpainted) == 2
    image = torch.from_numpy(np.asarray(image_pil, np.float32) / 127.5 - 1).permute(2, 0, 1)[None]
    z_known = task.encode_fp32(image)
    keep = torch.ones(8, 8, dtype=torch.bool)  # latent cells (f=4) with no masked pixel
    keep[8 // 4:(20 + 3) // 4, 12 // 4:(24 + 3) // 4] = False
    z = latents[-1]
    assert z.shape == (2, 4, 8, 8)
    kept_error = (z - z_known).abs()[..., keep].max()
    assert kept_error < 1e-4, kept_error  # the known latent (up to batched-conv rounding), pinned
    assert (z - z_known).abs()[..., ~keep].mean() > 0.1  # the hole was generated, not copied
    # without anything to keep (mask everywhere) the same model lands far from the known latent there
    from ldm.inference import generate as sample_images
    sample_images(task, [{}], latent_size=(8, 8), batch_size=1, seed=0, image=image, mask=torch.ones(1, 1, 32, 32))
    assert (latents[-1] - z_known).abs()[..., keep].mean() > 0.1
    # paste=true: the pixels outside the mask are the input's (up to PNG rounding)
    pasted = sample_cli(tmp_path / "pasted", "paste=true")
    outside = torch.from_numpy(mask == 0)
    assert (pasted - image).abs()[..., outside].max() < 1e-5
    assert (pasted - image).abs()[..., ~outside].mean() > 0.05
