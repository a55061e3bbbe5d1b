"""`jc2a bench data`: shard writing, and the episode loaders against the decode floor of the same records."""

from __future__ import annotations

import argparse
import logging
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Optional

from jc2a.bench.harness import Report, busy_note, load_average
from jc2a.config import load_config
from jc2a.model.backbone import IMAGENET_MEAN

ROOT = Path(__file__).resolve().parents[2]
FLOOR_TARGET = 0.5  # loader episodes/s with 2 workers / decode-floor episodes/s, at least
WORKER_TARGET = 1.3  # 2 workers / 0 workers, at least


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


def decode_floor(shards, shot: int, records: int = 60) -> float:
    """Episodes per second if an episode cost nothing but decoding its 1 + K records (JPEG + label PNG), in
    this process: the floor a loader is judged against."""
    from jc2a.data.records import decode_record

    samples = [shards.read(i) for i in range(min(records, len(shards)))]
    for s in samples[:3]:
        decode_record(s)  # warm-up
    start = time.perf_counter()
    for s in samples:
        decode_record(s)
    per_record = (time.perf_counter() - start) / len(samples)
    return 1.0 / (per_record * (1 + shot))


def measure(
    images: int = 320, size: int = 560, episodes: int = 160, image_size: int = 473, work: Optional[Path] = None
) -> list[dict]:
    """Rows of `{"what", "setting", "value", "unit"}` measured in one run.

    Args:
        images: toy images to generate for each split.
        size: toy image side (the issue's measure: 560 px).
        episodes: episodes timed per loader setting (160: about a second per setting at 2 workers, so that
            start-up and scheduling noise stay small).
        image_size: episode input size S.
        work: scratch folder (a temporary one by default).
    """
    from jc2a.data.coco import CocoSource
    from jc2a.data.episodes import eval_loader, open_shards, train_loader
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
                         unit="images/s", shot=0, workers=0))  # fmt: skip
        for shot in (1, 5):
            cfg = load_config(
                ROOT / "configs/toy.yaml",
                [f"data.shards={work / 'shards'}", f"data.shot={shot}", f"data.image_size={image_size}",
                 f"data.eval_episodes={episodes * 2 + 32}", "data.min_pixels=2048", "data.shuffle_buffer=64",
                 f"data.episodes_per_epoch={episodes * 40}", "data.support_pool=16"],
            )  # fmt: skip
            train, val = open_shards(cfg.data, "train"), open_shards(cfg.data, "val")
            rows.append(dict(what="decode floor", setting=f"{shot}-shot: JPEG + PNG of 1 + {shot} records",
                             value=decode_floor(train, shot), unit="episodes/s", shot=shot, workers=0))  # fmt: skip
            for workers in (0, 2):
                cfg.data.num_workers = workers
                loader = train_loader(cfg.data, cfg.train.seed, 4, IMAGENET_MEAN, rank=0, world=1, shards=train)
                rate = _time_loader(loader, episodes, workers)
                rows.append(dict(what="train episodes", setting=f"{shot}-shot, {workers} workers, S={image_size}",
                                 value=rate, unit="episodes/s", shot=shot, workers=workers))  # fmt: skip
                rate = _time_loader(eval_loader(cfg.data, batch_size=4, shards=val), episodes, workers)
                rows.append(dict(what="eval episodes", setting=f"{shot}-shot, {workers} workers, S={image_size}",
                                 value=rate, unit="episodes/s", shot=shot, workers=workers))  # fmt: skip
    return rows


def judge(rows: list[dict]) -> list[tuple[str, float, str, bool]]:
    """(what, ratio, target, passed) for the issue's targets: 2-worker loaders >= 0.5x the decode floor, and
    2 workers >= 1.3x 0 workers, at 1-shot and 5-shot, training and evaluation."""
    out = []
    for shot in (1, 5):
        floor = next(r["value"] for r in rows if r["what"] == "decode floor" and r["shot"] == shot)
        for what in ("train episodes", "eval episodes"):
            rate = {r["workers"]: r["value"] for r in rows if r["what"] == what and r["shot"] == shot}
            ratio = rate[2] / floor
            out.append((f"{what}, {shot}-shot, 2 workers / decode floor", ratio, f">= {FLOOR_TARGET}x",
                        ratio >= FLOOR_TARGET))  # fmt: skip
            ratio = rate[2] / rate[0]
            out.append((f"{what}, {shot}-shot, 2 workers / 0 workers", ratio, f">= {WORKER_TARGET}x",
                        ratio >= WORKER_TARGET))  # fmt: skip
    return out


def bench_data(args: argparse.Namespace) -> Report:
    """Shard writing (images/s) and the episode loaders (episodes/s; 1- and 5-shot, 0 and 2 workers) on 560-px toy
    images at S=473, against the decode floor (JPEG + PNG decoding of the same records)."""
    logging.getLogger("jc2a.data").setLevel(logging.ERROR)  # toy classes without enough 5-shot images
    load = load_average()
    measured = measure()
    rows = [["what", "setting", "throughput"]]
    rows += [[r["what"], r["setting"], f"{r['value']:.1f} {r['unit']}"] for r in measured]
    verdicts = judge(measured)
    rows += [
        [what, "ratio", f"{ratio:.2f}x ({target}: {'PASS' if ok else 'FAIL'})"] for what, ratio, target, ok in verdicts
    ]
    summary = [
        [f"data: {what}", f"{ratio:.2f}x", target, "PASS" if ok else "FAIL"] for what, ratio, target, ok in verdicts
    ]
    notes = [
        "toy COCO (320 + 320 images, 560 px) written as shards, then streamed at S=473 in batches of 4; loader "
        "rates are steady-state (the batches workers prefetch at start-up are not timed); the decode floor is "
        "1 / (the time to decode one record's JPEG and label PNG x (1 + K)), in one process",
        f"CPU ({platform.processor() or platform.machine()}), {os.cpu_count()} cores, one pass per setting; "
        + busy_note(load),
    ]
    return Report("Data: shard writing and episode loaders", rows, notes, all(v[3] for v in verdicts), summary)
