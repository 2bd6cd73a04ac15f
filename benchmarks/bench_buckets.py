"""Training loader throughput: square crops vs aspect-ratio buckets (`data.buckets`), on the same 256 JPEGs of
six sizes (1:1, 4:3, 3:4, 16:9, 9:16, 3:2; 360-640 px), image_size 256, global batch 16 of micro-batches of 4.
Alternates the two loaders `--rounds` times; prints samples/s of each round, the samples waiting in the
bucket buffers at the end, and the bucket histogram. BENCHMARKS.md has the results.

    python benchmarks/bench_buckets.py --out /tmp/bucket_bench --rounds 3
"""
import argparse
import time

import numpy as np

from ldm.data.buckets import make_buckets
from ldm.data.decode import SampleDecoder
from ldm.data.order import build_global_loader
from ldm.data.shards import ShardSink
from ldm.data.webdataset import expand_urls

SIZES = [(384, 384), (512, 384), (384, 512), (640, 360), (360, 640), (450, 300)]  # (width, height)


def write(out: str) -> list[str]:
    rng = np.random.default_rng(0)
    with ShardSink(out, "train", max_count=16, image_format="jpg") as sink:
        for i in range(256):
            w, h = SIZES[i % len(SIZES)]
            blocks = rng.integers(0, 256, (h // 8, w // 8, 3), dtype=np.uint8)  # 8x8 blocks: JPEG-like content
            sink.write(f"s{i:04d}", blocks.repeat(8, 0).repeat(8, 1), f"caption {i}")
    return expand_urls(f"{out}/train-*.tar")


def measure(urls, buckets, batches: int = 48):
    decoder = SampleDecoder(256, "txt", buckets=tuple(buckets) if buckets else None)
    loader = build_global_loader(urls, decoder=decoder, global_batch=16, micro_batch=4, rank=0, world_size=1,
                                 num_workers=0, seed=0, shuffle_buffer=16, resample=False, buckets=buckets)
    it = iter(loader)
    next(it)  # shards opened, first buffers filled
    start, n = time.perf_counter(), 0
    for _ in range(batches):
        n += len(next(it)["key"])
    rate = n / (time.perf_counter() - start)
    waiting = [len(lane[2]) for lane in loader.state_dict()["lanes"].values()] if buckets else []
    return rate, waiting, dict(loader.bucket_counts)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="/tmp/bucket_bench")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    urls = write(args.out)
    buckets = make_buckets(256, 64, 2.0)
    for r in range(args.rounds):
        square, _, _ = measure(urls, None)
        bucketed, waiting, histogram = measure(urls, buckets)
        print(f"round {r}: square {square:.1f} samples/s, buckets {bucketed:.1f} samples/s; waiting per lane "
              f"{waiting}; histogram {histogram}")


if __name__ == "__main__":
    main()
