"""`jc2a shards coco|pascal`: convert COCO 2014 or VOC 2012 + SBD into webdataset shards (jc2a/data/shards.py)."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from jc2a.config import PIL_PIXEL_CEILING
from jc2a.data.records import MAX_IMAGE_PIXELS
from jc2a.data.shards import MAX_SHARD_MB, check_split, output_folder, write_shards
from jc2a.errors import UserError
from jc2a.lock import FolderLock

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="dataset", metavar="DATASET", required=True)
    coco = sub.add_parser("coco", help="COCO 2014 instances json + images")
    coco.add_argument("--root", type=Path, help="COCO folder with train2014/, val2014/, annotations/ (both splits)")
    coco.add_argument("--images", type=Path, help="one image folder, e.g. train2014/")
    coco.add_argument("--annotations", type=Path, help="its instances json")
    coco.add_argument(
        "--split", type=_split_arg, help="shard name prefix (default: 'train' or 'val' from the folder name)"
    )
    coco.add_argument("--out", type=Path, default=Path("shards/coco"))
    pascal = sub.add_parser("pascal", help="VOC 2012 + SBD SegmentationClassAug")
    pascal.add_argument("--root", type=Path, required=True, help="folder with JPEGImages/ and SegmentationClassAug/")
    pascal.add_argument(
        "--train-list",
        type=Path,
        help="image ids; default PFENet's list shipped with jc2a: 5,953 ids, VOC 2012 train + SBD without duplicates "
        "(SBD's train_aug.txt, 10,582 ids, is HSNet's choice)",
    )
    pascal.add_argument(
        "--val-list", type=Path, help="image ids; default PFENet's list shipped with jc2a: 1,449 ids, VOC 2012 val"
    )
    pascal.add_argument("--split", choices=("train", "val", "both"), default="both")
    pascal.add_argument("--out", type=Path, default=Path("shards/pascal"))
    for p in (coco, pascal):
        p.add_argument(
            "--max-shard-mb", type=str, default="256", help=f"bound on one shard's size (MB, > 0 and <= {MAX_SHARD_MB})"
        )
        p.add_argument(
            "--max-image-pixels",
            type=str,
            default=str(MAX_IMAGE_PIXELS),
            help="largest image or label (width x height); larger ones are skipped before they are decoded "
            f"(data.max_image_pixels; default {MAX_IMAGE_PIXELS})",
        )
        p.add_argument("--no-progress", action="store_true")


def _split_arg(text: str) -> str:
    try:
        return check_split(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def max_shard_bytes(text: str) -> int:
    """`--max-shard-mb` as bytes: a finite number of MB in (0, MAX_SHARD_MB], at least 1 KiB; UserError otherwise."""
    try:
        mb = float(text)
    except (TypeError, ValueError):
        mb = math.nan
    if not (math.isfinite(mb) and 0 < mb <= MAX_SHARD_MB and mb * 2**20 >= 1024):
        raise UserError(f"--max-shard-mb {text}: expected a number of MB > 0 and <= {MAX_SHARD_MB} (at least 0.001)")
    return int(mb * 2**20)


def max_image_pixels(text: str) -> int:
    """`--max-image-pixels` as an int in [1, PIL_PIXEL_CEILING]; UserError otherwise."""
    try:
        pixels = int(text)
    except (TypeError, ValueError):
        pixels = 0
    if not 1 <= pixels <= PIL_PIXEL_CEILING:
        raise UserError(f"--max-image-pixels {text}: expected an integer in [1, {PIL_PIXEL_CEILING}]")
    return pixels


def _coco_jobs(args: argparse.Namespace, max_pixels: int) -> list[tuple[str, object]]:
    from jc2a.data.coco import CocoSource

    if args.root is not None:
        if args.images or args.annotations:
            raise UserError("give either --root or --images/--annotations, not both")
        return [
            (
                split,
                CocoSource(
                    args.root / f"{split}2014", args.root / "annotations" / f"instances_{split}2014.json", max_pixels
                ),
            )
            for split in ("train", "val")
        ]
    if args.images is None or args.annotations is None:
        raise UserError("coco needs --root, or both --images and --annotations")
    split = args.split or ("val" if "val" in args.images.name else "train")
    return [(split, CocoSource(args.images, args.annotations, max_pixels))]


def run(args: argparse.Namespace) -> int:
    """Check the numbers, lock `--out` for the whole command (both splits: one writer per folder), write."""
    shard_bytes = max_shard_bytes(args.max_shard_mb)
    max_pixels = max_image_pixels(args.max_image_pixels)
    existed = args.out.is_dir()
    out = output_folder(args.out)
    try:
        with FolderLock(out, f"jc2a shards {args.dataset} (--out {args.out})"):
            if args.dataset == "coco":
                jobs = _coco_jobs(args, max_pixels)
            else:
                from jc2a.data.pascal import PascalSource

                splits = ("train", "val") if args.split == "both" else (args.split,)
                jobs = [(s, PascalSource(args.root, s, args.train_list, args.val_list, max_pixels)) for s in splits]
            for split, source in jobs:
                summary = write_shards(
                    source,
                    out,
                    split,
                    args.dataset,
                    source.class_names,
                    max_shard_bytes=shard_bytes,
                    progress=not args.no_progress,
                    max_pixels=max_pixels,
                )  # a ShardWriteError (a full disk) is a UserError: one line naming the file
                print("\n".join(summary.lines()))
    except BaseException:
        if not existed and out.is_dir() and not any(out.iterdir()):
            out.rmdir()  # made by this run, which wrote nothing: gone again
        raise
    print(f"shards and indexes in {args.out}")
    return 0
