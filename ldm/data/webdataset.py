"""Resumable WebDataset loader: shards -> batches in the contract of docs/architecture.md.

Shards are `.tar` files in the img2dataset layout (`KEY.jpg|png|webp`, `KEY.txt`, optional `KEY.json`),
read with the `webdataset` package's tar iterators. What this module adds on top:

* a position that resumes EXACTLY mid-epoch. Each worker's batch stream is a pure function of
  (seed, epoch, rank, worker); the main process merges the workers' batches in a fixed round-robin order
  of its own (not the DataLoader's, which restarts at worker 0 on every `iter()`), and counts per worker
  the batches and raw samples consumed. On resume a worker skips its consumed raw samples *before*
  decoding, so fast-forwarding costs tar reads only.
* bad samples are skipped and counted by kind (`loader.skipped`), never fatal, one rate-limited warning
  each; a truncated/corrupt shard ends that shard only (`shard_error`).
* a rank with no shard is an error at build time: WebDataset + DDP otherwise hangs at the first
  collective when one rank's iterator is empty (webdataset issue #250 and friends).
"""

from __future__ import annotations

import atexit
import collections
import contextlib
import dataclasses
import glob
import itertools
import logging
import math
import os
import random
import re
import signal
import tarfile

import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.tariterators import group_by_keys, tar_file_expander

from ldm.data.decode import SKIP_KINDS, SampleDecoder, SkipSample
from ldm.data.remote import RetryPolicy, open_shard
from ldm.errors import DataError, DataUnavailable

log = logging.getLogger(__name__)

WARN_FIRST, WARN_EVERY = 5, 1000  # per kind and worker: the first 5 warnings, then every 1000th
# With resampling an epoch is a random draw of shards, so one empty epoch proves little: this many in a
# row (each a full pass of draws that yielded no batch) is an error.
EMPTY_RESAMPLED_EPOCHS = 100

_REMOTE_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")  # pipe:, http://, s3://, file:, ...


# --------------------------------------------------------------------------------------------- urls
def _split_outside_braces(spec: str) -> list[str]:
    """Split a shard spec on ',' and '::' that are not inside a brace group like `{a,b}`."""
    parts, depth, current = [], 0, ""
    i = 0
    while i < len(spec):
        ch = spec[i]
        depth += (ch == "{") - (ch == "}")
        if depth == 0 and (ch == "," or spec.startswith("::", i)):
            parts.append(current)
            current = ""
            i += 2 if ch == ":" else 1
            continue
        current += ch
        i += 1
    parts.append(current)
    return [p.strip() for p in parts if p.strip()]


def expand_urls(urls: str | list[str] | tuple[str, ...]) -> list[str]:
    """Brace pattern, glob, comma/'::' list or Python list -> list of shard urls.

    Local paths must exist (FileNotFoundError naming the pattern); remote urls pass through."""
    pieces = [urls] if isinstance(urls, str) else list(urls)
    specs = [spec for piece in pieces for spec in _split_outside_braces(piece)]
    if not specs:
        raise FileNotFoundError(f"no shard pattern given (urls={urls!r})")
    result = []
    for spec in specs:
        if _REMOTE_URL.match(spec):
            result.extend(wds.shardlists.expand_urls(spec))
            continue
        expanded = []
        for path in wds.shardlists.expand_urls(os.path.expanduser(spec)):
            expanded.extend(sorted(glob.glob(path)) if glob.has_magic(path) else [path])
        found = [p for p in expanded if os.path.isfile(p)]
        if not found:
            raise FileNotFoundError(f"no shard files found for pattern {spec!r}")
        missing = [p for p in expanded if not os.path.isfile(p)]
        if missing:
            raise FileNotFoundError(
                f"{len(missing)} shard(s) of pattern {spec!r} do not exist, e.g. {missing[0]!r}")
        result.extend(found)
    return result


