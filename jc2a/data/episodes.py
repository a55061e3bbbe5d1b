"""Few-shot episodes from shards: the streaming training sampler and the fixed, seeded evaluation list.

An episode is a dict (SPEC §1 Episodes):
    query_img [3,S,S] float, query_mask [S,S] int64 (0/1/255), support_imgs [K,3,S,S],
    support_masks [K,S,S], class_id int, query_key / support_keys (record keys);
    evaluation adds query_label [h,w] (the original-size binary label, 0/1/255) and `episode` (its position).
"""

from __future__ import annotations

import json
import logging
import math
import random
from collections import Counter
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info

from jc2a.config import Config
from jc2a.folds import base_classes, novel_classes
from jc2a.data.locations import ShardSet
from jc2a.data.records import RecordError, binarize, decode_record
from jc2a.data.transforms import eval_transform, normalization, train_transform

log = logging.getLogger("jc2a.data")


@dataclass(frozen=True)
class Episode:
    """One evaluation episode: a class, the query's and the K supports' record positions in the index."""

    class_id: int
    query: int
    supports: tuple[int, ...]


def _seed(*parts: int) -> int:
    """A 63-bit seed mixed from integers (numpy's SeedSequence)."""
    return int(np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(2, np.uint64)[0] >> 1)


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


# --------------------------------------------------------------------------- evaluation


