"""Few-shot episodes from shards: the streaming training sampler, the fixed seeded evaluation list, the bank pass.

An episode is a dict (docs/PROTOCOL.md):
    query_img [3,S,S] uint8, query_mask [S,S] uint8 (0/1/255), support_imgs [K,3,S,S] uint8,
    support_masks [K,S,S] uint8, class_id int, query_key / support_keys (record keys);
    evaluation adds query_label [h,w] uint8 (the original-size binary label, 0/1/255) and `episode` (its position).
Images stay uint8 across the loader's worker boundary; the run normalises them on the device with the
backbone's own mean and std.

Protocols (`data.protocol`, docs/PROTOCOL.md):
    pfenet (default, the paper follows PFENet): an image is a query when some fold class covers >= min_pixels in
        it; its class is drawn among the fold classes present in it; one episode per image (an epoch of training,
        a walk over the validation list in order for evaluation).
    hsnet: one training episode per usable (image, class) pair; evaluation classes uniform over the fold.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Sequence

import cv2
import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, Dataset, get_worker_info

from jc2a.config import TRUSTED_SOURCES, DataConfig, where_set
from jc2a.data.locations import ShardSet
from jc2a.data.records import MAX_IMAGE_PIXELS, binarize, decode_record
from jc2a.data.transforms import eval_transform, train_transform
from jc2a.errors import RecordError, StreamError, UserError
from jc2a.folds import base_classes, novel_classes
from jc2a.labels import IGNORE_INDEX

log = logging.getLogger("jc2a.data")

PROTOCOLS = ("pfenet", "hsnet")

# SeedSequence spawn keys: one independent stream per purpose, so no two purposes ever share a generator.
_KEY_SHARDS, _KEY_SHUFFLE, _KEY_CLASS, _KEY_POOL, _KEY_EPISODE = range(5)


@dataclass(frozen=True)
class Episode:
    """One evaluation episode: a class, the query's and the K supports' record positions in the index."""

    class_id: int
    query: int
    supports: tuple[int, ...]


def _seeds(entropy: Sequence[int], *key: int) -> np.random.SeedSequence:
    """The SeedSequence of `entropy` (non-negative ints) for purpose `key` (its spawn key)."""
    return np.random.SeedSequence([int(e) & 0xFFFFFFFF for e in entropy], spawn_key=tuple(int(k) for k in key))


def _rng(entropy: Sequence[int], *key: int) -> np.random.Generator:
    return np.random.default_rng(_seeds(entropy, *key))


def _py_random(entropy: Sequence[int], *key: int) -> random.Random:
    return random.Random(int(_seeds(entropy, *key).generate_state(2, np.uint64)[0]))


def stack_episode(query: tuple, supports: list[tuple], class_id: int) -> dict:
    """Episode dict from transformed (image, mask) pairs of the query and the supports."""
    return {
        "query_img": query[0],
        "query_mask": query[1],
        "support_imgs": torch.stack([s[0] for s in supports]),
        "support_masks": torch.stack([s[1] for s in supports]),
        "class_id": class_id,
    }


def collate(episodes: Sequence[dict]) -> dict:
    """Batch episodes: tensors of equal shape are stacked, anything else (original-size labels, keys) listed."""
    out = {}
    for key in episodes[0]:
        values = [e[key] for e in episodes]
        if isinstance(values[0], torch.Tensor) and all(v.shape == values[0].shape for v in values):
            out[key] = torch.stack(values)
        elif isinstance(values[0], int):
            out[key] = torch.tensor(values)
        else:
            out[key] = values
    return out


def default_rank_world() -> tuple[int, int]:
    """(rank, world) of torch.distributed when it is initialised (accelerate, torchrun), else (0, 1)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _present(classes: dict, fold: set[int]) -> list[int]:
    """Fold classes present in a record (any size), ascending."""
    return sorted(int(k) for k in classes if int(k) in fold)


def _usable(classes: dict, fold: set[int], min_pixels: int) -> list[int]:
    """Fold classes covering at least `min_pixels` pixels of a record, ascending."""
    return sorted(int(k) for k, n in classes.items() if int(k) in fold and n >= min_pixels)


def servable_classes(shards: ShardSet, classes: Sequence[int], shot: int, min_pixels: int) -> list[int]:
    """Classes with at least `shot + 1` usable images: a query and K distinct other supports can be found."""
    return [c for c in classes if len(shards.usable(c, min_pixels)) >= shot + 1]


# --------------------------------------------------------------------------- evaluation


