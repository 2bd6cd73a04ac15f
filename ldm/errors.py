"""Errors a user must act on. The CLI (train/main.py, train/sample.py) prints them as one line, no
traceback: each message already names the file or key and says what to do."""
from __future__ import annotations

import errno
import os
import re
import resource


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


class DivergedError(NonFiniteError):
    """Loss or gradient spikes kept coming back after rewinds to the newest healthy checkpoint (or there
    was none to rewind to)."""


def os_reason(error: BaseException, path: str | os.PathLike) -> str:
    """Why writing `path` failed, in the OS's words, e.g. "No space left on device (ENOSPC)".

    The errno comes from the OSError (or one it was raised from), from a library message that quotes it
    (safetensors: "... (os error 28)"), or, where the library dropped it (torch.save: "inline_container.cc:672
    ... unexpected pos"), from the state of `path`'s filesystem: full, read-only, not writable, or this
    process's file-size limit (`ulimit -f`). Falls back to the error's own first line."""
    code = _errno_of(error) or _probe(path)
    if code is None:
        lines = str(error).strip().splitlines()
        return f"{type(error).__name__}: {lines[0] if lines else repr(error)}"
    reason = f"{os.strerror(code)} ({errno.errorcode.get(code, code)})"
    if code == errno.EFBIG:
        limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
        if limit != resource.RLIM_INFINITY:
            reason += f": this process may write files of at most {limit} bytes (ulimit -f)"
    return reason


def write_error_message(error: BaseException, path: str | os.PathLike, kept: str = "") -> str:
    """One line for a failed write: the path (the OSError's own file name when it has one), the OS's reason,
    and what was kept."""
    path = getattr(error, "filename", None) or path
    return f"could not write {os.fspath(path)}: {os_reason(error, path)}" + (f"; {kept}" if kept else "")


def _errno_of(error: BaseException | None) -> int | None:
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno:
            return error.errno
        quoted = re.search(r"\(os error (\d+)\)|Os \{ code: (\d+)", str(error))  # Rust's io::Error, as quoted
        if quoted:
            return int(quoted.group(1) or quoted.group(2))
        error = error.__cause__ or error.__context__
    return None


def _probe(path: str | os.PathLike) -> int | None:
    """The errno a write under `path` most likely met, read off its filesystem; None when nothing explains it."""
    directory = os.path.abspath(os.fspath(path))
    while not os.path.isdir(directory) and os.path.dirname(directory) != directory:
        directory = os.path.dirname(directory)
    try:
        fs = os.statvfs(directory)
    except OSError:
        return None
    if fs.f_flag & os.ST_RDONLY:
        return errno.EROFS
    if fs.f_bavail * fs.f_frsize < (1 << 20) or (fs.f_files and fs.f_favail == 0):  # under 1 MiB, or no inodes
        return errno.ENOSPC
    if not os.access(directory, os.W_OK):
        return errno.EACCES
    if resource.getrlimit(resource.RLIMIT_FSIZE)[0] != resource.RLIM_INFINITY:
        return errno.EFBIG
    return None
