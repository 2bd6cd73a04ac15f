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
    the samples at this worker's positions of one global batch, collated, plus where its lanes stand."""

    def __init__(self, urls, *, decoder, global_batch, lanes, positions, workers, seed, shuffle, shuffle_buffer,
                 resample, policy: RetryPolicy | None = None):
        super().__init__()
        self.urls, self.decoder, self.global_batch, self.lanes = urls, decoder, global_batch, lanes
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

    def _pieces(self, worker: int):
        lanes = self.rank_lanes[worker :: self.workers]
        counters = {l: SkipCounter(worker) for l in lanes}
        streams = {l: self.lane(l, *self.start["lanes"].get(l, (0, 0)), counters[l]) for l in lanes}
        wanted = {l: [(p, p - lane_start(l, self.lanes, self.global_batch)) for p in self.positions
                      if lane_of(p, self.lanes, self.global_batch) == l] for l in lanes}
        states = {}
        for batch in itertools.count(self.start["batch"]):
            taken = []
            for l in lanes:
                size = lane_start(l + 1, self.lanes, self.global_batch) - lane_start(l, self.lanes, self.global_batch)
                block = [next(streams[l]) for _ in range(size)]
                taken += [(p, block[offset][0]) for p, offset in wanted[l]]
                states[l] = block[-1][1]
            taken.sort(key=lambda item: item[0])
            yield {"__worker__": worker, "__batch__": batch, "__positions__": [p for p, _ in taken],
                   "samples": collate([s for _, s in taken]), "__lanes__": dict(states),
                   "__skipped__": {l: dict(c.counts) for l, c in counters.items()}}


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


class GlobalLoader:
    """Micro-batches of this rank, in the loop's order, with a position any process count can resume."""

    def __init__(self, stream: LaneStream, *, micro_batch: int, num_workers: int, pin_memory: bool = False):
        self.stream, self.micro_batch, self.pin_memory = stream, micro_batch, pin_memory
        self.num_workers = 0 if num_workers == 0 else stream.workers
        self.accumulation = len(stream.positions) // micro_batch
        self._batch, self._micro, self._lanes = 0, 0, {}
        self._skip_base = {l: dict.fromkeys(SKIP_KINDS, 0) for l in stream.rank_lanes}
        self._skip_latest: dict[int, dict[str, int]] = {}

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

    def state_dict(self) -> dict:
        s = self.stream
        return {"order": "lanes", "batch": self._batch, "micro": self._micro,
                "lanes": {l: list(v) for l, v in self._lanes.items()}, "skipped": self._lane_skips(),
                "lane_count": s.lanes, "global_batch": s.global_batch, "seed": s.seed, "shards": len(s.urls)}

    def load_state_dict(self, states: dict | list[dict]) -> None:
        """Resume from the states EVERY rank saved (any number of ranks): they are merged by lane."""
        states = [states] if isinstance(states, dict) else list(states)
        s = self.stream
        layout = {"lane_count": s.lanes, "global_batch": s.global_batch, "seed": s.seed, "shards": len(s.urls)}
        for state in states:
            changed = {k: (state.get(k), v) for k, v in layout.items() if state.get(k) != v}
            if state.get("order") != "lanes" or changed:
                raise ValueError(f"the sample order changed since the checkpoint (saved, now): "
                                 f"{changed or 'an older position format'}")
        if len({(st["batch"], st["micro"]) for st in states}) != 1:
            raise ValueError(f"the ranks saved different positions: {sorted({st['batch'] for st in states})}")
        lanes, skips = {}, {}
        for state in states:
            lanes.update({int(l): tuple(v) for l, v in state["lanes"].items()})
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
            positions = [p for piece in pieces for p in piece["__positions__"]]
            batch = _merge([piece["samples"] for piece in pieces], sorted(range(len(positions)),
                                                                          key=positions.__getitem__))
            if self.pin_memory:
                batch = {k: v.pin_memory() if torch.is_tensor(v) else v for k, v in batch.items()}
            for piece in pieces:
                self._skip_latest.update(piece["__skipped__"])
            m = self.micro_batch
            for a in range(self._micro, self.accumulation):
                if a + 1 == self.accumulation:  # the whole global batch is handed out: the position moves on
                    self._batch, self._micro = self._batch + 1, 0
                    for piece in pieces:
                        self._lanes.update(piece["__lanes__"])
                else:
                    self._micro = a + 1
                yield _rows(batch, a * m, (a + 1) * m)


def build_global_loader(urls: list[str], *, decoder, global_batch: int, micro_batch: int, rank: int,
                        world_size: int, num_workers: int, seed: int, shuffle_buffer: int, resample: bool,
                        lanes: int | None = None, pin_memory: bool = False,
                        policy: RetryPolicy | None = None) -> GlobalLoader:
    """The training loader: this rank's micro-batches of the one global sample order (module doc)."""
    if global_batch % (micro_batch * world_size):
        raise ValueError(f"global batch {global_batch} is not a multiple of micro-batch {micro_batch} x "
                         f"{world_size} processes")
    count = lanes or min(global_batch, len(urls))
    if not 1 <= count <= global_batch:
        raise ValueError(f"data.lanes={lanes} must be between 1 and the global batch ({global_batch})")
    if count > len(urls) and not resample:
        raise ValueError(f"data.lanes={count} > {len(urls)} shard(s): a lane would have no shard; write more "
                         "shards, lower data.lanes or set data.resample=true")
    positions = rank_positions(rank, world_size, micro_batch, global_batch // (micro_batch * world_size))
    stream = LaneStream(urls, decoder=decoder, global_batch=global_batch, lanes=count, positions=positions,
                        workers=max(1, num_workers), seed=seed, shuffle=True, shuffle_buffer=shuffle_buffer,
                        resample=resample, policy=policy)
    return GlobalLoader(stream, micro_batch=micro_batch, num_workers=num_workers, pin_memory=pin_memory)
