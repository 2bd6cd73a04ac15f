"""How well the training order mixes: label autocorrelation inside and across global batches.

Worst case for a streaming shuffle: shards sorted by class (each shard holds one class, as a crawl sorted by
source is). For iid uniform draws over C classes, a pair of samples shares its label with probability 1/C.

    PYTHONPATH=. python benchmarks/shuffle_quality.py [--steps 100]

Compares the per-rank loader (each rank's batch from one worker's shuffle buffer: the order before the
global order existed, still used for evaluation passes) with the global order (ldm/data/order.py).
"""
from __future__ import annotations

import argparse
import itertools
import tempfile

import numpy as np

from ldm.data.decode import SampleDecoder
from ldm.data.order import build_global_loader
from ldm.data.shards import write_shards
from ldm.data.webdataset import build_loader, expand_urls

CLASSES, SHARDS, PER_SHARD, GLOBAL_BATCH = 10, 64, 50, 32


def write_sorted_shards(out: str) -> list[str]:
    pixel = np.zeros((4, 4, 3), np.uint8)
    samples = ({"key": f"s{i:05d}", "image": pixel, "caption": "x", "meta": {"label": (i // PER_SHARD) % CLASSES}}
               for i in range(SHARDS * PER_SHARD))
    return expand_urls(write_shards(samples, out, "train", max_count=PER_SHARD).pattern)


def per_rank_batches(urls, world: int, steps: int):
    """Global batches of the per-rank loader: rank r's micro-batch of each step, concatenated."""
    loaders = [iter(build_loader(urls, batch_size=GLOBAL_BATCH // world, image_size=4, rank=r, world_size=world,
                                 num_workers=2, seed=0, shuffle_buffer=1000, label_field="label"))
               for r in range(world)]
    return [np.concatenate([_index(next(it)) for it in loaders]) for _ in range(steps)]


def _index(batch) -> np.ndarray:
    return np.array([int(k[1:]) for k in batch["key"]])  # sample index: shard = index // PER_SHARD


def global_batches(urls, steps: int, shuffle_buffer: int):
    loader = build_global_loader(urls, decoder=SampleDecoder(4, "txt", "label"), global_batch=GLOBAL_BATCH,
                                 micro_batch=GLOBAL_BATCH, rank=0, world_size=1, num_workers=2, seed=0,
                                 shuffle_buffer=shuffle_buffer, resample=False)
    return [_index(b) for b in itertools.islice(loader, steps)]


def same_label_rate(a: np.ndarray, b: np.ndarray | None = None) -> float:
    if b is None:  # distinct pairs inside one batch
        equal = a[:, None] == a[None, :]
        return float((equal.sum() - len(a)) / (len(a) * (len(a) - 1)))
    return float((a[:, None] == b[None, :]).mean())


def report(name: str, batches: list[np.ndarray]) -> str:
    labels = [(b // PER_SHARD) % CLASSES for b in batches]
    shards = [set((b // PER_SHARD).tolist()) for b in batches]
    inside = np.mean([same_label_rate(b) for b in labels])
    across = np.mean([same_label_rate(a, b) for a, b in zip(labels, labels[1:])])
    kept = np.mean([len(a & b) / len(b) for a, b in zip(shards, shards[1:])])
    return f"| {name} | {inside:.3f} | {across:.3f} | {np.mean([len(s) for s in shards]):.1f} | {kept:.2f} |"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=100)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as out:
        urls = write_sorted_shards(out)
        print(f"{SHARDS} shards x {PER_SHARD} samples, one class of {CLASSES} per shard, global batch {GLOBAL_BATCH}, "
              f"{args.steps} steps; iid reference: same-label pair rate {1 / CLASSES:.3f}")
        print("| order | same label, pairs inside a batch | same label, pairs of consecutive batches | shards per "
              "batch | shards of a batch also in the one before |")
        print("|---|---|---|---|---|")
        for world in (1, 2):
            print(report(f"per-rank loader (before), {world} process(es), 2 workers, buffer 1000/worker",
                         per_rank_batches(urls, world, args.steps)))
        for buffer in (100, 1000):
            print(report(f"global order, any process count, {GLOBAL_BATCH} lanes, buffer {buffer}/lane",
                         global_batches(urls, args.steps, buffer)))


if __name__ == "__main__":
    main()