class SkipCounter:
    """Per-worker counts of skipped samples by kind, with rate-limited warnings."""

    def __init__(self, worker: int):
        self.worker = worker
        self.counts = dict.fromkeys(SKIP_KINDS, 0)
        self.muted = False  # while fast-forwarding: those faults are already in the saved counts
        self.first: str | None = None  # the first reason met, for the "no usable sample" error
        self.read = 0  # raw samples read in the current epoch (after any fast-forward)

    def skip(self, kind: str, url: str, key: str, detail: str) -> None:
        if self.muted:
            return
        self.counts[kind] += 1
        count = self.counts[kind]
        if self.first is None:
            self.first = f"{kind} in {url} key {key}: {detail}"
        if count <= WARN_FIRST or count % WARN_EVERY == 0:
            more = f" [{count} so far in worker {self.worker}; warnings rate-limited]" if count >= WARN_FIRST else ""
            log.warning("skipped sample (%s) shard=%s key=%s: %s%s", kind, url, key, detail, more)


class TailTrackingReader:
    """File wrapper that remembers whether the file's end was reached and its last KiB.

    Python's tarfile ends a stream SILENTLY at a header cut short (TruncatedHeaderError/EmptyHeaderError
    at offset > 0 are treated as end of archive), so a truncated shard would pass as a shorter one. A
    complete tar ends in >= 2 zero blocks (POSIX); a cut one ends in member bytes."""

    def __init__(self, raw):
        self.raw, self.reached_end, self.tail, self.head = raw, False, b"", None

    def read(self, size=-1):
        data = self.raw.read(size)
        if self.head is None:
            self.head = data[:2]
        self.reached_end |= size is None or size < 0 or len(data) < size
        self.tail = (self.tail + data)[-1024:]
        return data

    def truncated(self) -> bool:
        compressed = self.head == b"\x1f\x8b"  # gzip checks its own end (EOFError on a cut stream)
        return self.reached_end and not compressed and self.tail.count(0) != len(self.tail)

    def close(self):
        self.raw.close()


def read_shard(url: str, counter: SkipCounter, policy: RetryPolicy | None = None):
    """Raw samples of one shard via webdataset's tar iterators, read through `open_shard` (retries, waits for
    a server that went away: ldm/data/remote.py). A shard that fails to open or read (an http 404, truncated,
    corrupt, duplicate names) counts one shard_error and ends; the sample read last before the fault is
    dropped too (it may be incomplete); the other shards carry on. DataUnavailable (nothing readable for
    data.max_wait seconds) is not a shard's fault and propagates."""
    stream, previous = None, None
    try:
        stream = TailTrackingReader(open_shard(url, policy))
        for sample in group_by_keys(tar_file_expander([{"url": url, "stream": stream}])):
            if previous is not None:
                yield previous
            previous = sample
        if stream.truncated():
            raise tarfile.ReadError("archive is cut short (no end-of-archive blocks)")
        if previous is not None:
            yield previous
    except DataUnavailable:
        raise
    except Exception as exn:  # (an OSError's args[0] is a bare errno: use its full text, which names the file)
        message = exn.args[0] if exn.args and isinstance(exn.args[0], str) else exn
        counter.skip("shard_error", url, "-", f"{type(exn).__name__}: {message}")
    finally:  # outside the try: closing must not raise (a failed pipe used to raise here again: a crash)
        if stream is not None:
            stream.close()


def read_captions(urls, caption_field: str = "txt", limit: int = 50_000) -> list[str]:
    """Captions of the first `limit` samples (shards in sorted order), read without decoding images.

    Reads the tars directly (not `wds.WebDataset`, whose default nodesplitter raises "you need to add an
    explicit nodesplitter" in every multi-process job), so any rank can call it."""
    import json

    if caption_field is None:  # data.caption_field=null: image-only shards have no captions to read
        return []
    key, field = ("json", caption_field.split(":", 1)[1]) if caption_field.startswith("json:") else (caption_field, None)
    captions, counter = [], SkipCounter(worker=0)
    for url in sorted(expand_urls(urls)):
        for sample in read_shard(url, counter):
            value = sample.get(key)
            if value is not None:
                value = value.decode("utf-8")
                captions.append(str(json.loads(value).get(field, "")) if field else value)
            if len(captions) >= limit:
                return captions
    return captions