def eval_episode_list(
    shards: ShardSet, classes: Sequence[int], shot: int, episodes: int, seed: int, min_pixels: int
) -> list[Episode]:
    """The fixed episode list of a fold, from `seed` alone: never from processes or workers.

    Class uniform over `classes` (those with at least shot + 1 usable images), query uniform among the
    class's usable images, `shot` distinct supports other than the query. Classes and queries come from one
    stream seeded by `seed`, so the 1-shot and 5-shot lists share their queries and a shorter list is a prefix
    of a longer one; each episode's supports come from a generator seeded by `(seed, episode)`.
    """
    usable = {c: shards.usable(c, min_pixels) for c in classes}
    kept = [c for c in classes if len(usable[c]) >= shot + 1]
    dropped = sorted(set(classes) - set(kept))
    if dropped:
        log.warning(
            "%s: classes %s have fewer than %d usable images (>= %d pixels) and get no episode",
            shards.index_url, dropped, shot + 1, min_pixels,
        )  # fmt: skip
    if not kept:
        raise ValueError(
            f"{shards.index_url}: no class of {list(classes)} has {shot + 1} images with >= {min_pixels} pixels"
        )
    rng = np.random.default_rng(_seed(seed))
    out = []
    for i in range(episodes):
        class_id = kept[int(rng.integers(len(kept)))]
        pool = usable[class_id]
        query = int(pool[rng.integers(len(pool))])
        others = pool[pool != query]
        picks = np.random.default_rng(_seed(seed, i)).choice(others, size=shot, replace=False)
        out.append(Episode(class_id, query, tuple(int(p) for p in picks)))
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
        size: input size S; mean, std: the backbone's normalisation.
        rank, world: this process's share.
    """

    def __init__(
        self,
        shards: ShardSet,
        episodes: Sequence[Episode],
        size: int,
        mean: Sequence[float],
        std: Sequence[float],
        rank: int = 0,
        world: int = 1,
    ) -> None:
        self.shards, self.episodes = shards, list(episodes)
        self.positions = share(len(self.episodes), rank, world)
        self.transform = eval_transform(size, mean, std)

    def __len__(self) -> int:
        return len(self.positions)

    def _load(self, position: int, class_id: int) -> tuple[np.ndarray, np.ndarray]:
        sample = self.shards.read(position)
        image, label, _ = decode_record(sample)
        return image, binarize(label, class_id)

    def __getitem__(self, i: int) -> dict:
        ep = self.episodes[self.positions[i]]
        image, label = self._load(ep.query, ep.class_id)
        supports = [self.transform(*self._load(s, ep.class_id)) for s in ep.supports]
        out = stack_episode(self.transform(image, label), supports, ep.class_id)
        out["query_label"] = torch.from_numpy(label.astype(np.int64))
        out["episode"] = self.positions[i]
        out["query_key"] = self.shards.records[ep.query]["key"]
        out["support_keys"] = [self.shards.records[s]["key"] for s in ep.supports]
        return out


# --------------------------------------------------------------------------- training


class TrainEpisodes(IterableDataset):
    """An endless stream of training episodes over the base classes, from resampled shards.

    shards -> split by node, then by worker -> resample -> tar to samples -> shuffle -> decode
    -> per-class support pools -> episodes -> augmentation. Every usable (image, class) pair becomes a
    query; its K supports are K distinct other images of the class from a bounded pool that the same
    stream fills. A pair that arrives while its class has fewer than K other images in the pool only joins
    the pool (the stream is endless, so the image comes back as a query later). Records that fail to decode
    are skipped and counted (`self.skipped`, and a warning naming the record and its shard).

    Args:
        shards: the training split.
        classes: the base classes; other classes are background.
        shot: K.
        min_pixels: smallest target area of a usable pair.
        transform: `t(image, label, rng) -> (img [3,S,S], mask [S,S])`.
        pool_size: support candidates kept per class.
        shuffle_buffer: samples in the shuffle buffer.
        seed, rank, world: the stream of (seed, epoch, rank, worker) is reproducible.
    """

    def __init__(
        self,
        shards: ShardSet,
        classes: Sequence[int],
        shot: int,
        min_pixels: int,
        transform,
        pool_size: int = 32,
        shuffle_buffer: int = 256,
        seed: int = 0,
        rank: int = 0,
        world: int = 1,
    ) -> None:
        if pool_size < shot:
            raise ValueError(f"data.support_pool ({pool_size}) must be >= data.shot ({shot})")
        self.urls = list(shards.urls)
        self.classes = {str(c): c for c in classes}
        self.shot, self.min_pixels, self.transform = shot, min_pixels, transform
        self.pool_size, self.shuffle_buffer = pool_size, shuffle_buffer
        self.seed, self.rank, self.world = seed, rank, world
        self.epoch = 0
        self.skipped: Counter = Counter()  # in this process; across workers see EpisodeLoader.skipped_records
        self._unreported = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _slot(self) -> tuple[int, int]:
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info else (1, 0)
        return self.rank * workers + worker, self.world * workers

    def shard_urls(self) -> list[str]:
        """This (rank, worker)'s shards: split by node, then by worker, when there are enough to go round."""
        slot, slots = self._slot()
        return self.urls[slot::slots] if len(self.urls) >= slots else self.urls

    def _resampled(self, rng: random.Random) -> Iterator[dict]:
        mine = self.shard_urls()
        while True:
            yield {"url": rng.choice(mine)}

    def _tar_error(self, exn: Exception) -> bool:
        self._skip("tar", f"unreadable shard data: {exn}")
        return True

    def __iter__(self) -> Iterator[dict]:
        slot, _ = self._slot()
        seed = _seed(self.seed, self.epoch, slot)
        rng = np.random.default_rng(seed)
        shards = self._resampled(random.Random(_seed(seed, 1)))  # 1. resampled shards of this rank and worker
        samples = wds.tarfile_to_samples(handler=self._tar_error)(shards)  # 2. tar -> raw samples
        shuffle = wds.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer // 2, rng=random.Random(_seed(seed, 2)))
        samples = shuffle(samples)  # 3. shuffle
        yield from self._episodes(samples, rng)  # 4. pools -> episodes

    def _skip(self, kind: str, reason: object) -> None:
        self.skipped[kind] += 1
        self._unreported += 1
        log.warning("skipped %s", reason)

    def _episodes(self, samples: Iterator[dict], rng: np.random.Generator) -> Iterator[dict]:
        pools: dict[int, list[dict]] = {}
        self._unreported = 0
        for sample in samples:
            name = f"record {sample.get('__key__')} of {sample.get('__url__')}"
            try:  # the json header first: records with no usable base-class pair are never decoded
                meta = json.loads(sample["json"])
                usable = [
                    self.classes[k]
                    for k, n in sorted(meta["classes"].items())
                    if k in self.classes and n >= self.min_pixels
                ]
            except (KeyError, ValueError, AttributeError, TypeError) as exc:
                self._skip("record", f"{name}: bad or missing json header ({exc})")
                continue
            if not usable:
                continue
            try:
                image, label, _ = decode_record(sample, name)
            except RecordError as exc:
                self._skip("record", exc)
                continue
            for class_id in rng.permutation(usable):
                class_id = int(class_id)
                pool = pools.setdefault(class_id, [])
                others = [s for s in pool if s["__key__"] != sample["__key__"]]
                if len(others) >= self.shot:
                    picks = rng.choice(len(others), size=self.shot, replace=False)
                    episode = self._make(image, label, [others[p] for p in picks], class_id, sample["__key__"], rng)
                    episode["skipped_records"], self._unreported = self._unreported, 0  # summed by EpisodeLoader
                    yield episode
                if all(s["__key__"] != sample["__key__"] for s in pool):
                    raw = {k: sample[k] for k in ("__key__", "__url__", "jpg", "png", "json")}
                    if len(pool) < self.pool_size:
                        pool.append(raw)
                    else:
                        pool[int(rng.integers(len(pool)))] = raw

    def _make(self, image, label, supports: list[dict], class_id: int, key: str, rng) -> dict:
        query = self.transform(image, binarize(label, class_id), rng)
        pairs = []
        for s in supports:
            s_image, s_label, _ = decode_record(s)  # pools keep raw bytes; this record decoded fine on arrival
            pairs.append(self.transform(s_image, binarize(s_label, class_id), rng))
        out = stack_episode(query, pairs, class_id)
        out["query_key"] = key
        out["support_keys"] = [s["__key__"] for s in supports]
        return out