def eval_episode_list(
    shards: ShardSet,
    classes: Sequence[int],
    shot: int,
    episodes: int,
    seed: int,
    min_pixels: int,
    protocol: str = "pfenet",
) -> list[Episode]:
    """The fixed episode list of a fold, from `seed` alone: never from processes or workers.

    pfenet (PFENet's test.py): walk the qualifying images (a fold class covers >= min_pixels) in index order, over
    and over as needed; per image the class is drawn among the fold classes present in it (any size) that have
    `shot` usable images besides it. hsnet: class uniform over the fold's classes, query uniform among its usable
    images. Either way the class/query draw has a generator of its own and each episode's supports another
    (SeedSequence spawn keys), so the 1- and 5-shot lists share their queries wherever every class drawn has 5
    usable images besides the query, and a shorter list is a prefix of a longer one.
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown episode protocol {protocol!r}: expected one of {', '.join(PROTOCOLS)}")
    fold = set(int(c) for c in classes)
    usable = {c: shards.usable(c, min_pixels) for c in sorted(fold)}
    kept = [c for c in sorted(fold) if len(usable[c]) >= shot + 1]
    dropped = sorted(fold - set(kept))
    if dropped:
        log.warning(
            "%s: classes %s have fewer than %d usable images (>= %d pixels) and get no episode",
            shards.index_url, dropped, shot + 1, min_pixels,
        )  # fmt: skip
    if not kept:
        raise UserError(
            f"{shards.index_url}: no class of {sorted(fold)} has {shot + 1} images with >= {min_pixels} pixels"
        )
    draw = _rng([seed], _KEY_CLASS)

    def supports(i: int, class_id: int, query: int) -> tuple[int, ...]:
        others = usable[class_id][usable[class_id] != query]
        picks = _rng([seed], _KEY_EPISODE, i).choice(others, size=shot, replace=False)
        return tuple(int(p) for p in picks)

    out: list[Episode] = []
    if protocol == "hsnet":
        for i in range(episodes):
            class_id = kept[int(draw.integers(len(kept)))]
            pool = usable[class_id]
            query = int(pool[draw.integers(len(pool))])
            out.append(Episode(class_id, query, supports(i, class_id, query)))
        return out

    servable = set(kept)
    queries = [
        (i, [c for c in _present(r["classes"], servable) if len(usable[c]) - int(i in set(usable[c])) >= shot])
        for i, r in enumerate(shards.records)
        if _usable(r["classes"], fold, min_pixels)
    ]
    queries = [(i, cands) for i, cands in queries if cands]
    if not queries:
        raise UserError(f"{shards.index_url}: no image can be a query of {sorted(fold)} with {shot} supports")
    while len(out) < episodes:
        for position, candidates in queries:
            if len(out) == episodes:
                break
            class_id = candidates[int(draw.integers(len(candidates)))]
            out.append(Episode(class_id, position, supports(len(out), class_id, position)))
    return out


def share(count: int, rank: int, world: int) -> list[int]:
    """The positions of a list of `count` items that rank `rank` of `world` handles (disjoint, covering)."""
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} outside a world of {world}")
    return list(range(rank, count, world))


class EvalEpisodes(Dataset):
    """A rank's share of an evaluation episode list, read by random access into the shards.

    Args:
        shards: the evaluation split.
        episodes: the whole fold list (`eval_episode_list`).
        size: input size S (PFENet's evaluation canvas).
        rank, world: this process's share.
        resize: the canvas, `resize` (PFENet's configs) or `test_resize` (`data.eval_resize`).
        max_pixels: the largest image or label decoded (`data.max_image_pixels`), checked from its header.
    """

    def __init__(
        self,
        shards: ShardSet,
        episodes: Sequence[Episode],
        size: int,
        rank: int = 0,
        world: int = 1,
        resize: str = "resize",
        max_pixels: int = MAX_IMAGE_PIXELS,
    ) -> None:
        self.shards, self.episodes = shards, list(episodes)
        self.positions = share(len(self.episodes), rank, world)
        self.transform = eval_transform(size, resize)
        self.max_pixels = max_pixels

    def __len__(self) -> int:
        return len(self.positions)

    def _load(self, position: int, class_id: int) -> tuple[np.ndarray, np.ndarray]:
        image, label, _ = decode_record(self.shards.read(position), max_pixels=self.max_pixels)
        return image, binarize(label, class_id)

    def __getitem__(self, i: int) -> dict:
        ep = self.episodes[self.positions[i]]
        image, label = self._load(ep.query, ep.class_id)
        supports = [self.transform(*self._load(s, ep.class_id)) for s in ep.supports]
        out = stack_episode(self.transform(image, label), supports, ep.class_id)
        out["query_label"] = torch.from_numpy(label)
        out["episode"] = self.positions[i]
        out["query_key"] = self.shards.records[ep.query]["key"]
        out["support_keys"] = [self.shards.records[s]["key"] for s in ep.supports]
        return out


class BankImages(Dataset):
    """A rank's share of the training images that hold a usable fold class: CKMM's bank pass (Eqs. 11-12).

    Each item is one image on the evaluation canvas (`resize`, as queries are seen) with its full label (class ids,
    255 ignore) and the usable classes, so the backbone runs once per image however many classes it holds:
    `{"image": [3,S,S] uint8, "label": [S,S] uint8, "classes": [int], "key": str}`.
    """

    def __init__(
        self,
        shards: ShardSet,
        classes: Sequence[int],
        min_pixels: int,
        size: int,
        rank: int = 0,
        world: int = 1,
        resize: str = "resize",
        max_pixels: int = MAX_IMAGE_PIXELS,
    ) -> None:
        fold = set(int(c) for c in classes)
        self.shards, self.max_pixels = shards, max_pixels
        self.items = [(i, cs) for i, r in enumerate(shards.records) if (cs := _usable(r["classes"], fold, min_pixels))]
        self.positions = share(len(self.items), rank, world)
        self.transform = eval_transform(size, resize)

    def __len__(self) -> int:
        return len(self.positions)

    def instances(self) -> int:
        """(image, class) instances over every rank."""
        return sum(len(cs) for _, cs in self.items)

    def __getitem__(self, i: int) -> dict:
        """The item; a record that cannot be decoded is skipped (an item with no classes, `skipped` 1, and a
        warning naming it), as the training stream skips it: one whose image or label is larger than the pixel
        limit too, from its header, before it is decoded."""
        position, classes = self.items[self.positions[i]]
        key = self.shards.records[position]["key"]
        try:
            image, label, _ = decode_record(self.shards.read(position), max_pixels=self.max_pixels)
        except RecordError as exc:
            log.warning("CKMM bank: skipped %s", exc)
            size = self.transform.transforms[0].size
            image, label = torch.zeros(3, size, size, dtype=torch.uint8), torch.full((size, size), IGNORE_INDEX)
            return {"image": image, "label": label.to(torch.uint8), "classes": [], "key": key, "skipped": 1}
        image, label = self.transform(image, label)
        return {"image": image, "label": label, "classes": list(classes), "key": key, "skipped": 0}


# --------------------------------------------------------------------------- training


def qualifying_images(
    shards: ShardSet, classes: Sequence[int], min_pixels: int, exclude: Sequence[int] = ()
) -> list[int]:
    """Positions of the images where some class of `classes` covers >= min_pixels and no class of `exclude` is
    present (BAM's filter of training images holding novel-class pixels, when `exclude` is given)."""
    fold, banned = set(int(c) for c in classes), {str(int(c)) for c in exclude}
    return [
        i
        for i, r in enumerate(shards.records)
        if _usable(r["classes"], fold, min_pixels) and not banned.intersection(r["classes"])
    ]


class ResampledShards(wds.ResampledShards):
    """webdataset's ResampledShards (`{"url"}` of shards drawn with replacement, endlessly) seeded as jc2a seeds.

    Every worker of every rank draws from *all* shards (no split by rank or worker: no shard is over-weighted,
    whatever the split), from `random.Random` seeded by the SeedSequence of its stream's `entropy()`, (seed, epoch,
    rank, role), with the shards' spawn key, where webdataset would mix its own worker seed and epoch counter.
    """

    def __init__(self, urls: Sequence[str], entropy: Callable[[], list[int]]) -> None:
        super().__init__(list(urls))
        self.entropy = entropy

    def __iter__(self) -> Iterator[dict]:
        self.rng = _py_random(self.entropy(), _KEY_SHARDS)
        for _ in range(self.nshards):
            yield {"url": self.urls[self.rng.randint(0, len(self.urls) - 1)]}


_MEMBERS = ("__key__", "__url__", "jpg", "png", "json")  # what an episode keeps of a sample
LOADER_MARGIN = 30.0  # seconds a loader worker gets beyond its batch's share of the stream's bound
_tar_files = wds.pipelinefilter(wds.tariterators.tar_file_expander)  # webdataset's stages: tar streams -> members
_samples = wds.pipelinefilter(wds.tariterators.group_by_keys)  # members -> samples (`__key__`, `json`, `jpg`, ...)


class TrainEpisodes(wds.DataPipeline):
    """An endless stream of training episodes over the base classes: a webdataset pipeline of resampled shards.

    pfenet: a record is a query when some base class covers >= min_pixels in it (and, with `exclude`, no novel
    class is present); its class is drawn among the base classes present (any size) that have `shot + 1` usable
    images in the split. hsnet: every usable (record, class) pair is a query. The K supports are K distinct other
    records where the class is usable, from a bounded pool the same stream fills (an item whose class has fewer
    than K others in the pool yet is dropped; the shuffle buffer fills the pools before the first episode).

    Reproducible: the stream of (seed, epoch, rank, role) is fixed; each purpose (shard choice, shuffle, class
    draw, pool replacement, each episode's supports and augmentation) has its own SeedSequence spawn key.
    `start` episodes of this stream can be skipped without decoding or augmenting them (exact resume).

    Bounded: the stream raises StreamError, naming the split and location, after `max_failures` consecutive
    unreadable shards or records, or `timeout` seconds without an episode, whatever the cause: the bound is
    checked before each shard is opened and between samples, and a remote shard's download (its tries and
    back-off waits) ends by the bound's deadline. Records that fail to decode, or whose image or label declares
    more than `max_pixels` pixels, are skipped and counted (`self.skipped`, and a warning naming the record and
    its shard).

    Args:
        shards: the training split.
        classes: the base classes; other classes are background.
        shot: K.
        min_pixels: smallest target area of a usable pair.
        transform: `t(image, label, rng) -> (img [3,S,S], mask [S,S])`.
        protocol: `pfenet` or `hsnet`.
        exclude: classes whose presence drops a record (`data.filter_novel`: the novel classes).
        pool_size: support candidates kept per class.
        shuffle_buffer: items in the shuffle buffer.
        seed: the run's seed.
        rank, world: this process; default torch.distributed's when it is initialised, else 0 of 1.
        timeout, max_failures: the stream's bounds.
        max_pixels: the largest image or label decoded (`data.max_image_pixels`).
    """

    def __init__(
        self,
        shards: ShardSet,
        classes: Sequence[int],
        shot: int,
        min_pixels: int,
        transform,
        *,
        protocol: str = "pfenet",
        exclude: Sequence[int] = (),
        pool_size: int = 32,
        shuffle_buffer: int = 256,
        seed: int = 0,
        rank: Optional[int] = None,
        world: Optional[int] = None,
        timeout: float = 60.0,
        max_failures: int = 20,
        max_pixels: int = MAX_IMAGE_PIXELS,
    ) -> None:
        if protocol not in PROTOCOLS:
            raise ValueError(f"unknown episode protocol {protocol!r}: expected one of {', '.join(PROTOCOLS)}")
        if pool_size < shot:
            raise ValueError(f"data.support_pool ({pool_size}) must be >= data.shot ({shot})")
        if rank is None or world is None:
            rank, world = default_rank_world()
        self.where = f"split {shards.split!r} at {shards.location}"
        servable = servable_classes(shards, classes, shot, min_pixels)
        if not servable:
            raise StreamError(
                f"{self.where}: no episode can be formed: no class of {sorted(classes)} has {shot + 1} images "
                f"with >= {min_pixels} pixels"
            )
        self.shards = shards
        self.urls = list(shards.urls)
        self.fold = set(int(c) for c in classes)
        self.servable = set(servable)
        self.exclude = {str(int(c)) for c in exclude}
        self.shot, self.min_pixels, self.transform = shot, min_pixels, transform
        self.protocol, self.pool_size, self.shuffle_buffer = protocol, pool_size, shuffle_buffer
        self.seed, self.rank, self.world = seed, rank, world
        self.timeout, self.max_failures, self.max_pixels = timeout, max_failures, max_pixels
        self.epoch = 0
        self.start = 0  # episodes of this stream (all workers of this rank) to skip: set by EpisodeLoader
        self.batch_size = 1
        self.skipped: Counter = Counter()  # in this process; across workers see EpisodeLoader.skipped_records
        self._shard_of = {url: i for i, url in enumerate(self.urls)}
        self._pools: dict[int, list[dict]] = {}
        self._unreported, self._failures, self._last, self._progress = 0, 0, "", 0.0
        super().__init__(
            ResampledShards(self.urls, self.entropy),  # all shards with replacement, seeded (seed, epoch, rank, role)
            self._open,  # the local file of each; a remote shard through the verified cache
            _tar_files(handler=self._tar_error),  # tar -> members (webdataset); unreadable data skipped, counted
            _samples(handler=self._tar_error),  # members -> samples by key (webdataset)
            self._watch,  # bound: StreamError after data.stream_timeout s without an episode
            self._headers,  # json headers only: usable and present classes; images wait for the episode
            self._pool,  # per-class pools of support candidates
            self._items,  # (sample, class) items: pfenet one class drawn per query, hsnet every usable pair
            self._shuffle,  # webdataset's shuffle buffer
            self._episodes,  # an episode once its class's pool holds K records other than the query
            self._resume,  # exact resume: the episodes of this worker's (rotated) role before `start`, undecoded
            self._decode,  # K supports drawn; query and supports decoded, binary for the class
            self._augment,  # augmentation, one generator per episode; stacked
            self._delivered,  # bound: consecutive failures reset; skips reported with the episode
        )  # fmt: skip

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    # ------------------------------------------------------------------ this worker's place

    def place(self) -> tuple[int, int, int]:
        """(role, workers, skip): which worker's stream this process plays, and how many of its episodes to skip.

        A resumed loader rotates the roles so that its first batch comes from the stream that would have given the
        next batch (PyTorch takes batches from the workers in turn); the role's episodes that went into the first
        `start` episodes of this rank are skipped."""
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info else (1, 0)
        batches = self.start // self.batch_size
        role = (worker + batches) % workers
        return role, workers, len(range(role, batches, workers)) * self.batch_size

    def entropy(self) -> list[int]:
        """The entropy of this worker's stream: (seed, epoch, rank, role)."""
        return [self.seed, self.epoch, self.rank, self.place()[0]]

    # ------------------------------------------------------------------ bounds

    def _fail(self, kind: str, reason: object) -> None:
        self.skipped[kind] += 1
        self._unreported += 1
        self._failures += 1
        self._last = str(reason)
        log.warning("skipped %s", reason)
        if self._failures >= self.max_failures:
            raise StreamError(
                f"{self.where}: {self._failures} consecutive unreadable shards or records (last: {self._last})"
            )

    def _tar_error(self, exn: Exception) -> bool:
        self._fail("tar", f"unreadable shard data: {exn}")
        return True

    def _check_time(self) -> None:
        """StreamError once `timeout` seconds have passed without an episode."""
        if time.monotonic() - self._progress > self.timeout:
            raise StreamError(
                f"{self.where}: no episode for {self.timeout:g} s (data.stream_timeout)"
                + (f"; last problem: {self._last}" if self._last else "")
            )

    def _watch(self, samples: Iterator[dict]) -> Iterator[dict]:
        for sample in samples:
            self._check_time()
            yield sample

    def _delivered(self, episodes: Iterator[dict]) -> Iterator[dict]:
        """The last stage, so the first to run: the bounds start with the stream."""
        self._unreported, self._failures, self._last, self._progress = 0, 0, "", time.monotonic()
        for episode in episodes:
            episode["skipped_records"], self._unreported = self._unreported, 0  # summed by EpisodeLoader
            self._failures, self._last, self._progress = 0, "", time.monotonic()
            yield episode
            self._progress = time.monotonic()  # time spent waiting for the consumer (a slow step) does not count

    # ------------------------------------------------------------------ stages

    def _open(self, shards: Iterator[dict]) -> Iterator[dict]:
        """`{"url", "stream"}` of each shard: the local file, or for a remote shard a copy in the cache fetched
        with the ShardSet's timeout, bounded retries and checksum (a stalled server fails, never hangs), all of it
        ended by the stream's own deadline (`data.stream_timeout` after the last episode)."""
        for source in shards:
            self._check_time()
            url = source["url"]
            try:
                deadline = self._progress + self.timeout
                stream = open(self.shards.local_path(self._shard_of[url], deadline=deadline), "rb")
            except (OSError, ValueError) as exc:
                self._tar_error(exc if url in str(exc) else type(exc)(f"{url}: {exc}"))
                continue
            with stream:
                yield {"url": url, "stream": stream}

    def _headers(self, samples: Iterator[dict]) -> Iterator[tuple[dict, list[int], list[int]]]:
        """(raw sample, usable classes, present servable classes) of the qualifying records; images are decoded
        only when an item becomes an episode."""
        for sample in samples:
            name = f"record {sample.get('__key__')} of {sample.get('__url__')}"
            try:
                classes = json.loads(sample["json"])["classes"]
                usable = _usable(classes, self.fold, self.min_pixels)
                present = _present(classes, self.servable)
            except (KeyError, ValueError, AttributeError, TypeError, RecursionError) as exc:
                why = "nested too deep" if isinstance(exc, RecursionError) else exc
                self._fail("record", f"{name}: bad or missing json header ({why})")
                continue
            if usable and not self.exclude.intersection(classes):
                yield {k: sample[k] for k in _MEMBERS if k in sample}, usable, present

    def _pool(self, records: Iterator[tuple]) -> Iterator[tuple]:
        """Every qualifying record joins the pool of each class usable in it; a full pool replaces at random."""
        self._pools = {}
        replace = _rng(self.entropy(), _KEY_POOL)
        for raw, usable, present in records:
            for class_id in usable:
                pool = self._pools.setdefault(class_id, [])
                if any(s["__key__"] == raw["__key__"] for s in pool):
                    continue
                if len(pool) < self.pool_size:
                    pool.append(raw)
                else:
                    pool[int(replace.integers(len(pool)))] = raw
            yield raw, usable, present

    def _items(self, records: Iterator[tuple]) -> Iterator[tuple[dict, int]]:
        draw = _rng(self.entropy(), _KEY_CLASS)
        for raw, usable, present in records:
            if self.protocol == "hsnet":
                yield from ((raw, class_id) for class_id in usable if class_id in self.servable)
            elif present:
                yield raw, present[int(draw.integers(len(present)))]

    def _shuffle(self, items: Iterator[tuple]) -> Iterator[tuple]:
        rng = _py_random(self.entropy(), _KEY_SHUFFLE)
        return wds.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer // 2, rng=rng)(items)

    def _episodes(self, items: Iterator[tuple]) -> Iterator[tuple]:
        """(n, query, the pool's others, class): n counts the items that reached this stage, the episode's key."""
        for n, (raw, class_id) in enumerate(items, start=1):
            others = [s for s in self._pools.get(class_id, []) if s["__key__"] != raw["__key__"]]
            if len(others) >= self.shot:  # else the class's pool is still filling
                yield n, raw, others, class_id

    def _resume(self, episodes: Iterator[tuple]) -> Iterator[tuple]:
        skip = self.place()[2]
        for episode in episodes:
            if skip > 0:  # resumed: this episode went into a step before the checkpoint
                skip -= 1
                self._progress = time.monotonic()
                continue
            yield episode

    def _decode(self, episodes: Iterator[tuple]) -> Iterator[dict]:
        entropy = self.entropy()
        for n, raw, others, class_id in episodes:
            rng = _rng(entropy, _KEY_EPISODE, n)
            supports = [others[p] for p in rng.choice(len(others), size=self.shot, replace=False)]
            try:
                pairs = [decode_record(s, max_pixels=self.max_pixels)[:2] for s in (raw, *supports)]
            except RecordError as exc:
                self._fail("record", exc)
                continue
            pairs = [(image, binarize(label, class_id)) for image, label in pairs]
            keys = [s["__key__"] for s in supports]
            yield {"pairs": pairs, "class_id": class_id, "rng": rng, "query_key": raw["__key__"], "support_keys": keys}

    def _augment(self, episodes: Iterator[dict]) -> Iterator[dict]:
        for e in episodes:
            query, *supports = (self.transform(image, label, e["rng"]) for image, label in e["pairs"])
            out = stack_episode(query, supports, e["class_id"])
            out["query_key"], out["support_keys"] = e["query_key"], e["support_keys"]
            yield out


# --------------------------------------------------------------------------- loaders


class EpisodeLoader(wds.WebLoader):
    """webdataset's WebLoader (a DataLoader as the first stage of a pipeline) over a TrainEpisodes stream:
    `batches` batches an epoch (webdataset's `with_epoch`), resumable.

    `set_epoch(e, start=n)` before iterating gives epoch `e` its own reproducible draw and skips its first `n`
    batches exactly as they were drawn (a resumed run continues where it stopped). `skipped_records` counts the
    records the stream skipped (unreadable, or a broken header) in every worker since the loader was made.

    With loader workers, a worker that gives no batch for `batch_size` x the stream's timeout (+ LOADER_MARGIN s)
    is a StreamError too (the DataLoader's own timeout): a worker stuck where the stream cannot look at its clock
    (a hung file system, say) still ends the stream. Not in an epoch resumed mid-way (`set_epoch(e, start > 0)`),
    whose first batch skips the episodes before `start` first.
    """

    def __init__(self, dataset: TrainEpisodes, batches: int, batch_size: int, **loader_args) -> None:
        if loader_args.get("num_workers", 0) > 0 and not loader_args.get("timeout"):
            loader_args["timeout"] = batch_size * dataset.timeout + LOADER_MARGIN
        self.loader_timeout = loader_args.get("timeout", 0)
        super().__init__(dataset, batch_size=batch_size, **loader_args)  # batches from the workers in turn
        self.loader_timeout = self.pipeline[0].timeout
        self.append(self._count_skips)  # the skips of every worker, summed
        dataset.batch_size = batch_size
        self.stream, self.batches = dataset, batches
        self.skipped_records = 0
        self.set_epoch(0)

    @property
    def pin_memory(self) -> bool:
        return self.pipeline[0].pin_memory

    @pin_memory.setter
    def pin_memory(self, value: bool) -> None:
        self.pipeline[0].pin_memory = value

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        if not 0 <= start <= self.batches:
            raise ValueError(f"start batch {start} outside an epoch of {self.batches} batches")
        self.stream.set_epoch(epoch)
        self.start = start
        self.stream.start = start * self.stream.batch_size
        self.with_epoch(self.batches - start)
        # a resumed epoch's first batch first skips `start` batches' episodes (undecoded, yet read): no bound of
        # one batch's time holds for it, so the workers' timeout is off for that epoch (the stream's own stays)
        self.pipeline[0].timeout = self.loader_timeout if start == 0 else 0

    def _count_skips(self, batches: Iterator[dict]) -> Iterator[dict]:
        for batch in batches:
            self.skipped_records += int(batch.pop("skipped_records").sum())
            yield batch

    def __iter__(self) -> Iterator[dict]:
        if self.start < self.batches:  # with_epoch(0) would not end
            try:
                yield from super().__iter__()  # the workers stop when the epoch's iterator is let go
            except RuntimeError as exc:
                if "DataLoader timed out" not in str(exc):
                    raise
                raise StreamError(
                    f"{self.stream.where}: no batch from a loader worker for {self.loader_timeout:g} s "
                    f"({self.stream.batch_size} episodes x data.stream_timeout + {LOADER_MARGIN:g} s)"
                ) from None
        self.set_epoch(self.stream.epoch, 0)

    def __len__(self) -> int:
        return self.batches


def _own_generator() -> torch.Generator:
    """A DataLoader draws a base seed for its workers at every iterator; from its own generator it leaves the
    global torch RNG (dropout, P2B ties) alone, so a resumed run draws what an uninterrupted one draws. The
    episodes do not depend on it: every stream seeds itself from (seed, epoch, rank, worker)."""
    return torch.Generator().manual_seed(0)


def _loader_threads(workers: int) -> None:
    """One cv2 thread in loader workers: set before they fork (cv2.setNumThreads inside a forked worker can
    hang); PyTorch already gives each worker one torch thread."""
    if workers > 0:
        cv2.setNumThreads(1)


def _loader(dataset: Dataset, data: DataConfig, batch_size: int) -> DataLoader:
    _loader_threads(data.num_workers)
    return DataLoader(
        dataset, batch_size=batch_size, num_workers=data.num_workers, collate_fn=collate, generator=_own_generator()
    )


def train_loader(
    data: DataConfig,
    seed: int,
    batch_size: int,
    mean: Sequence[float],
    rank: Optional[int] = None,
    world: Optional[int] = None,
    shards: Optional[ShardSet] = None,
) -> EpisodeLoader:
    """The training loader of a rank: a fixed number of batches per epoch.

    Episodes per epoch (over all ranks) are `data.episodes_per_epoch`, or the qualifying training images (pfenet;
    usable pairs for hsnet) when 0; each rank yields ceil(episodes / (world * batch_size)) batches. `seed` is the
    run's (`train.seed`), `batch_size` the rank's (`train.batch_size`), `mean` the backbone's, for the padding
    colour. Call `loader.set_epoch(e)` before each epoch.
    """
    if rank is None or world is None:
        rank, world = default_rank_world()
    shards = shards or open_shards(data, data.train_split)
    exclude = novel_classes(data.dataset, data.fold) if data.filter_novel else ()
    dataset = TrainEpisodes(
        shards,
        base_classes(data.dataset, data.fold),
        data.shot,
        data.min_pixels,
        train_transform(data.augment, data.image_size, mean),
        protocol=data.protocol,
        exclude=exclude,
        pool_size=data.support_pool,
        shuffle_buffer=data.shuffle_buffer,
        seed=seed,
        rank=rank,
        world=world,
        timeout=data.stream_timeout,
        max_failures=data.stream_failures,
        max_pixels=data.max_image_pixels,
    )
    batches = math.ceil((data.episodes_per_epoch or epoch_episodes(data, shards)) / (world * batch_size))
    _loader_threads(data.num_workers)
    return EpisodeLoader(
        dataset, batches, batch_size, num_workers=data.num_workers, collate_fn=collate, generator=_own_generator()
    )


def epoch_episodes(data: DataConfig, shards: ShardSet) -> int:
    """Training episodes in a nominal epoch: qualifying images (pfenet) or usable pairs (hsnet)."""
    base = base_classes(data.dataset, data.fold)
    exclude = novel_classes(data.dataset, data.fold) if data.filter_novel else ()
    images = qualifying_images(shards, base, data.min_pixels, exclude)
    if data.protocol == "hsnet":
        fold = set(base)
        count = sum(len(_usable(shards.records[i]["classes"], fold, data.min_pixels)) for i in images)
    else:
        count = len(images)
    if count == 0:
        raise UserError(
            f"{shards.index_url}: no training image of fold {data.fold} has a base class with "
            f">= {data.min_pixels} pixels"
        )
    return count


def eval_list(data: DataConfig, shards: ShardSet, seed: int, episodes: Optional[int] = None) -> list[Episode]:
    """The fold's evaluation episode list (novel classes) for list `seed`, as the data section describes it."""
    return eval_episode_list(
        shards,
        novel_classes(data.dataset, data.fold),
        data.shot,
        data.eval_episodes if episodes is None else episodes,
        seed,
        data.min_pixels,
        data.protocol,
    )


def eval_loader(
    data: DataConfig,
    seed: int = 0,
    rank: int = 0,
    world: int = 1,
    batch_size: int = 1,
    shards: Optional[ShardSet] = None,
    episodes: Optional[int] = None,
) -> DataLoader:
    """A rank's share of the fold's evaluation episodes for list `seed` (novel classes, docs/PROTOCOL.md); `episodes`
    overrides `data.eval_episodes` (validation takes a prefix of the list)."""
    shards = shards or open_shards(data, data.val_split)
    episode_list = eval_list(data, shards, seed, episodes)
    dataset = EvalEpisodes(
        shards, episode_list, data.image_size, rank, world, data.eval_resize, max_pixels=data.max_image_pixels
    )
    return _loader(dataset, data, batch_size)


def bank_loader(
    data: DataConfig, rank: int = 0, world: int = 1, batch_size: int = 4, shards: Optional[ShardSet] = None
) -> DataLoader:
    """A rank's share of the training images holding a usable base class (CKMM's bank pass)."""
    shards = shards or open_shards(data, data.train_split)
    classes = base_classes(data.dataset, data.fold)
    dataset = BankImages(
        shards, classes, data.min_pixels, data.image_size, rank, world, data.eval_resize, data.max_image_pixels
    )
    return _loader(dataset, data, batch_size)


def pipe_refusal(data: DataConfig) -> Optional[str]:
    """Why the `pipe:` location `data.shards` may not run, or None when it may (or is no pipe).

    A pipe: location runs a shell command, and config files travel between people: one set in a config file
    runs only with `data.allow_pipe=true` set on the command line (or in code); one given on the command line
    (or in code) runs as it is.
    """
    if not data.shards.startswith("pipe:"):
        return None
    origin = where_set(data, "shards")
    if origin in TRUSTED_SOURCES or (data.allow_pipe and where_set(data, "allow_pipe") in TRUSTED_SOURCES):
        return None
    also = ""
    if data.allow_pipe:
        also = f" (data.allow_pipe: true in {where_set(data, 'allow_pipe')} does not count: a file cannot allow itself)"
    command = data.shards if len(data.shards) <= 160 else data.shards[:157] + "..."
    return (
        f"{origin}: key 'data.shards' is a pipe: location, which runs the shell command {command[5:]!r}; a pipe: "
        f"location from a config file runs only with data.allow_pipe=true on the command line{also}"
    )


def open_shards(data: DataConfig, split: str) -> ShardSet:
    """The ShardSet of `split` at `data.shards`, checked to hold `data.dataset`, with the section's remote limits;
    a `pipe:` location from a config file is refused unless the command line allows it (`pipe_refusal`)."""
    refusal = pipe_refusal(data)
    return ShardSet(
        data.shards,
        split,
        timeout=data.remote_timeout,
        retries=data.remote_retries,
        dataset=data.dataset,
        allow_pipe=refusal is None,
        refusal=refusal,
    )


def label_masks(label: torch.Tensor, classes: Sequence[int]) -> torch.Tensor:
    """Binary targets `[N, H, W]` uint8 (1 class, 0 other, 255 ignore) of one label `[H, W]` for each class."""
    ids = torch.as_tensor(list(classes), dtype=label.dtype, device=label.device).view(-1, 1, 1)
    out = (label.unsqueeze(0) == ids).to(torch.uint8)
    out[(label == IGNORE_INDEX).unsqueeze(0).expand_as(out)] = IGNORE_INDEX
    return out
