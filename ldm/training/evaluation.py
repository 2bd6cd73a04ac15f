"""Held-out evaluation, one averaging for the training loop's `evaluate()` and `train/evaluate.py`:
`task.evaluate(batch)` returns each metric's mean over the batch, and here it is weighted by the batch's
image count, so the result is the mean over images (a short last batch counts for its images, not as a
whole batch), whatever the batch size."""
from __future__ import annotations

import contextlib
from typing import Callable, Iterable

import torch


class PerImageMean:
    """Running per-image means of per-batch mean metrics."""

    def __init__(self):
        self.totals: dict[str, float] = {}
        self.images = 0

    def add(self, metrics: dict, images: int) -> None:
        for k, v in metrics.items():
            self.totals[k] = self.totals.get(k, 0.0) + float(v) * images
        self.images += images

    def result(self) -> dict[str, float]:
        return {k: v / self.images for k, v in self.totals.items()} if self.images else {}


def batch_images(batch: dict) -> int:
    """How many samples a batch of the batch contract holds (every batch carries their keys)."""
    return len(batch["key"])


def held_out_means(task, batches: Iterable[dict], *, autocast: Callable[[], contextlib.AbstractContextManager]
                   = contextlib.nullcontext, each: Callable[[int, dict], None] | None = None) -> tuple[dict, int]:
    """Per-image means of `task.evaluate` over `batches` (already on the task's device) and the image count.
    `each(i, batch)` runs after batch i's metrics, under the same autocast (image grids, Inception features)."""
    mean = PerImageMean()
    with torch.no_grad():
        for i, batch in enumerate(batches):
            with autocast():
                metrics = task.evaluate(batch)
                if each is not None:
                    each(i, batch)
            mean.add(metrics, batch_images(batch))
    return mean.result(), mean.images