def usable_pairs(shards: ShardSet, classes: Sequence[int], min_pixels: int) -> int:
    """Number of (image, class) pairs with the class covering at least `min_pixels` pixels."""
    return sum(len(shards.usable(c, min_pixels)) for c in classes)


# --------------------------------------------------------------------------- loaders from a config


class EpisodeLoader(wds.WebLoader):
    """webdataset's WebLoader over a TrainEpisodes stream, `batches` batches an epoch (`with_epoch`).

    `set_epoch(e)` before iterating gives epoch `e` its own reproducible draw. `skipped_records` counts the
    records the stream skipped (unreadable, or a broken header) in every worker since the loader was made.
    """

    def __init__(self, dataset: TrainEpisodes, batches: int, **loader_args) -> None:
        super().__init__(dataset, **loader_args)
        self.dataset, self.batches = dataset, batches
        self.skipped_records = 0
        self.with_epoch(batches)

    def __iter__(self) -> Iterator[dict]:
        for batch in super().__iter__():
            self.skipped_records += int(batch["skipped_records"].sum())
            yield batch

    def set_epoch(self, epoch: int) -> None:
        self.dataset.set_epoch(epoch)

    def __len__(self) -> int:
        return self.batches


def train_loader(
    cfg: Config, rank: int = 0, world: int = 1, batch_size: Optional[int] = None, shards: Optional[ShardSet] = None
) -> EpisodeLoader:
    """The training loader of a rank: a fixed number of batches per epoch (`with_epoch`).

    Episodes per epoch (over all ranks) are `data.episodes_per_epoch`, or one per usable base-class
    pair when 0; each rank yields ceil(episodes / (world * batch_size)) batches. Call
    `loader.set_epoch(e)` before each epoch.
    """
    batch_size = batch_size or cfg.train.batch_size
    shards = shards or ShardSet(cfg.data.shards, cfg.data.train_split)
    classes = base_classes(cfg.data.dataset, cfg.data.fold)
    mean, std = normalization(cfg.model.backbone.name)
    dataset = TrainEpisodes(
        shards,
        classes,
        cfg.data.shot,
        cfg.data.min_pixels,
        train_transform(cfg.data.augment, cfg.data.image_size, mean, std),
        pool_size=cfg.data.support_pool,
        shuffle_buffer=cfg.data.shuffle_buffer,
        seed=cfg.train.seed,
        rank=rank,
        world=world,
    )
    episodes = cfg.data.episodes_per_epoch or usable_pairs(shards, classes, cfg.data.min_pixels)
    if episodes == 0:
        raise ValueError(
            f"{shards.index_url}: no base-class pair of fold {cfg.data.fold} covers >= {cfg.data.min_pixels} pixels"
        )
    batches = math.ceil(episodes / (world * batch_size))
    return EpisodeLoader(dataset, batches, batch_size=batch_size, num_workers=cfg.data.num_workers, collate_fn=collate)


def eval_loader(
    cfg: Config,
    seed: int = 0,
    rank: int = 0,
    world: int = 1,
    batch_size: int = 1,
    shards: Optional[ShardSet] = None,
) -> DataLoader:
    """A rank's share of the fold's evaluation episodes for list `seed` (novel classes, SPEC §1)."""
    shards = shards or ShardSet(cfg.data.shards, cfg.data.val_split)
    episodes = eval_episode_list(
        shards,
        novel_classes(cfg.data.dataset, cfg.data.fold),
        cfg.data.shot,
        cfg.data.eval_episodes,
        seed,
        cfg.data.min_pixels,
    )
    mean, std = normalization(cfg.model.backbone.name)
    dataset = EvalEpisodes(shards, episodes, cfg.data.image_size, mean, std, rank, world)
    return DataLoader(dataset, batch_size=batch_size, num_workers=cfg.data.num_workers, collate_fn=collate)
