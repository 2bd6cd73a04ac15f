"""Random draws per SAMPLE, so a run's randomness does not depend on how a global batch is split.

A training step draws noise, timesteps and condition-dropout flags for a whole micro-batch. Drawn from one
seeded generator, sample j's noise depends on the micro-batch it sits in: 1 process with a micro-batch of 8
and 2 processes with 4 each would draw different numbers for the same sample. Inside `per_sample(seeds)` the
draws below give row i its own generator, seeded by that sample's index in the global sample stream
(ldm/training/step.py), so each sample gets the same numbers on 1, 2 or 4 processes. Outside it (sampling,
evaluation, tests) they are plain torch draws from the global RNG.
"""
from __future__ import annotations

import hashlib
from contextlib import contextmanager

import torch

_active: dict | None = None  # {"seeds": [...], "generators": {(row, device): Generator}}


def sample_seed(seed: int, index: int) -> int:
    """63-bit seed of the sample at `index` of the global sample stream (SHA-256: stable everywhere)."""
    return int.from_bytes(hashlib.sha256(f"{seed}/sample/{index}".encode()).digest()[:8], "little") >> 1


@contextmanager
def per_sample(seeds: list[int]):
    """Draws of a batch of len(seeds) rows come from one generator per row while inside."""
    global _active
    previous, _active = _active, {"seeds": list(seeds), "generators": {}}
    try:
        yield
    finally:
        _active = previous


def _rows(shape, device) -> list[torch.Generator] | None:
    if _active is None or not shape or shape[0] != len(_active["seeds"]):
        return None
    device = torch.device(device if device is not None else "cpu")
    generators = _active["generators"]
    for i, seed in enumerate(_active["seeds"]):
        if (i, device) not in generators:  # each row keeps one stream per device across all its draws
            generators[i, device] = torch.Generator(device).manual_seed(seed)
    return [generators[i, device] for i in range(len(_active["seeds"]))]


def randn(shape, *, device=None, dtype=None) -> torch.Tensor:
    shape = tuple(shape)
    rows = _rows(shape, device)
    if rows is None:
        return torch.randn(shape, device=device, dtype=dtype)
    return torch.stack([torch.randn(shape[1:], generator=g, device=device, dtype=dtype) for g in rows])


def rand(shape, *, device=None) -> torch.Tensor:
    shape = tuple(shape)
    rows = _rows(shape, device)
    if rows is None:
        return torch.rand(shape, device=device)
    return torch.stack([torch.rand(shape[1:], generator=g, device=device) for g in rows])


def randint(low: int, high: int, shape, *, device=None) -> torch.Tensor:
    shape = tuple(shape)
    rows = _rows(shape, device)
    if rows is None:
        return torch.randint(low, high, shape, device=device)
    return torch.stack([torch.randint(low, high, shape[1:], generator=g, device=device) for g in rows])
