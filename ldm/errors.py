"""Errors a user must act on. The CLI (train/main.py, train/sample.py) prints them as one line, no
traceback: each message already names the file or key and says what to do."""
from __future__ import annotations


class RunError(RuntimeError):
    """Base class: a fault of the run's inputs or environment, not a bug in ldm."""


class CheckpointError(RunError):
    """A checkpoint that is incomplete, corrupt, unsafe or unreadable (the message names its path)."""


class CheckpointWriteError(RunError):
    """Writing a checkpoint or an autoencoder file failed (disk full, permissions): names the path and
    what was kept."""


class NonFiniteError(RunError):
    """NaN/Inf where finite numbers are required: too many bad steps in a row, or non-finite weights
    about to be saved."""


class DataError(RunError):
    """The data cannot make progress (e.g. no usable sample in a whole pass over the shards)."""


class RunLockedError(RunError):
    """Another live run holds the run directory's lock."""


class CacheError(RunError):
    """A latent cache (`data.latents`) that is missing, incomplete, corrupt or stale: the message names
    the directory and the mismatch, and says how to rebuild it."""


class DataUnavailable(DataError):
    """No byte of training data could be read for `data.max_wait` seconds (a shard server went away): the
    run checkpoints and stops; rerun the same command when the data is back."""
