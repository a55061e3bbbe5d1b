"""PASCAL VOC 2012 + SBD (`SegmentationClassAug`) -> label maps, with PFENet's train/val split (docs/PROTOCOL.md)."""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Iterator, Optional

import numpy as np

from jc2a.data.records import MAX_IMAGE_PIXELS, SourceItem, opened_image
from jc2a.errors import UserError
from jc2a.labels import IGNORE_INDEX

# The dataset's own class order: label value i is VOC_CLASSES[i - 1].
VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)  # fmt: skip

# PFENet's PASCAL-5i lists, shipped with jc2a (jc2a/data/lists): the default of `jc2a shards pascal`.
#   train_pfenet.txt: 5,953 ids, VOC 2012 train merged with SBD, duplicates removed (voc_sbd_merge_noduplicate.txt)
#   val_pfenet.txt:   1,449 ids, VOC 2012 val (PFENet's val.txt)
# For comparison, the SegmentationClassAug release's train_aug.txt holds 10,582 ids (HSNet trains on it).
DEFAULT_LISTS = {"train": "train_pfenet.txt", "val": "val_pfenet.txt"}


def default_list(split: str) -> Path:
    """The shipped PFENet list of `split` ("train" or "val")."""
    return Path(str(resources.files("jc2a.data").joinpath("lists", DEFAULT_LISTS[split])))


def read_list(path: Path) -> list[str]:
    """Image ids of a list file: one id a line (`2007_000032`) or PFENet's `JPEGImages/x.jpg Seg.../x.png` pairs."""
    if not path.is_file():
        raise FileNotFoundError(f"image list not found: {path}")
    try:
        text = path.read_text()
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: not an image list (not UTF-8 text: byte {exc.start})") from None
    ids = []
    for line in text.splitlines():
        line = line.strip()
        if line:
            ids.append(Path(line.split()[0]).stem)
    return ids


def split_ids(train_list: Path, val_list: Path) -> dict[str, list[str]]:
    """`{"train": ..., "val": ...}`: the train list without duplicates and without any val image.

    Raises UserError naming the list when one selects no image: an empty list, or a train list whose every id
    is in the val list.
    """
    val = list(dict.fromkeys(read_list(val_list)))
    if not val:
        raise UserError(f"{val_list}: the val list names no image (empty)")
    held_out = set(val)
    listed = list(dict.fromkeys(read_list(train_list)))
    if not listed:
        raise UserError(f"{train_list}: the train list names no image (empty)")
    train = [i for i in listed if i not in held_out]
    if not train:
        raise UserError(
            f"{train_list}: the train list selects no image: all {len(listed)} of its ids are in the val list "
            f"{val_list} (held out)"
        )
    return {"train": train, "val": val}


def read_label(path: Path, max_pixels: int = MAX_IMAGE_PIXELS) -> np.ndarray:
    """A VOC label PNG (grayscale or palette indices) -> `uint8 [H, W]`, checked to hold 0..20 and 255 and to
    have at most `max_pixels` pixels (from its header, before decoding)."""
    with opened_image(path, str(path), max_pixels, "label") as im:
        if im.mode not in ("L", "P"):
            raise UserError(f"{path}: label PNG must be single-channel (L or P), got mode {im.mode}")
        label = np.array(im, dtype=np.uint8)
    bad = np.setdiff1d(np.unique(label), np.r_[0 : len(VOC_CLASSES) + 1, IGNORE_INDEX])
    if bad.size:
        raise UserError(f"{path}: label values {bad.tolist()} outside 0..20 and 255")
    return label


class PascalSource:
    """One split of VOC 2012 + SBD in list order.

    Args:
        root: the VOC folder holding `JPEGImages/` and `SegmentationClassAug/`.
        split: "train" or "val".
        train_list, val_list: list files; default PFENet's lists shipped with jc2a (`default_list`).
        max_pixels: the largest label map read (width x height); larger ones are skipped before decoding.
    """

    def __init__(
        self,
        root: Path,
        split: str,
        train_list: Optional[Path] = None,
        val_list: Optional[Path] = None,
        max_pixels: int = MAX_IMAGE_PIXELS,
    ) -> None:
        self.root = Path(root)
        for sub in ("JPEGImages", "SegmentationClassAug"):
            if not (self.root / sub).is_dir():
                raise FileNotFoundError(f"folder not found: {self.root / sub}")
        if split not in ("train", "val"):
            raise ValueError(f"PASCAL split must be 'train' or 'val', got {split!r}")
        lists = split_ids(Path(train_list or default_list("train")), Path(val_list or default_list("val")))
        self.ids = lists[split]
        self.max_pixels = max_pixels
        self.class_names = {i: name for i, name in enumerate(VOC_CLASSES, start=1)}

    def __len__(self) -> int:
        return len(self.ids)

    def __iter__(self) -> Iterator[SourceItem]:
        for image_id in self.ids:
            label_path = self.root / "SegmentationClassAug" / f"{image_id}.png"
            yield SourceItem(
                key=f"voc2012/{image_id}",
                image_path=self.root / "JPEGImages" / f"{image_id}.jpg",
                label=lambda p=label_path: read_label(p, self.max_pixels),
                source=f"JPEGImages/{image_id}.jpg",
            )