# ------------------------------------------------------------------------------------------ position
@dataclasses.dataclass
class Position:
    """Where each worker stands in `epoch`: batches and raw samples consumed, whether it has ended
    that epoch, and whose batch comes next in the merge order."""

    epoch: int
    consumed: list[int]
    samples: list[int]
    done: list[bool]
    next_worker: int = 0

    @classmethod
    def start_of(cls, epoch: int, workers: int) -> "Position":
        return cls(epoch, [0] * workers, [0] * workers, [False] * workers, 0)

    def copy(self) -> "Position":
        return dataclasses.replace(self, consumed=list(self.consumed), samples=list(self.samples),
                                   done=list(self.done))


def _seed(*parts) -> str:
    # random.Random(str) hashes with SHA-512: stable across processes and runs (unlike hash()).
    return "/".join(map(str, parts))


def _identity(batch):
    return batch


STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)


def ignore_stop_signals(worker_id: int) -> None:
    """`worker_init_fn`: loader workers leave SIGTERM/SIGUSR1 to the training process, which checkpoints
    (ldm/training/preemption.py). SLURM and `kill -TERM -<pgid>` signal every process; torch's own worker
    handler dies on a SIGTERM not sent by its parent, and the main process then fails with "DataLoader
    worker (pid …) is killed by signal". This runs after torch installs that handler, so it wins."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)  # held since the fork (held_stop_signals)


@contextlib.contextmanager
def held_stop_signals():
    """Starting loader workers: a stop signal that arrives between a worker's fork and its
    `ignore_stop_signals` would kill it (torch's handler is already there). The workers inherit this
    block and drop the signal once they ignore it; the training process gets its own copy on the way out."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


@atexit.register
def _kill_leftover_workers() -> None:
    # multiprocessing ends daemonic children at exit with SIGTERM, which loader workers now ignore: a loader
    # iterator still alive at exit (not closed, or kept by a traceback) would make that join hang. They
    # hold no state, so they are killed outright. (Registered after multiprocessing's hook: runs first.)
    import multiprocessing

    for child in multiprocessing.active_children():
        if child.daemon:
            child.kill()


class ShardStream(IterableDataset):
    """Per-worker batch stream: a deterministic function of (seed, epoch, rank, worker)."""

    def __init__(self, urls, *, decoder, batch_size, rank, world_size, workers, seed, shuffle,
                 shuffle_buffer, resample, drop_last):
        super().__init__()
        self.urls, self.decoder, self.batch_size = urls, decoder, batch_size
        self.rank, self.world_size, self.workers, self.seed = rank, world_size, workers, seed
        self.shuffle, self.shuffle_buffer = shuffle, shuffle_buffer
        self.resample, self.drop_last = resample, drop_last
        self.start = Position.start_of(0, workers)  # set by ResumableLoader before each iter()
        self.final_epoch: int | None = None  # exclusive; None runs forever
        self.shards_per_worker = max(1, math.ceil(len(urls) / (world_size * workers)))

    def shards_for(self, epoch: int, worker: int) -> list[str]:
        if self.resample:  # with replacement, so any rank/worker count works and never runs dry
            rng = random.Random(_seed(self.seed, "resample", epoch, self.rank, worker))
            return rng.choices(self.urls, k=self.shards_per_worker)
        urls = list(self.urls)
        if self.shuffle:  # one permutation per epoch shared by all ranks, so the splits stay disjoint
            random.Random(_seed(self.seed, "shards", epoch)).shuffle(urls)
        return urls[self.rank :: self.world_size][worker :: self.workers]

    def raw_samples(self, epoch: int, worker: int, counter: SkipCounter):
        samples = (s for url in self.shards_for(epoch, worker) for s in read_shard(url, counter))
        if self.shuffle and self.shuffle_buffer > 1:
            rng = random.Random(_seed(self.seed, "samples", epoch, self.rank, worker))
            samples = wds.filters.shuffle(self.shuffle_buffer, self.shuffle_buffer, rng=rng)(samples)
        return samples

    def __iter__(self):
        info = get_worker_info()
        worker = info.id if info is not None else 0
        counter, start = SkipCounter(worker), self.start
        epochs = itertools.count(start.epoch) if self.final_epoch is None else range(start.epoch, self.final_epoch)
        for epoch in epochs:
            resuming = epoch == start.epoch
            if resuming and start.done[worker]:
                continue  # its end of this epoch was already handed to the main process
            skip_samples, first_index = (start.samples[worker], start.consumed[worker]) if resuming else (0, 0)
            counter.read = 0
            yield from self._epoch(epoch, worker, counter, skip_samples, first_index)
            yield {"__end__": True, "__worker__": worker, "__epoch__": epoch, "__skipped__": dict(counter.counts),
                   "__read__": counter.read, "__first__": counter.first}

    def _epoch(self, epoch, worker, counter, skip_samples, first_index):
        raw = self.raw_samples(epoch, worker, counter)
        # Fast-forward: no decoding. Shard faults met on the way were counted before the checkpoint (the
        # shuffle buffer pulls the same raw samples ahead in both runs), so they are not counted twice.
        counter.muted = True
        collections.deque(itertools.islice(raw, skip_samples), maxlen=0)
        counter.muted = False
        position, index, pending = skip_samples, first_index, []
        for sample in raw:
            position += 1
            counter.read += 1
            try:
                sample["__epoch__"] = epoch  # seeds the sample's augmentation (SampleDecoder.rng)
                pending.append(self.decoder(sample))
            except SkipSample as skip:
                counter.skip(skip.kind, sample.get("__url__", "?"), sample.get("__key__", "?"), skip.detail)
            if len(pending) == self.batch_size:
                yield self._collate(pending, worker, epoch, index, position, counter)
                pending, index = [], index + 1
        if pending and not self.drop_last:
            yield self._collate(pending, worker, epoch, index, position, counter)

    def _collate(self, samples, worker, epoch, index, position, counter) -> dict:
        # tensors (image, or a latent cache's latent_mean/latent_logvar/context) stacked, the rest listed
        check_one_shape(samples)
        batch = {k: torch.stack([s[k] for s in samples]) if torch.is_tensor(v) else [s[k] for s in samples]
                 for k, v in samples[0].items()}
        if "label" in batch:
            batch["label"] = torch.tensor(batch["label"], dtype=torch.long)
        batch.update(__worker__=worker, __epoch__=epoch, __index__=index, __samples__=position,
                     __skipped__=dict(counter.counts))
        return batch


def check_one_shape(samples: list[dict]) -> None:
    """A batch is stacked, so its samples must share each tensor's shape (one aspect-ratio bucket per batch:
    images, or a latent cache's latents of different shapes). Say which samples differ, not torch.stack's
    "stack expects each tensor to be equal size"."""
    for name, value in samples[0].items():
        if torch.is_tensor(value):
            shapes = {tuple(s[name].shape) for s in samples}
            if len(shapes) > 1:
                raise ValueError(f"a batch mixes {name} shapes {sorted(shapes)} (keys {[s.get('key') for s in samples]}): "
                                 "each batch must hold one shape; group samples by shape (aspect-ratio buckets)")


class ResumableLoader:
    """Iterates batches (dicts per docs/architecture.md) with an exact, checkpointable position.

    `iter()` continues from the current position (a finished finite pass leaves it at the start of the
    next epoch); `reset()` goes back to epoch 0. One live iterator at a time."""

    def __init__(self, stream: ShardStream, *, num_workers: int, epochs: int | None, pin_memory: bool = False):
        self.stream, self.num_workers, self.epochs, self.pin_memory = stream, num_workers, epochs, pin_memory
        self.slots = stream.workers
        self.reset()

    @property
    def urls(self) -> list[str]:
        return self.stream.urls

    def reset(self) -> None:
        self._position = Position.start_of(0, self.slots)
        self._skip_base = dict.fromkeys(SKIP_KINDS, 0)
        self._skip_latest: dict[int, dict[str, int]] = {}

    @property
    def skipped(self) -> dict[str, int]:
        """Samples skipped so far by kind (this rank; all workers and previous iterators)."""
        total = dict(self._skip_base)
        for counts in self._skip_latest.values():
            for kind, n in counts.items():
                total[kind] += n
        return total

    def state_dict(self) -> dict:
        p = self._position
        return {"epoch": p.epoch, "consumed": list(p.consumed), "samples": list(p.samples), "done": list(p.done),
                "next_worker": p.next_worker, "skipped": self.skipped, "num_workers": self.slots,
                "rank": self.stream.rank, "world_size": self.stream.world_size, "seed": self.stream.seed}

    def load_state_dict(self, state: dict, strict: bool = True) -> None:
        """Resume at `state`, the `state_dict()` THIS rank saved (positions differ per rank: gather and save
        every rank's). A different rank/worker/world layout or seed cannot resume exactly: strict raises,
        strict=False restarts the saved epoch from its beginning."""
        layout = {"num_workers": self.slots, "rank": self.stream.rank, "world_size": self.stream.world_size,
                  "seed": self.stream.seed}
        mismatched = {k: (state.get(k), v) for k, v in layout.items() if state.get(k) != v}
        if mismatched and strict:
            raise ValueError(f"data position was saved with a different layout (saved, now): {mismatched}; exact "
                             "resume needs the same values (load_state_dict(..., strict=False) restarts the epoch)")
        if mismatched:
            log.warning("data layout changed %s: restarting epoch %d from its start", mismatched, state["epoch"])
            self._position = Position.start_of(int(state["epoch"]), self.slots)
        else:
            self._position = Position(int(state["epoch"]), list(state["consumed"]), list(state["samples"]),
                                      list(state["done"]), int(state["next_worker"]))
        self._skip_base = {k: int(state.get("skipped", {}).get(k, 0)) for k in SKIP_KINDS}
        self._skip_latest = {}

    def __iter__(self):
        position = self._position  # updated in place as batches are handed out
        self._skip_base, self._skip_latest = self.skipped, {}  # fold the last iterator's counts in
        self.stream.start = position.copy()
        self.stream.final_epoch = None if self.epochs is None else position.epoch + self.epochs
        if self.num_workers > 0:
            # Own generator: the DataLoader draws worker base seeds from it, not from the global RNG, so
            # starting an iterator never shifts the training stream (bit-identical resume). Our streams
            # are seeded explicitly per (seed, epoch, rank, worker) anyway.
            with held_stop_signals():
                source = iter(DataLoader(self.stream, batch_size=None, num_workers=self.num_workers,
                                         collate_fn=_identity, pin_memory=self.pin_memory,
                                         worker_init_fn=ignore_stop_signals,
                                         generator=torch.Generator().manual_seed(0)))
        else:
            source = iter(self.stream)
        queues = [collections.deque() for _ in range(self.slots)]
        # A whole pass that yields no batch would repeat forever (a hang with a warning every few ms):
        # count batches and raw samples per pass begun from its start, and stop with what went wrong.
        fresh = not (any(position.done) or any(position.consumed) or any(position.samples))
        batches, read, first, empty_passes = 0, 0, None, 0
        while True:
            if all(position.done):  # every worker ended this epoch: the next one starts at worker 0
                empty_passes = empty_passes + 1 if fresh and batches == 0 else 0
                if empty_passes and (not self.stream.resample or empty_passes >= EMPTY_RESAMPLED_EPOCHS):
                    raise DataError(self._no_progress(position.epoch, read, first))
                fresh, batches, read, first = True, 0, 0, None
                self._position = position = Position.start_of(position.epoch + 1, self.slots)
                if self.stream.final_epoch is not None and position.epoch >= self.stream.final_epoch:
                    return
            worker = position.next_worker
            while position.done[worker]:
                worker = (worker + 1) % self.slots
            while not queues[worker]:
                item = next(source, None)
                if item is None:
                    raise RuntimeError(f"data worker {worker} stopped before finishing epoch {position.epoch}")
                queues[item["__worker__"]].append(item)
            item = queues[worker].popleft()
            self._skip_latest[worker] = item.pop("__skipped__")
            position.next_worker = (worker + 1) % self.slots
            if item.pop("__epoch__") != position.epoch:
                raise RuntimeError(f"data worker {worker} is out of step with epoch {position.epoch}")
            if item.pop("__end__", False):
                position.done[worker] = True
                read += item["__read__"]
                first = first or item["__first__"]
                continue
            position.consumed[worker] = item.pop("__index__") + 1
            position.samples[worker] = item.pop("__samples__")
            del item["__worker__"]
            batches += 1
            yield item

    def _no_progress(self, epoch: int, read: int, first: str | None) -> str:
        skipped = {k: n for k, n in self.skipped.items() if n}
        stream = self.stream
        message = (f"no usable sample in a whole pass over {len(stream.urls)} shard(s) (rank {stream.rank}, epoch "
                   f"{epoch}): read {read} sample(s), skipped {skipped or 'none'}; first reason: {first or 'none'}")
        if read > sum(skipped.values()):
            message += f"; the usable samples make no full batch of {stream.batch_size} per data worker"
        return message + " (check data.shards, data.caption_field, data.label_field)"


def build_loader(urls, *, batch_size: int, image_size: int, rank: int = 0, world_size: int = 1,
                 num_workers: int = 2, seed: int = 0, shuffle_buffer: int = 1000, resample: bool = False,
                 caption_field: str | None = "txt", label_field: str | None = None, epochs: int | None = None,
                 shuffle: bool | None = None, drop_last: bool | None = None,
                 pin_memory: bool = False, decoder: SampleDecoder | None = None) -> ResumableLoader:
    """Shards -> ResumableLoader of batches {image, caption, meta, key[, label]}.

    epochs=None: training, epoch after epoch forever, shards + samples shuffled, partial batches dropped.
    epochs=k: k passes per `iter()`, by default unshuffled with the last partial batch kept (evaluation).
    `shuffle` / `drop_last` override those defaults. `decoder` replaces the image decoder (a latent cache's
    shards: ldm/data/latent_cache.py)."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world_size {world_size}")
    if batch_size < 1 or image_size < 1:
        raise ValueError(f"batch_size ({batch_size}) and image_size ({image_size}) must be positive")
    shard_urls = expand_urls(urls)
    workers = max(1, num_workers)
    if not resample:
        fewest = len(shard_urls) // world_size  # the rank with the fewest shards gets this many
        if fewest == 0:
            raise ValueError(f"{len(shard_urls)} shard(s) for world_size {world_size}: rank(s) "
                             f"{len(shard_urls)}..{world_size - 1} would get no shard and hang the others; "
                             "write at least one shard per rank or set resample=True")
        if fewest < workers:
            log.warning("%d shard(s) per rank < num_workers=%d: using %d workers", fewest, workers, fewest)
            workers = fewest
            num_workers = min(num_workers, fewest)
    shuffle = epochs is None if shuffle is None else shuffle
    drop_last = epochs is None if drop_last is None else drop_last
    decoder = decoder or SampleDecoder(image_size, caption_field, label_field)
    stream = ShardStream(shard_urls, decoder=decoder,
                         batch_size=batch_size, rank=rank, world_size=world_size, workers=workers, seed=seed,
                         shuffle=shuffle, shuffle_buffer=shuffle_buffer, resample=resample, drop_last=drop_last)
    return ResumableLoader(stream, num_workers=num_workers, epochs=epochs, pin_memory=pin_memory)
