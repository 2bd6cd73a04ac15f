"""One global sample order for training: a function of (seed, data) only, whatever the number of processes
and loader workers, and resumable on another number of processes.

The order is built from `lanes` (MosaicML Streaming's "canonical nodes" play the same part):
* in epoch e the shards are permuted by (seed, e) and dealt to the lanes: lane l reads shards l, l+L, ...
  (with `resample`, lane l draws its shards with replacement from (seed, e, l));
* each lane is one stream: its shards in order through a shuffle buffer seeded by (seed, e, l), decoded,
  bad samples skipped. When a lane's shards are done it goes on with epoch e+1. The stream is a pure
  function of (seed, data, l), so whoever reads a lane gets the same samples;
* global batch b (G samples) takes positions [ceil(l*G/L), ceil((l+1)*G/L)) from lane l, the lane's
  next samples in order. With the default L = min(G, shards) every position is its own lane.

A process takes its slice of each global batch: the loop's micro-batch k = (step*accum + a)*world + rank
holds positions [(a*world + rank)*micro, ... + micro). It reads only the lanes that hold its positions,
and its loader workers split those lanes. So with L a multiple of the micro-batches per step (L = G always
is) no lane is read twice; otherwise a shared lane is read by each process that needs it (correct, slower).

The position is tiny: the next global batch, and for each lane where its stream stands (epoch, raw samples
consumed). Every rank saves its lanes; a resume on any number of processes merges them
(`GlobalLoader.load_state_dict(list of every rank's state)`).

Aspect-ratio buckets (`data.buckets`, ldm/data/buckets.py): every micro-batch must hold one image shape. Then
L = G / micro_batch, so lane l owns exactly the micro-batch of positions [l*micro, (l+1)*micro) of every global
batch (the same micro-batch boundaries on any process count, since micro-batch k holds [k*micro, (k+1)*micro)).
A lane reads its stream as before, puts each decoded sample in its bucket's buffer, and hands out the first
bucket that fills (micro samples) as its block; samples of other buckets wait for a later batch. The order is
still a function of (seed, data, micro_batch) only. A lane's position also lists the (epoch, raw index) of the
samples still waiting, and a resume re-reads and re-decodes exactly those. The micro-batch size is part of the
order: a resume that changes it is refused (set trainer.micro_batch_size to resume on another process count).
Memory: each lane holds at most buckets x (micro - 1) decoded samples.
"""
from __future__ import annotations

import collections
import itertools
import math
import random

import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ldm.data.decode import SKIP_KINDS, SkipSample
from ldm.data.remote import RetryPolicy
from ldm.data.webdataset import EMPTY_RESAMPLED_EPOCHS, SkipCounter, _identity, _seed, ignore_stop_signals, read_shard
from ldm.errors import DataError, DataUnavailable


