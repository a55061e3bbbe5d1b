"""COCO 2014 instances json + images -> label maps with contiguous ids (SPEC §1 COCO-20i)."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path
from typing import Iterator

import numpy as np

from jc2a.data.records import IGNORE, SourceItem


def contiguous_ids(category_ids: list[int]) -> dict[int, int]:
    """COCO category id -> contiguous id: the rank of the id in ascending order (1 -> 1 ... 90 -> 80)."""
    return {cat_id: rank for rank, cat_id in enumerate(sorted(category_ids), start=1)}


def rasterize(coco, image_info: dict, to_contiguous: dict[int, int]) -> np.ndarray:
    """The label map `uint8 [H, W]` of one image: 0 background, 1..N classes, 255 ignore.

    Every instance is decoded by pycocotools (polygons, several polygons per instance, RLE). Larger
    instances are painted first so a smaller overlapping object stays visible; `iscrowd=1` regions become
    255 where no non-crowd instance covers them. (PFENet drops crowds and keeps only each instance's
    first polygon.)
    """
    height, width = image_info["height"], image_info["width"]
    label = np.zeros((height, width), np.uint8)
    anns = coco.loadAnns(coco.getAnnIds(imgIds=image_info["id"], iscrowd=None))
    things, crowd = [], np.zeros((height, width), bool)
    for ann in anns:
        mask = coco.annToMask(ann).astype(bool)
        if mask.shape != (height, width):
            raise ValueError(
                f"annotation {ann['id']} of image {image_info['file_name']}: mask {mask.shape[1]}x{mask.shape[0]} "
                f"but image {width}x{height}"
            )
        if ann.get("iscrowd", 0):
            crowd |= mask
        else:
            things.append((int(mask.sum()), ann["id"], to_contiguous[ann["category_id"]], mask))
    for _, _, class_id, mask in sorted(things, key=lambda t: (-t[0], t[1])):
        label[mask] = class_id
    label[crowd & (label == 0)] = IGNORE
    return label


class CocoSource:
    """The images of one COCO split in image-id order, each with its label map built on demand.

    Args:
        images: the image folder (e.g. `train2014/`).
        annotations: the instances json (e.g. `annotations/instances_train2014.json`).
    """

    def __init__(self, images: Path, annotations: Path) -> None:
        from pycocotools.coco import COCO

        self.images, self.annotations = Path(images), Path(annotations)
        if not self.annotations.is_file():
            raise FileNotFoundError(f"annotation file not found: {self.annotations}")
        if not self.images.is_dir():
            raise FileNotFoundError(f"image folder not found: {self.images}")
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
            try:
                self.coco = COCO(str(self.annotations))
            except (ValueError, KeyError, TypeError) as exc:
                raise ValueError(f"{self.annotations}: not a COCO instances file ({exc})") from None
        cats = sorted(self.coco.loadCats(self.coco.getCatIds()), key=lambda c: c["id"])
        self.to_contiguous = contiguous_ids([c["id"] for c in cats])
        self.class_names = {self.to_contiguous[c["id"]]: c["name"] for c in cats}
        self.folder = self.images.name

    def __len__(self) -> int:
        return len(self.coco.imgs)

    def __iter__(self) -> Iterator[SourceItem]:
        for image_id in sorted(self.coco.imgs):
            info = self.coco.imgs[image_id]
            yield SourceItem(
                key=f"{self.folder}/{image_id:012d}",
                image_path=self.images / info["file_name"],
                size=(info["height"], info["width"]),
                label=lambda info=info: rasterize(self.coco, info, self.to_contiguous),
                source=f"{self.folder}/{info['file_name']}",
            )
