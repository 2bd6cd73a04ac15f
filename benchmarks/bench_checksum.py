"""What verifying a file costs next to reading it: the tensor CRC-32 of ldm.data.integrity at SD-v1 size
(the 860M-parameter UNet, the 83.6M KL-f8 VAE), and the per-sample member check of the latent cache.

    python benchmarks/bench_checksum.py [--dtype float32|float16] [--repeats 3] [--dir /tmp]

Random weights (built on the meta device, then materialised), one safetensors file each; then, interleaved,
the read as the loaders do it (`load_file`, memory-mapped, then `load_state_dict` into a built model), page
cache warm, with and without `tensors_checksum` of what was read; and the whole `ldm.convert.load_unet` /
`load_autoencoder` (architecture from the shapes, model built and initialised, weights read) of the file
written with and without the checksum. Medians. BENCHMARKS.md has the results.
"""
import argparse
import os
import statistics
import tempfile
import time

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ldm.convert import load_autoencoder, load_unet
from ldm.data.integrity import member_mismatches, member_sums, tensors_checksum, with_checksum
from ldm.data.latent_cache import LatentSampleDecoder, npy_bytes


def sd_v1_unet():
    from ldm.models.unet import UNetModel

    return UNetModel(in_channels=4, out_channels=4, model_channels=320, num_res_blocks=2,
                     attention_resolutions=[1, 2, 4], channel_mult=[1, 2, 4, 4], num_heads=8, context_dim=768)


def kl_f8_vae():
    from ldm.models.autoencoder import AutoencoderKL

    return AutoencoderKL(embed_dim=4, ch=128, ch_mult=[1, 2, 4, 4], num_res_blocks=2, z_channels=4)


def materialised(build, dtype) -> dict[str, torch.Tensor]:
    with torch.device("meta"):
        model = build()
    state = {}
    g = torch.Generator().manual_seed(0)
    for name, t in model.state_dict().items():
        state[name] = torch.randn(t.shape, generator=g).to(dtype)
    return state


def timed(fn, repeats):
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def weights_row(name, build, loader, dtype, repeats, directory):
    state = materialised(build, dtype)
    params = sum(t.numel() for t in state.values())
    plain_path, checked_path = (os.path.join(directory, f"{name}-{kind}.safetensors") for kind in ("plain", "crc"))
    save_s, _ = timed(lambda: save_file(state, plain_path, metadata={"format": "pt"}), 1)
    sum_s, metadata = timed(lambda: with_checksum(state, {"format": "pt"}), 1)
    save_file(state, checked_path, metadata=metadata)
    state.clear()  # only the files are read from here on
    size = os.path.getsize(plain_path)
    with torch.device("meta"):
        model = build()
    model = model.to_empty(device="cpu").to(dtype)  # the target, as a loader has it: built, not initialised

    def load(verify):
        loaded = load_file(plain_path)  # memory-mapped: the bytes are read by whatever touches them first
        if verify:
            tensors_checksum(loaded)
        model.load_state_dict(loaded, strict=False)

    load(False)  # warm the page cache
    plain, verified, end_plain, end_verified = [], [], [], []
    for _ in range(repeats):  # interleaved, so a change of machine load hits both
        plain.append(timed(lambda: load(False), 1)[0])
        verified.append(timed(lambda: load(True), 1)[0])
        end_plain.append(timed(lambda: loader(plain_path), 1)[0])
        end_verified.append(timed(lambda: loader(checked_path), 1)[0])
    plain_s, verified_s = statistics.median(plain), statistics.median(verified)
    end_s, end_verified_s = statistics.median(end_plain), statistics.median(end_verified)
    print(f"| {name} {str(dtype).removeprefix('torch.')} | {params / 1e6:.1f} M | {size / 2**30:.2f} GiB | "
          f"{save_s:.2f} s | +{sum_s:.2f} s | {plain_s:.2f} s | +{verified_s - plain_s:.2f} s "
          f"(+{100 * (verified_s - plain_s) / plain_s:.0f} %) | {end_s:.1f} s | +{end_verified_s - end_s:.1f} s "
          f"(+{100 * (end_verified_s - end_s) / end_s:.0f} %) |", flush=True)


def cache_row(repeats):
    """One SD-size cached sample: 4x64x64 mean + logvar, 77x768 CLIP context, a caption."""
    rng = np.random.default_rng(0)
    sample = {"__key__": "k", "txt": b"a photo of a cat " * 4,
              "mean.npy": npy_bytes(rng.standard_normal((4, 64, 64))),
              "logvar.npy": npy_bytes(rng.standard_normal((4, 64, 64))),
              "context.npy": npy_bytes(rng.standard_normal((77, 768)))}
    sample["crc32.json"] = member_sums(sample)
    decoder = LatentSampleDecoder(512, "txt", None)
    n = 2000
    check_s, _ = timed(lambda: [member_mismatches(sample) for _ in range(n)], repeats)
    decode_s, _ = timed(lambda: [decoder(sample) for _ in range(n)], repeats)
    size = sum(len(v) for k, v in sample.items() if not k.startswith("__"))
    print(f"| latent-cache sample (SD: 2 x 4x64x64 + 77x768, {size / 1024:.0f} KiB) | check {1e6 * check_s / n:.0f} us "
          f"of a {1e6 * decode_s / n:.0f} us decode (+ check) | {100 * check_s / decode_s:.0f} % |")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", default=tempfile.gettempdir())
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    print("| file | params | size | save | CRC at save | read into a built model (warm cache) | verify adds | "
          "ldm.convert load (builds the model) | verify adds |")
    print("|---|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory(dir=args.dir) as directory:
        weights_row("KL-f8 VAE", kl_f8_vae, load_autoencoder, dtype, args.repeats, directory)
        weights_row("SD-v1 UNet", sd_v1_unet, load_unet, dtype, args.repeats, directory)
    cache_row(args.repeats)


if __name__ == "__main__":
    main()