def lane_start(lane: int, lanes: int, global_batch: int) -> int:
    """First position of `lane` in every global batch."""
    return -(-lane * global_batch // lanes)


def lane_of(position: int, lanes: int, global_batch: int) -> int:
    return position * lanes // global_batch


def rank_positions(rank: int, world_size: int, micro_batch: int, accumulation: int) -> list[int]:
    """Positions of each global batch this rank trains on, in the order of its micro-batches."""
    return [(a * world_size + rank) * micro_batch + j for a in range(accumulation) for j in range(micro_batch)]


class LaneStream(IterableDataset):
    """A worker's part of this rank's slice of every global batch, from `start["batch"]` on. Each item:
    the samples at this worker's positions of one global batch, collated (with buckets: one collated block
    per lane, keyed by its first position), plus where its lanes stand."""

    def __init__(self, urls, *, decoder, global_batch, lanes, positions, workers, seed, shuffle, shuffle_buffer,
                 resample, policy: RetryPolicy | None = None, bucketed: bool = False):
        super().__init__()
        self.urls, self.decoder, self.global_batch, self.lanes = urls, decoder, global_batch, lanes
        self.bucketed = bucketed  # blocks of one shape per lane (module doc); lanes == G / micro_batch
        self.positions, self.seed, self.shuffle, self.shuffle_buffer = positions, seed, shuffle, shuffle_buffer
        self.resample, self.policy = resample, policy
        self.rank_lanes = sorted({lane_of(p, lanes, global_batch) for p in positions})
        self.workers = max(1, min(workers, len(self.rank_lanes)))
        self.start = {"batch": 0, "lanes": {}}  # set by GlobalLoader before each iter()

    def shards_for(self, epoch: int, lane: int) -> list[str]:
        if self.resample:
            rng = random.Random(_seed(self.seed, "resample", epoch, lane))
            return rng.choices(self.urls, k=max(1, math.ceil(len(self.urls) / self.lanes)))
        urls = list(self.urls)
        if self.shuffle:  # one permutation per epoch, dealt to the lanes: every shard once per epoch
            random.Random(_seed(self.seed, "shards", epoch)).shuffle(urls)
        return urls[lane :: self.lanes]

    def _raw(self, epoch: int, lane: int, counter: SkipCounter):
        samples = (s for url in self.shards_for(epoch, lane) for s in read_shard(url, counter, self.policy))
        if self.shuffle and self.shuffle_buffer > 1:
            rng = random.Random(_seed(self.seed, "samples", epoch, lane))
            samples = wds.filters.shuffle(self.shuffle_buffer, self.shuffle_buffer, rng=rng)(samples)
        return samples

    def lane(self, lane: int, epoch: int, skip: int, counter: SkipCounter):
        """Usable samples of `lane` from raw sample `skip` of `epoch` on, each with (epoch, raw read after it)."""
        empty = 0
        while True:
            raw = self._raw(epoch, lane, counter)
            counter.muted = True  # fast-forward without decoding; faults met here were counted before
            collections.deque(itertools.islice(raw, skip), maxlen=0)
            counter.muted = False
            read, usable = skip, 0
            for sample in raw:
                read += 1
                try:
                    sample["__epoch__"] = epoch  # seeds the sample's augmentation (SampleDecoder.rng)
                    decoded = self.decoder(sample)
                except SkipSample as e:
                    counter.skip(e.kind, sample.get("__url__", "?"), sample.get("__key__", "?"), e.detail)
                    continue
                usable += 1
                yield decoded, (epoch, read)
            # A lane-epoch with nothing usable: samples read but all skipped means wrong data or fields (an
            # error now); shards that could not be read (a dead shard, or with resampling an unlucky draw)
            # are passed over, until EMPTY_RESAMPLED_EPOCHS in a row say that nothing is readable at all.
            empty = empty + 1 if usable == 0 and skip == 0 else 0
            if empty and ((read and not self.resample) or empty >= EMPTY_RESAMPLED_EPOCHS):
                skipped = {k: n for k, n in counter.counts.items() if n}
                shards = self.shards_for(epoch, lane)
                raise DataError(f"no usable sample in a whole pass over the {len(shards)} shard(s) of lane {lane} "
                                f"of {self.lanes} (epoch {epoch}, e.g. {shards[0]}): read {read} sample(s), skipped "
                                f"{skipped or 'none'}; first reason: {counter.first or 'none'} "
                                "(check data.shards, data.caption_field, data.label_field)")
            epoch, skip = epoch + 1, 0

    def __iter__(self):
        info = get_worker_info()
        worker = info.id if info is not None else 0
        try:
            yield from self._pieces(worker)
        except DataError as e:  # handed over as an item: the main process raises it as one clean line
            yield {"__error__": str(e), "__unavailable__": isinstance(e, DataUnavailable), "__worker__": worker}

    def blocks(self, lane: int, start: tuple, counter: SkipCounter):
        """The lane's block of every global batch, from lane position `start`, each with the position after it."""
        size = lane_start(lane + 1, self.lanes, self.global_batch) - lane_start(lane, self.lanes, self.global_batch)
        if self.bucketed:
            yield from self._bucket_blocks(lane, size, start, counter)
            return
        stream = self.lane(lane, *start[:2], counter)
        while True:
            block = [next(stream) for _ in range(size)]
            yield [s for s, _ in block], block[-1][1]

    def _bucket_blocks(self, lane: int, size: int, start: tuple, counter: SkipCounter):
        """Blocks of `size` samples of one shape: the first bucket to fill, in the lane's read order. The
        position after a block is (epoch, raw read, [[epoch, raw index] of each sample left in a buffer])."""
        epoch, read, waiting = (tuple(start) + ([],))[:3]
        buffers: dict[tuple, list] = {}
        for sample, where in self._reread(lane, waiting, counter):
            buffers.setdefault(bucket_of(sample), []).append((sample, where))
        for sample, (epoch, read) in self.lane(lane, epoch, read, counter):
            buffer = buffers.setdefault(bucket_of(sample), [])
            buffer.append((sample, [epoch, read - 1]))
            if len(buffer) == size:  # only the bucket just added to can fill: no ties
                del buffers[bucket_of(sample)]
                left = sorted(where for held in buffers.values() for _, where in held)
                yield [s for s, _ in buffer], (epoch, read, left)

    def _reread(self, lane: int, waiting: list, counter: SkipCounter):
        """The samples at `waiting` ([epoch, raw index] pairs, in read order) decoded again, for a resume."""
        for epoch in sorted({e for e, _ in waiting}):
            wanted = {i for e, i in waiting if e == epoch}
            counter.muted = True  # their faults, if any, were counted when they were first read
            for index, sample in enumerate(itertools.islice(self._raw(epoch, lane, counter), max(wanted) + 1)):
                if index in wanted:
                    sample["__epoch__"] = epoch
                    try:
                        yield self.decoder(sample), [epoch, index]
                    except SkipSample:  # the data changed since the checkpoint: nothing to hand out
                        pass
            counter.muted = False

    def _pieces(self, worker: int):
        lanes = self.rank_lanes[worker :: self.workers]
        counters = {l: SkipCounter(worker) for l in lanes}
        start = self.start["lanes"]
        streams = {l: self.blocks(l, start.get(l, (0, 0, [])), counters[l]) for l in lanes}
        wanted = {l: [(p, p - lane_start(l, self.lanes, self.global_batch)) for p in self.positions
                      if lane_of(p, self.lanes, self.global_batch) == l] for l in lanes}
        states = {}
        for batch in itertools.count(self.start["batch"]):
            taken, blocks = [], {}
            for l in lanes:
                block, states[l] = next(streams[l])
                taken += [(p, block[offset]) for p, offset in wanted[l]]
                if self.bucketed:  # one micro-batch: its own tensor (shapes differ between lanes)
                    blocks[wanted[l][0][0]] = collate([block[offset] for _, offset in wanted[l]])
            taken.sort(key=lambda item: item[0])
            yield {"__worker__": worker, "__batch__": batch, "__positions__": [p for p, _ in taken],
                   "samples": blocks if self.bucketed else collate([s for _, s in taken]), "__lanes__": dict(states),
                   "__skipped__": {l: dict(c.counts) for l, c in counters.items()}}


def bucket_of(sample: dict) -> tuple:
    """A decoded sample's shape: its image's (height, width), or its cached latent's."""
    content = sample["image"] if "image" in sample else sample["latent_mean"]
    return tuple(content.shape[-2:])


def collate(samples: list[dict]) -> dict:
    # tensors (image, or a latent cache's latent_mean/latent_logvar/context) stacked, the rest listed
    batch = {k: torch.stack([s[k] for s in samples]) if torch.is_tensor(v) else [s[k] for s in samples]
             for k, v in samples[0].items()}
    if "label" in batch:
        batch["label"] = torch.tensor(batch["label"], dtype=torch.long)
    return batch


def _merge(batches: list[dict], order: list[int]) -> dict:
    merged = {}
    for k in batches[0]:
        if torch.is_tensor(batches[0][k]):
            merged[k] = torch.cat([b[k] for b in batches])[order]
        else:
            flat = [x for b in batches for x in b[k]]
            merged[k] = [flat[i] for i in order]
    return merged


def _rows(batch: dict, start: int, stop: int) -> dict:
    return {k: v[start:stop] for k, v in batch.items()}


def _plain(position) -> tuple:
    """A lane position as saved (lists, from JSON or torch.load) -> (epoch, raw read[, waiting [[e, i], ...]])."""
    position = tuple(position)
    return position[:2] if len(position) == 2 else (*position[:2], [list(w) for w in position[2]])


def _saved(position: tuple) -> list:
    """A lane position as saved: [epoch, raw read] (+ [waiting [[e, i], ...]] with buckets), lists only."""
    return [*position[:2], *([[list(w) for w in position[2]]] if len(position) > 2 else [])]


class GlobalLoader:
    """Micro-batches of this rank, in the loop's order, with a position any process count can resume."""

    def __init__(self, stream: LaneStream, *, micro_batch: int, num_workers: int, pin_memory: bool = False,
                 buckets: list | None = None):
        self.stream, self.micro_batch, self.pin_memory = stream, micro_batch, pin_memory
        self.buckets = [tuple(b) for b in buckets or []]  # data.buckets' shapes (stream.bucketed), for the layout
        self.num_workers = 0 if num_workers == 0 else stream.workers
        self.accumulation = len(stream.positions) // micro_batch
        self._batch, self._micro, self._lanes = 0, 0, {}
        self._skip_base = {l: dict.fromkeys(SKIP_KINDS, 0) for l in stream.rank_lanes}
        self._skip_latest: dict[int, dict[str, int]] = {}
        self.bucket_counts: collections.Counter = collections.Counter()  # (H, W) -> samples handed out here

    @property
    def urls(self) -> list[str]:
        return self.stream.urls

    def _lane_skips(self) -> dict[int, dict[str, int]]:
        return {l: {k: base[k] + self._skip_latest.get(l, {}).get(k, 0) for k in SKIP_KINDS}
                for l, base in self._skip_base.items()}

    @property
    def skipped(self) -> dict[str, int]:
        """Samples skipped so far by kind, in this rank's lanes."""
        lanes = self._lane_skips().values()
        return {k: sum(c[k] for c in lanes) for k in SKIP_KINDS}

    def _layout(self) -> dict:
        s = self.stream
        layout = {"lane_count": s.lanes, "global_batch": s.global_batch, "seed": s.seed, "shards": len(s.urls),
                  "buckets": [list(b) for b in self.buckets] if s.bucketed else None}  # (older checkpoints: None)
        if s.bucketed:
            layout["micro_batch"] = self.micro_batch
        return layout

    def state_dict(self) -> dict:
        return {"order": "lanes", "batch": self._batch, "micro": self._micro,
                "lanes": {l: _saved(v) for l, v in self._lanes.items()}, "skipped": self._lane_skips(),
                **self._layout()}

    def load_state_dict(self, states: dict | list[dict]) -> None:
        """Resume from the states EVERY rank saved (any number of ranks): they are merged by lane."""
        states = [states] if isinstance(states, dict) else list(states)
        s, layout = self.stream, self._layout()
        saved_micro = states[0].get("micro_batch")
        if s.bucketed and saved_micro is not None and saved_micro != self.micro_batch:
            raise DataError(f"data.buckets: the checkpoint's sample order fills micro-batches of {saved_micro} "
                            f"samples of one shape, this run's are {self.micro_batch}; resume with "
                            f"trainer.micro_batch_size={saved_micro} (any process count that divides "
                            f"trainer.batch_size / {saved_micro})")
        for state in states:
            changed = {k: (state.get(k), v) for k, v in layout.items() if state.get(k) != v}
            if state.get("order") != "lanes" or changed:
                raise ValueError(f"the sample order changed since the checkpoint (saved, now): "
                                 f"{changed or 'an older position format'}")
        if len({(st["batch"], st["micro"]) for st in states}) != 1:
            raise ValueError(f"the ranks saved different positions: {sorted({st['batch'] for st in states})}")
        lanes, skips = {}, {}
        for state in states:
            lanes.update({int(l): _plain(v) for l, v in state["lanes"].items()})
            skips.update({int(l): dict(v) for l, v in state["skipped"].items()})
        self._batch, self._micro = int(states[0]["batch"]), int(states[0]["micro"])
        missing = [l for l in s.rank_lanes if l not in lanes and self._batch > 0]
        if missing:
            raise ValueError(f"no saved position for lane(s) {missing[:5]}")
        self._lanes = {l: lanes[l] for l in s.rank_lanes if l in lanes}
        self._skip_base = {l: {k: int(skips.get(l, {}).get(k, 0)) for k in SKIP_KINDS} for l in s.rank_lanes}
        self._skip_latest = {}

    def __iter__(self):
        self._skip_base, self._skip_latest = self._lane_skips(), {}  # fold the last iterator's counts in
        self.stream.start = {"batch": self._batch, "lanes": dict(self._lanes)}
        if self.num_workers > 0:
            # Own generator: starting an iterator never shifts the training RNG stream (bit-identical resume).
            source = iter(DataLoader(self.stream, batch_size=None, num_workers=self.num_workers,
                                     collate_fn=_identity, worker_init_fn=ignore_stop_signals,
                                     generator=torch.Generator().manual_seed(0)))
        else:
            source = iter(self.stream)
        try:
            yield from self._batches(source)
        finally:  # workers may be stuck waiting for a server: stop them now, not from a traceback's frame at exit
            shutdown = getattr(source, "_shutdown_workers", None)
            if shutdown is not None:
                shutdown()

    def _batches(self, source):
        queues = [collections.deque() for _ in range(self.stream.workers)]
        while True:
            pieces = []
            for worker, queue in enumerate(queues):
                while not queue:
                    item = next(source, None)
                    if item is None:
                        raise RuntimeError(f"data worker {worker} stopped at global batch {self._batch}")
                    if "__error__" in item:
                        raise (DataUnavailable if item["__unavailable__"] else DataError)(item["__error__"])
                    queues[item["__worker__"]].append(item)
                piece = queue.popleft()
                if piece["__batch__"] != self._batch:
                    raise RuntimeError(f"data worker {worker} is out of step with global batch {self._batch}")
                pieces.append(piece)
            micro_batches = self._micro_batches(pieces)
            for piece in pieces:
                self._skip_latest.update(piece["__skipped__"])
            for a in range(self._micro, self.accumulation):
                if a + 1 == self.accumulation:  # the whole global batch is handed out: the position moves on
                    self._batch, self._micro = self._batch + 1, 0
                    for piece in pieces:
                        self._lanes.update(piece["__lanes__"])
                else:
                    self._micro = a + 1
                batch = micro_batches(a)
                if self.pin_memory:
                    batch = {k: v.pin_memory() if torch.is_tensor(v) else v for k, v in batch.items()}
                if self.stream.bucketed:
                    self.bucket_counts[bucket_of(batch)] += len(batch["key"])
                yield batch

    def _micro_batches(self, pieces: list[dict]):
        """micro-batch index -> this rank's micro-batch of the global batch the workers' pieces make up."""
        m = self.micro_batch
        if self.stream.bucketed:  # each micro-batch came whole from one lane, keyed by its first position
            blocks = {p: block for piece in pieces for p, block in piece["samples"].items()}
            return lambda a: blocks[self.stream.positions[a * m]]
        positions = [p for piece in pieces for p in piece["__positions__"]]
        batch = _merge([piece["samples"] for piece in pieces], sorted(range(len(positions)),
                                                                      key=positions.__getitem__))
        return lambda a: _rows(batch, a * m, (a + 1) * m)


def build_global_loader(urls: list[str], *, decoder, global_batch: int, micro_batch: int, rank: int,
                        world_size: int, num_workers: int, seed: int, shuffle_buffer: int, resample: bool,
                        lanes: int | None = None, pin_memory: bool = False,
                        policy: RetryPolicy | None = None, buckets: list | None = None) -> GlobalLoader:
    """The training loader: this rank's micro-batches of the one global sample order (module doc). `buckets`:
    the bucket shapes the decoder resizes to (data.buckets), each micro-batch of one of them; None: square."""
    if global_batch % (micro_batch * world_size):
        raise ValueError(f"global batch {global_batch} is not a multiple of micro-batch {micro_batch} x "
                         f"{world_size} processes")
    count = lanes or min(global_batch, len(urls))
    if buckets is not None:  # one lane per micro-batch of the global batch (module doc)
        count = global_batch // micro_batch
        if lanes is not None and lanes != count:
            raise ValueError(f"data.lanes={lanes} with data.buckets: each lane fills one micro-batch, so the lanes "
                             f"are trainer.batch_size / micro-batch = {count}; leave data.lanes null")
        if count > len(urls) and not resample:
            raise ValueError(f"data.buckets reads {count} lanes (one per micro-batch of {micro_batch} in the global "
                             f"batch of {global_batch}) but there are {len(urls)} shard(s): write more shards, raise "
                             f"trainer.micro_batch_size or set data.resample=true")
    if not 1 <= count <= global_batch:
        raise ValueError(f"data.lanes={lanes} must be between 1 and the global batch ({global_batch})")
    if count > len(urls) and not resample:
        raise ValueError(f"data.lanes={count} > {len(urls)} shard(s): a lane would have no shard; write more "
                         "shards, lower data.lanes or set data.resample=true")
    positions = rank_positions(rank, world_size, micro_batch, global_batch // (micro_batch * world_size))
    stream = LaneStream(urls, decoder=decoder, global_batch=global_batch, lanes=count, positions=positions,
                        workers=max(1, num_workers), seed=seed, shuffle=True, shuffle_buffer=shuffle_buffer,
                        resample=resample, policy=policy, bucketed=buckets is not None)
    return GlobalLoader(stream, micro_batch=micro_batch, num_workers=num_workers, pin_memory=pin_memory,
                        buckets=buckets)
