"""Data throughput: shard writing (images/s) and the episode loaders (episodes/s), on the toy data."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Optional

from jc2a.config import load_config

ROOT = Path(__file__).resolve().parents[2]


def _time_loader(loader, episodes: int, workers: int) -> float:
    """Steady-state episodes per second: the batches the workers prefetch at start-up are not timed."""
    it = iter(loader)
    for _ in range(max(1, 2 * workers)):  # DataLoader's prefetch_factor is 2 per worker
        next(it)
    n, start = 0, time.perf_counter()
    for batch in it:
        n += len(batch["class_id"])
        if n >= episodes:
            break
    return n / (time.perf_counter() - start)


def bench_data(
    images: int = 400, size: int = 160, episodes: int = 200, image_size: int = 129, work: Optional[Path] = None
) -> list[dict]:
    """Rows of `{"what", "setting", "value", "unit"}` measured in one run.

    Args:
        images: toy images to generate for each split.
        size: toy image side.
        episodes: episodes timed per loader setting.
        image_size: episode input size S.
        work: scratch folder (a temporary one by default).
    """
    from jc2a.data.coco import CocoSource
    from jc2a.data.episodes import eval_loader, train_loader
    from jc2a.data.locations import ShardSet
    from jc2a.data.shards import write_shards
    from jc2a.data.toy import write_toy_coco

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(work or tmp)
        write_toy_coco(work / "toy", train_images=images, val_images=images, size=size, seed=0)
        total, seconds = 0, 0.0
        for split in ("train", "val"):
            src = CocoSource(work / "toy" / f"{split}2014", work / "toy/annotations" / f"instances_{split}2014.json")
            start = time.perf_counter()
            summary = write_shards(src, work / "shards", split, "coco", src.class_names, progress=False)
            seconds += time.perf_counter() - start
            total += summary.records
        rows.append(dict(what="shard writing", setting=f"{total} toy images ~{size}px", value=total / seconds,
                         unit="images/s"))  # fmt: skip
        train, val = ShardSet(str(work / "shards"), "train"), ShardSet(str(work / "shards"), "val")
        for shot in (1, 5):
            for workers in (0, 2):
                cfg = load_config(
                    ROOT / "configs/toy.yaml",
                    [f"data.shards={work / 'shards'}", f"data.shot={shot}", f"data.num_workers={workers}",
                     f"data.image_size={image_size}", f"data.eval_episodes={episodes + 32}", "data.min_pixels=200",
                     f"data.episodes_per_epoch={episodes * 4}"],
                )  # fmt: skip
                rate = _time_loader(train_loader(cfg, batch_size=4, shards=train), episodes, workers)
                rows.append(dict(what="train episodes", setting=f"{shot}-shot, {workers} workers, S={image_size}",
                                 value=rate, unit="episodes/s"))  # fmt: skip
                rate = _time_loader(eval_loader(cfg, batch_size=4, shards=val), episodes, workers)
                rows.append(dict(what="eval episodes", setting=f"{shot}-shot, {workers} workers, S={image_size}",
                                 value=rate, unit="episodes/s"))  # fmt: skip
    return rows
