"""Write a source dataset as webdataset shards plus an index: atomic, resumable, size-bounded (SPEC §1 Shards).

Layout of one split in `out/`:
    <split>-000000.tar, <split>-000001.tar, ...   plain webdataset tars, members <key>.json/.jpg/.png
    <split>-index.json                            key, shard, class pixel counts and member offsets
"""

from __future__ import annotations

import io
import json
import os
import tarfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional

from PIL import Image
from tqdm import tqdm

from jc2a.data.records import SourceItem, encode_label, header

INDEX_FORMAT = "jc2a-shards/1"
MEMBERS = ("json", "jpg", "png")  # order inside a record


def shard_name(split: str, number: int) -> str:
    return f"{split}-{number:06d}.tar"


def index_name(split: str) -> str:
    return f"{split}-index.json"


@dataclass
class WriteSummary:
    """What one `write_shards` call did."""

    split: str
    images: int = 0  # images the source lists
    records: int = 0  # records in the split's shards now
    shards_written: int = 0
    shards_kept: int = 0  # complete shards found from an earlier run and not rewritten
    skipped: list[dict] = field(default_factory=list)  # {"source", "reason"}
    removed: list[str] = field(default_factory=list)  # files of an earlier run deleted before resuming, and why
    seconds: float = 0.0

    def lines(self) -> list[str]:
        reasons = Counter(s["reason"].split(":")[0] for s in self.skipped)
        out = [
            f"{self.split}: {self.images} images -> {self.records} records in "
            f"{self.shards_written + self.shards_kept} shards ({self.shards_written} written, "
            f"{self.shards_kept} kept from an earlier run), {len(self.skipped)} skipped, {self.seconds:.1f} s"
        ]
        out += [f"  removed {r}" for r in self.removed]
        out += [f"  skipped {n}: {reason}" for reason, n in reasons.most_common()]
        out += [f"    {s['source']}: {s['reason']}" for s in self.skipped[:10]]
        if len(self.skipped) > 10:
            out.append(f"    ... and {len(self.skipped) - 10} more (listed in the index under 'skipped')")
        return out


# --------------------------------------------------------------------------- reading complete shards


def read_shard_entries(path: Path, shard: int) -> list[dict]:
    """Index entries of a complete shard: key, shard number, class pixel counts, member offsets."""
    entries: dict[str, dict] = {}
    with tarfile.open(path) as tar:
        for info in tar:
            if not info.isfile():
                continue
            key, _, ext = info.name.rpartition(".")
            entry = entries.setdefault(key, {"key": key, "shard": shard, "offsets": {}})
            entry["offsets"][ext] = [info.offset_data, info.size]
            if ext == "json":
                meta = json.loads(tar.extractfile(info).read())
                entry["classes"] = meta["classes"]
                entry["size"] = [meta["height"], meta["width"]]
    for key, entry in entries.items():
        if set(entry["offsets"]) != set(MEMBERS):
            raise ValueError(f"{path}: record {key} has members {sorted(entry['offsets'])}, expected {list(MEMBERS)}")
    return list(entries.values())


def _complete_prefix(out: Path, split: str) -> tuple[list[Path], list[Path]]:
    """The complete shards numbered 0, 1, 2... without a gap, and any complete shard after a gap."""
    found = sorted(out.glob(f"{split}-[0-9][0-9][0-9][0-9][0-9][0-9].tar"))
    prefix = []
    for number, path in enumerate(found):
        if path.name != shard_name(split, number):
            return prefix, found[number:]
        prefix.append(path)
    return prefix, []


# --------------------------------------------------------------------------- writing


def _tar_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), 0o444, 0  # fixed metadata: reruns write identical bytes
    tar.addfile(info, io.BytesIO(data))


