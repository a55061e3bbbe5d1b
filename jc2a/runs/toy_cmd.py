"""`jc2a toy --out DIR`: write the built-in procedural toy dataset, COCO 2014 or VOC 2012 layout (jc2a/data/toy.py)."""

from __future__ import annotations

import argparse
from pathlib import Path

from jc2a.data.toy import VERSION, VERSIONS, write_toy_coco, write_toy_voc

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `jc2a toy`."""
    parser.add_argument("--out", type=Path, required=True, help="folder to write the dataset into")
    parser.add_argument(
        "--format",
        choices=("coco", "voc"),
        default="coco",
        help="COCO 2014 (80 categories) or VOC 2012 + SBD SegmentationClassAug (20 classes)",
    )
    parser.add_argument("--train-images", type=int, default=160, help="images in the train split (default 160)")
    parser.add_argument("--val-images", type=int, default=80, help="images in the val split (default 80)")
    parser.add_argument(
        "--size",
        type=int,
        default=160,
        help="nominal image side; width and height vary in [0.75, 1.25] x size (default 160)",
    )
    parser.add_argument("--seed", type=int, default=0, help="same seed, byte-identical files (default 0)")
    parser.add_argument(
        "--version",
        type=int,
        choices=VERSIONS,
        default=VERSION,
        help=f"{VERSION} (default, the demo's): appearance modes and parts, look-alikes across folds, clutter, "
        "occlusion, objects from 2%% of the image to most of it; 1: one flat look a class, objects apart",
    )


def run(args: argparse.Namespace) -> int:
    """Write the toy dataset and print a one-line summary."""
    writer = write_toy_coco if args.format == "coco" else write_toy_voc
    s = writer(args.out, args.train_images, args.val_images, args.size, args.seed, progress=True, version=args.version)
    print(
        f"toy {s['format']} v{args.version}: {s['images']} images ({s['splits']['train']['images']} train, "
        f"{s['splits']['val']['images']} val), {s['instances']} instances ({s['multi_polygon']} multi-polygon), "
        f"{s['crowd']} crowd regions, {s['empty']} empty images -> {s['out']}"
    )
    return 0
