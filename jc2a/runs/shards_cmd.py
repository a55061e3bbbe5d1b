"""`jc2a shards coco|pascal`: convert COCO 2014 or VOC 2012 + SBD into webdataset shards (jc2a/data/shards.py)."""

from __future__ import annotations

import argparse
from pathlib import Path

from jc2a.data.shards import check_split, write_shards
from jc2a.errors import UserError

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
        p.add_argument("--max-shard-mb", type=float, default=256.0, help="bound on one shard's size (MB)")
        p.add_argument("--no-progress", action="store_true")


def _split_arg(text: str) -> str:
    try:
        return check_split(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _coco_jobs(args: argparse.Namespace) -> list[tuple[str, object]]:
    from jc2a.data.coco import CocoSource

    if args.root is not None:
        if args.images or args.annotations:
            raise UserError("give either --root or --images/--annotations, not both")
        return [
            (split, CocoSource(args.root / f"{split}2014", args.root / "annotations" / f"instances_{split}2014.json"))
            for split in ("train", "val")
        ]
    if args.images is None or args.annotations is None:
        raise UserError("coco needs --root, or both --images and --annotations")
    split = args.split or ("val" if "val" in args.images.name else "train")
    return [(split, CocoSource(args.images, args.annotations))]


def run(args: argparse.Namespace) -> int:
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
        )  # a ShardWriteError (a full disk) is a UserError: one line naming the file
        print("\n".join(summary.lines()))
    print(f"shards and indexes in {args.out}")
    return 0