def _check_image(data: bytes, path: Path) -> tuple[int, int]:
    """(height, width) of an image file that decodes completely; ValueError naming the file otherwise."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            width, height = im.size
            im.draft("RGB", (max(1, width // 8), max(1, height // 8)))  # DCT scaling: reads all, decodes less
            im.load()
    except Exception as exc:  # PIL raises many types for broken files
        raise ValueError(f"unreadable image: {path} ({exc})") from None
    return height, width


class _ShardFile:
    """One shard being written under a temporary name; `close()` renames it into place."""

    def __init__(self, out: Path, split: str, number: int) -> None:
        self.number = number
        self.path = out / shard_name(split, number)
        self.tmp = self.path.with_name(self.path.name + ".tmp")
        self.tar = tarfile.open(self.tmp, "w", format=tarfile.USTAR_FORMAT)
        self.records = 0

    @property
    def bytes(self) -> int:
        return self.tar.offset

    def add(self, key: str, members: dict[str, bytes]) -> None:
        for ext in MEMBERS:
            _tar_member(self.tar, f"{key}.{ext}", members[ext])
        self.records += 1

    def close(self) -> list[dict]:
        self.tar.close()
        with open(self.tmp, "rb") as f:
            os.fsync(f.fileno())
        entries = read_shard_entries(self.tmp, self.number)
        os.replace(self.tmp, self.path)
        return entries


def write_shards(
    source: Iterable[SourceItem],
    out: Path,
    split: str,
    dataset: str,
    class_names: dict[int, str],
    max_shard_bytes: int = 256 * 2**20,
    progress: bool = True,
) -> WriteSummary:
    """Write every item of `source` as one record, resuming after the complete shards of an earlier run.

    Args:
        source: items in a fixed order (a rerun must list them in the same order).
        out: the folder of the shards; created if absent.
        split: shard name prefix, e.g. "train".
        dataset: "coco" or "pascal", stored in the index.
        class_names: contiguous id -> name, stored in the index.
        max_shard_bytes: a shard is closed before it would grow past this (a single larger record gets
            a shard of its own).
    """
    start = time.time()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    summary = WriteSummary(split=split)
    kept, after_gap = _complete_prefix(out, split)
    entries: list[dict] = []
    for number, path in enumerate(kept):
        entries += read_shard_entries(path, number)
    summary.shards_kept = len(kept)
    done = {e["key"] for e in entries}

    items = list(source)  # items are cheap: images and labels are read one at a time below
    summary.images = len(items)
    foreign = done - {item.key for item in items}
    if foreign:  # refused before anything of the earlier run is removed
        raise ValueError(
            f"{out}: the existing {split} shards hold {len(foreign)} records this source does not list "
            f"(e.g. {sorted(foreign)[0]}); write to a fresh --out folder"
        )
    for stale in sorted(out.glob(f"{split}-*.tar.tmp")):  # an interrupted shard: rewritten from its first record
        stale.unlink()
        summary.removed.append(f"{stale.name} (an interrupted shard; its records are written again)")
    for path in after_gap:  # written after a missing shard: rewriting from the gap would duplicate them
        path.unlink()
        summary.removed.append(f"{path.name} (follows a missing shard; its records are written again)")
    shard: Optional[_ShardFile] = None
    next_number = len(kept)
    bar = tqdm(items, desc=f"shards {split}", unit="img", disable=not progress, total=summary.images)
    for item in bar:
        if item.key in done:
            continue
        try:
            members = _record_members(item)
        except (OSError, ValueError) as exc:
            reason = str(exc) if isinstance(exc, ValueError) else f"unreadable image: {item.image_path} ({exc})"
            summary.skipped.append({"source": item.source, "reason": reason})
            continue
        size = sum(len(v) + 1024 for v in members.values())
        if shard is not None and shard.records and shard.bytes + size > max_shard_bytes:
            entries += shard.close()
            summary.shards_written += 1
            shard = None
        if shard is None:
            shard = _ShardFile(out, split, next_number)
            next_number += 1
        shard.add(item.key, members)
    if shard is not None:
        entries += shard.close()
        summary.shards_written += 1
    summary.records = len(entries)
    summary.seconds = time.time() - start
    _write_index(out, split, dataset, class_names, entries, summary)
    return summary


def _record_members(item: SourceItem) -> dict[str, bytes]:
    """The jpg (original bytes), png and json members of one item; ValueError naming the file if bad."""
    if not item.image_path.is_file():
        raise ValueError(f"image not found: {item.image_path}")
    data = item.image_path.read_bytes()
    height, width = _check_image(data, item.image_path)
    if item.size is not None and tuple(item.size) != (height, width):
        raise ValueError(
            f"size mismatch: {item.image_path} is {width}x{height} but the annotations say "
            f"{item.size[1]}x{item.size[0]}"
        )
    label = item.label()
    if label.shape != (height, width):
        raise ValueError(
            f"size mismatch: label of {item.source} is {label.shape[1]}x{label.shape[0]} but image {width}x{height}"
        )
    meta = header(label, item.source)
    return {"json": json.dumps(meta, sort_keys=True).encode(), "jpg": data, "png": encode_label(label)}


def _write_index(
    out: Path, split: str, dataset: str, class_names: dict[int, str], entries: list[dict], summary: WriteSummary
) -> Path:
    shards: dict[int, dict] = {}
    for e in entries:
        s = shards.setdefault(e["shard"], {"name": shard_name(split, e["shard"]), "records": 0})
        s["records"] += 1
    index = {
        "format": INDEX_FORMAT,
        "dataset": dataset,
        "split": split,
        "classes": {str(k): v for k, v in sorted(class_names.items())},
        "shards": [shards[n] for n in sorted(shards)],
        "records": entries,
        "skipped": summary.skipped,
    }
    path = out / index_name(split)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(index, separators=(",", ":")))
    os.replace(tmp, path)
    return path


# --------------------------------------------------------------------------- command line


def add_arguments(parser) -> None:
    sub = parser.add_subparsers(dest="dataset", metavar="DATASET", required=True)
    coco = sub.add_parser("coco", help="COCO 2014 instances json + images")
    coco.add_argument("--root", type=Path, help="COCO folder with train2014/, val2014/, annotations/ (both splits)")
    coco.add_argument("--images", type=Path, help="one image folder, e.g. train2014/")
    coco.add_argument("--annotations", type=Path, help="its instances json")
    coco.add_argument("--split", help="shard name prefix (default: 'train' or 'val' from the folder name)")
    coco.add_argument("--out", type=Path, default=Path("shards/coco"))
    pascal = sub.add_parser("pascal", help="VOC 2012 + SBD SegmentationClassAug")
    pascal.add_argument("--root", type=Path, required=True, help="folder with JPEGImages/ and SegmentationClassAug/")
    pascal.add_argument("--train-list", type=Path, help="default ROOT/ImageSets/SegmentationAug/train_aug.txt")
    pascal.add_argument("--val-list", type=Path, help="default ROOT/ImageSets/Segmentation/val.txt")
    pascal.add_argument("--split", choices=("train", "val", "both"), default="both")
    pascal.add_argument("--out", type=Path, default=Path("shards/pascal"))
    for p in (coco, pascal):
        p.add_argument("--max-shard-mb", type=float, default=256.0, help="bound on one shard's size (MB)")
        p.add_argument("--no-progress", action="store_true")


def _coco_jobs(args) -> list[tuple[str, object]]:
    from jc2a.data.coco import CocoSource

    if args.root is not None:
        if args.images or args.annotations:
            raise ValueError("give either --root or --images/--annotations, not both")
        return [
            (split, CocoSource(args.root / f"{split}2014", args.root / "annotations" / f"instances_{split}2014.json"))
            for split in ("train", "val")
        ]
    if args.images is None or args.annotations is None:
        raise ValueError("coco needs --root, or both --images and --annotations")
    split = args.split or ("val" if "val" in args.images.name else "train")
    return [(split, CocoSource(args.images, args.annotations))]


def run(args) -> int:
    if args.dataset == "coco":
        jobs = _coco_jobs(args)
    else:
        from jc2a.data.pascal import PascalSource

        splits = ("train", "val") if args.split == "both" else (args.split,)
        jobs = [(s, PascalSource(args.root, s, args.train_list, args.val_list)) for s in splits]
    for split, source in jobs:
        summary = write_shards(
            source,
            args.out,
            split,
            args.dataset,
            source.class_names,
            max_shard_bytes=int(args.max_shard_mb * 2**20),
            progress=not args.no_progress,
        )
        print("\n".join(summary.lines()))
    print(f"shards and indexes in {args.out}")
    return 0
