"""COCO 2014 instances json + images -> label maps with COCO's fixed contiguous ids (docs/PROTOCOL.md)."""

from __future__ import annotations

import json
import math
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any, Iterator, Optional

import numpy as np
from pycocotools import mask as mask_utils

from jc2a.data.records import MAX_IMAGE_PIXELS, SourceItem
from jc2a.errors import UserError
from jc2a.labels import IGNORE_INDEX

# The 80 real COCO 2014 categories: ids with their gaps (no 12, 26, 29, 30, 45, 66, 68, 69, 71, 83).
COCO_CATEGORIES: list[dict] = [
    {"id": cat_id, "name": name, "supercategory": supercategory}
    for cat_id, name, supercategory in [
        (1, "person", "person"), (2, "bicycle", "vehicle"), (3, "car", "vehicle"), (4, "motorcycle", "vehicle"),
        (5, "airplane", "vehicle"), (6, "bus", "vehicle"), (7, "train", "vehicle"), (8, "truck", "vehicle"),
        (9, "boat", "vehicle"), (10, "traffic light", "outdoor"), (11, "fire hydrant", "outdoor"),
        (13, "stop sign", "outdoor"), (14, "parking meter", "outdoor"), (15, "bench", "outdoor"),
        (16, "bird", "animal"), (17, "cat", "animal"), (18, "dog", "animal"), (19, "horse", "animal"),
        (20, "sheep", "animal"), (21, "cow", "animal"), (22, "elephant", "animal"), (23, "bear", "animal"),
        (24, "zebra", "animal"), (25, "giraffe", "animal"), (27, "backpack", "accessory"),
        (28, "umbrella", "accessory"), (31, "handbag", "accessory"), (32, "tie", "accessory"),
        (33, "suitcase", "accessory"), (34, "frisbee", "sports"), (35, "skis", "sports"),
        (36, "snowboard", "sports"), (37, "sports ball", "sports"), (38, "kite", "sports"),
        (39, "baseball bat", "sports"), (40, "baseball glove", "sports"), (41, "skateboard", "sports"),
        (42, "surfboard", "sports"), (43, "tennis racket", "sports"), (44, "bottle", "kitchen"),
        (46, "wine glass", "kitchen"), (47, "cup", "kitchen"), (48, "fork", "kitchen"), (49, "knife", "kitchen"),
        (50, "spoon", "kitchen"), (51, "bowl", "kitchen"), (52, "banana", "food"), (53, "apple", "food"),
        (54, "sandwich", "food"), (55, "orange", "food"), (56, "broccoli", "food"), (57, "carrot", "food"),
        (58, "hot dog", "food"), (59, "pizza", "food"), (60, "donut", "food"), (61, "cake", "food"),
        (62, "chair", "furniture"), (63, "couch", "furniture"), (64, "potted plant", "furniture"),
        (65, "bed", "furniture"), (67, "dining table", "furniture"), (70, "toilet", "furniture"),
        (72, "tv", "electronic"), (73, "laptop", "electronic"), (74, "mouse", "electronic"),
        (75, "remote", "electronic"), (76, "keyboard", "electronic"), (77, "cell phone", "electronic"),
        (78, "microwave", "appliance"), (79, "oven", "appliance"), (80, "toaster", "appliance"),
        (81, "sink", "appliance"), (82, "refrigerator", "appliance"), (84, "book", "indoor"),
        (85, "clock", "indoor"), (86, "vase", "indoor"), (87, "scissors", "indoor"), (88, "teddy bear", "indoor"),
        (89, "hair drier", "indoor"), (90, "toothbrush", "indoor"),
    ]
]  # fmt: skip

# Contiguous id = rank of the category id in this table (1 -> 1 ... 90 -> 80), never in a file's own list.
COCO_CONTIGUOUS: dict[int, int] = {c["id"]: rank for rank, c in enumerate(COCO_CATEGORIES, start=1)}
COCO_CLASS_NAMES: dict[int, str] = {rank: c["name"] for rank, c in enumerate(COCO_CATEGORIES, start=1)}
_NAME_OF_ID: dict[int, str] = {c["id"]: c["name"] for c in COCO_CATEGORIES}


# --------------------------------------------------------------------------- the file


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_categories(categories: list, path: Path) -> None:
    """Refuse a `categories` list that differs from COCO's 80 (an id added or missing, a name changed)."""
    listed: dict[int, str] = {}
    for cat in categories:
        if not isinstance(cat, dict) or not _is_int(cat.get("id")) or not isinstance(cat.get("name"), str):
            raise UserError(f"{path}: category {str(cat)[:80]} has no integer 'id' and string 'name'")
        if cat["id"] in listed:
            raise UserError(f"{path}: category id {cat['id']} is listed twice")
        listed[cat["id"]] = cat["name"]
    for cat_id, name in listed.items():
        if cat_id not in _NAME_OF_ID:
            raise UserError(f"{path}: category id {cat_id} {name!r} is not one of COCO's 80 categories")
    for cat_id, name in listed.items():
        if name != _NAME_OF_ID[cat_id]:
            raise UserError(
                f"{path}: category id {cat_id} is named {name!r}, COCO's table says {_NAME_OF_ID[cat_id]!r}"
            )
    for cat_id, name in _NAME_OF_ID.items():
        if cat_id not in listed:
            raise UserError(f"{path}: category id {cat_id} {name!r} is missing")


def read_instances(path: Path) -> dict:
    """A COCO instances file as a dict; one ValueError naming the file when it is not one."""
    try:
        data = json.loads(Path(path).read_bytes())
    except (ValueError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: not a COCO instances file (not JSON: {exc})") from None
    except RecursionError:  # json's parser stops at Python's recursion limit (a COCO file has 5 levels)
        raise UserError(f"{path}: not a COCO instances file (JSON nested too deep)") from None
    keys = ("images", "annotations", "categories")
    if not isinstance(data, dict):
        raise UserError(f"{path}: not a COCO instances file (a JSON {type(data).__name__}, expected an object)")
    missing = [k for k in keys if k not in data]
    if missing:
        raise UserError(f"{path}: not a COCO instances file (no {', '.join(repr(k) for k in missing)})")
    for key in keys:
        if not isinstance(data[key], list):
            raise UserError(f"{path}: not a COCO instances file ({key!r} is a {type(data[key]).__name__}, not a list)")
    check_categories(data["categories"], path)
    return data


# --------------------------------------------------------------------------- one annotation


def _rle_string_problem(counts: str, height: int, width: int) -> Optional[str]:
    """Why pycocotools should not be given this compressed RLE string, or None; pycocotools decodes it.

    pycocotools' C parser trusts the characters: they must be COCO's 6-bit digits ('0'..'o') and the last must
    end its run, or it reads past the string. Coverage is left to pycocotools' decoder, which refuses runs past
    its canvas: the runs cover the image exactly when they decode on its canvas and not on one a pixel smaller
    (so too many or negative runs, and too few that would leave pixels unset, are refused).
    """
    bad = next((c for c in counts if not "0" <= c <= "o"), None)
    if bad is not None:
        return f"malformed compressed RLE (character {bad!r})"
    if not counts or (ord(counts[-1]) - 48) & 0x20:
        return "malformed compressed RLE (empty or truncated)"
    data, pixels = counts.encode("ascii"), height * width

    def decodes(size: list[int]) -> bool:
        try:
            mask_utils.decode({"size": size, "counts": data})
        except ValueError:  # pycocotools: "Invalid RLE mask representation"
            return False
        return True

    if not decodes([height, width]):
        return f"compressed RLE covers more than the image's {pixels} pixels"
    if decodes([pixels - 1, 1]):
        return f"compressed RLE covers fewer than the image's {pixels} pixels"
    return None


def _polygon_problem(poly: Any, height: int, width: int) -> Optional[str]:
    if not isinstance(poly, list) or not all(_is_number(v) for v in poly):
        return "polygon with non-numeric coordinates"
    if len(poly) % 2 or len(poly) < 6:
        return f"polygon with {len(poly) / 2:g} points (needs >= 3)"
    xs, ys = poly[0::2], poly[1::2]  # a little outside is common in COCO; far outside would make pycocotools crawl
    if min(xs) < -width or max(xs) > 2 * width or min(ys) < -height or max(ys) > 2 * height:
        return "polygon far outside the image"
    return None


def segmentation_problem(segmentation: Any, height: int, width: int) -> Optional[str]:
    """Why pycocotools should not be given this segmentation (checked before any C code sees it), or None."""
    if segmentation is None:
        return "no segmentation (bbox only)"
    if isinstance(segmentation, list):
        if not segmentation:
            return "empty segmentation"
        return next((p for p in (_polygon_problem(q, height, width) for q in segmentation) if p), None)
    if not isinstance(segmentation, dict):
        return f"segmentation is a {type(segmentation).__name__}"
    size, counts = segmentation.get("size"), segmentation.get("counts")
    if not isinstance(size, list) or len(size) != 2 or not all(_is_int(v) for v in size):
        return "RLE without a [height, width] size"
    if size != [height, width]:
        return f"RLE size {size[1]}x{size[0]} differs from the image's {width}x{height}"
    if isinstance(counts, list):
        if not counts or not all(_is_int(v) and v >= 0 for v in counts):
            return "RLE counts are not non-negative integers"
        if sum(counts) != height * width:
            return f"RLE covers {sum(counts)} pixels, the image has {height * width}"
        return None
    if isinstance(counts, str):
        return _rle_string_problem(counts, height, width)
    return "RLE without counts"


def decode_mask(segmentation: Any, height: int, width: int) -> np.ndarray:
    """One checked segmentation -> `bool [H, W]`, decoded by pycocotools (polygons, several per instance, RLE)."""
    if isinstance(segmentation, list):
        rle = mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
    elif isinstance(segmentation["counts"], list):
        rle = mask_utils.frPyObjects(segmentation, height, width)
    else:
        rle = {"size": segmentation["size"], "counts": segmentation["counts"].encode("ascii")}
    return mask_utils.decode(rle).astype(bool)


def rasterize(image_info: dict, anns: list[dict], problems: Optional[list[str]] = None) -> np.ndarray:
    """The label map `uint8 [H, W]` of one image: 0 background, 1..80 COCO's contiguous ids, 255 ignore.

    `anns` are checked annotations (`CocoSource` checks them). Larger instances are painted first so a smaller
    overlapping object stays visible; `iscrowd=1` regions become 255 where no non-crowd instance covers them.
    (PFENet drops crowds and keeps only each instance's first polygon.) An annotation pycocotools cannot decode
    is left out and named in `problems`.
    """
    height, width = image_info["height"], image_info["width"]
    label = np.zeros((height, width), np.uint8)
    things, crowd = [], np.zeros((height, width), bool)
    for ann in anns:
        try:
            mask = decode_mask(ann["segmentation"], height, width)
        except Exception as exc:  # pycocotools raises several types
            if problems is not None:
                problems.append(f"annotation {ann['id']}: pycocotools could not decode it ({exc})")
            continue
        if ann.get("iscrowd", 0):
            crowd |= mask
        else:
            things.append((int(mask.sum()), ann["id"], COCO_CONTIGUOUS[ann["category_id"]], mask))
    for _, _, class_id, mask in sorted(things, key=lambda t: (-t[0], t[1])):
        label[mask] = class_id
    label[crowd & (label == 0)] = IGNORE_INDEX
    return label


# --------------------------------------------------------------------------- the source


def _file_name_problem(name: Any) -> Optional[str]:
    """Why `name` is not a plain relative path inside the image folder, or None."""
    if not isinstance(name, str) or not name or "\x00" in name:
        return f"file name {name!r} is not a plain relative path"
    if PurePosixPath(name).is_absolute() or PureWindowsPath(name).is_absolute() or PureWindowsPath(name).drive:
        return f"file name {name!r} is absolute: it would leave the image folder"
    if ".." in PurePosixPath(name.replace("\\", "/")).parts:
        return f"file name {name!r} contains '..': it would leave the image folder"
    return None


def _image_problem(info: Any, max_pixels: int = MAX_IMAGE_PIXELS) -> Optional[str]:
    if not isinstance(info, dict):
        return "image entry is not an object"
    if not _is_int(info.get("id")) or info["id"] < 0:
        return f"image id {info.get('id')!r} is not a non-negative integer"
    for key in ("height", "width"):
        if not _is_int(info.get(key)) or info[key] <= 0:
            return f"image {key} {info.get(key)!r} is not a positive integer"
    if info["height"] * info["width"] > max_pixels:  # its label (and any RLE check) would be that large
        return (
            f"image size {info['width']}x{info['height']} is more than {max_pixels} pixels "
            "(data.max_image_pixels)"
        )
    return _file_name_problem(info.get("file_name"))


def _annotation_problem(ann: dict, info: dict, seen: set[int]) -> Optional[str]:
    """Why an annotation of a listed image is left out, or None."""
    if not _is_int(ann.get("id")):
        return "no integer id"
    if ann["id"] in seen:
        return "its id is listed twice"
    if not _is_int(ann.get("category_id")) or ann["category_id"] not in COCO_CONTIGUOUS:
        return f"unknown category id {ann.get('category_id')!r}"
    if not _is_int(ann.get("iscrowd", 0)) or ann.get("iscrowd", 0) not in (0, 1):
        return f"iscrowd {ann.get('iscrowd')!r} is not 0 or 1"
    return segmentation_problem(ann.get("segmentation"), info["height"], info["width"])


class CocoSource:
    """The images of one COCO split in image-id order, each with its label map built on demand.

    Malformed input is skipped and named, never fatal: an image whose entry is broken or whose file name leaves
    the image folder is skipped (`SourceItem.error`); a malformed annotation is left out and named
    (`SourceItem.problems`) while the image and its other annotations are written; an annotation of an image the
    file does not list is named in `problems`. A file that is not a COCO instances file, or whose categories
    differ from COCO's 80, is refused (ValueError naming the file).

    Args:
        images: the image folder (e.g. `train2014/`).
        annotations: the instances json (e.g. `annotations/instances_train2014.json`).
        max_pixels: an image whose entry declares more pixels (width x height) is skipped before its label or
            RLE masks are allocated (the image file itself is measured from its header when it is written).
    """

    def __init__(self, images: Path, annotations: Path, max_pixels: int = MAX_IMAGE_PIXELS) -> None:
        self.images, self.annotations = Path(images), Path(annotations)
        if not self.annotations.is_file():
            raise FileNotFoundError(f"annotation file not found: {self.annotations}")
        if not self.images.is_dir():
            raise FileNotFoundError(f"image folder not found: {self.images}")
        data = read_instances(self.annotations)
        if not data["images"]:
            raise UserError(f"{self.annotations}: lists no image ('images' is empty); nothing to write")
        self.folder = self.images.name
        self.class_names = dict(COCO_CLASS_NAMES)
        self.problems: list[dict] = []  # {"source", "reason"} of annotations that belong to no listed image
        infos: dict[int, dict] = {}
        broken: list[tuple[str, Optional[dict], str, Optional[str]]] = []
        skipped_ids: set[int] = set()
        for i, info in enumerate(data["images"]):
            error = _image_problem(info, max_pixels)
            if error is None and info["id"] in infos:
                error = f"image id {info['id']} is listed twice"
            if error is None:
                infos[info["id"]] = info
                continue
            if isinstance(info, dict) and _is_int(info.get("id")) and info["id"] not in infos:
                skipped_ids.add(info["id"])  # its annotations go with it, unreported
            name = info.get("file_name") if isinstance(info, dict) else None
            plain = _file_name_problem(name) is None
            source = f"{self.folder}/{name}" if plain else f"{self.annotations.name} images[{i}]"
            broken.append((f"{self.folder}/images[{i}]", None, source, error))
        self._items = [  # key, image entry, source, why it is skipped
            (f"{self.folder}/{image_id:012d}", infos[image_id], f"{self.folder}/{infos[image_id]['file_name']}", None)
            for image_id in sorted(infos)
        ] + broken
        self._anns: dict[int, list[dict]] = {}  # image id -> its checked annotations
        self._ann_problems: dict[int, list[str]] = {}  # image id -> its annotations left out, and why
        seen: set[int] = set()
        for i, ann in enumerate(data["annotations"]):
            image_id = ann.get("image_id") if isinstance(ann, dict) else None
            name = f"annotation {ann.get('id')!r}" if isinstance(ann, dict) else f"annotations[{i}]"
            if _is_int(image_id) and image_id in skipped_ids and image_id not in infos:
                continue
            if not _is_int(image_id) or image_id not in infos:
                reason = f"{name}: image id {image_id!r} is not among the file's images"
                self.problems.append({"source": self.annotations.name, "reason": reason})
                continue
            reason = _annotation_problem(ann, infos[image_id], seen)
            if reason is None:
                seen.add(ann["id"])
                self._anns.setdefault(image_id, []).append(ann)
            else:
                self._ann_problems.setdefault(image_id, []).append(f"{name}: {reason}")

    def __len__(self) -> int:
        return len(self._items)

    def __iter__(self) -> Iterator[SourceItem]:
        for key, info, source, error in self._items:
            if error is not None:
                yield SourceItem(key=key, image_path=self.images, label=_no_label, source=source, error=error)
                continue
            problems = list(self._ann_problems.get(info["id"], []))
            anns = self._anns.get(info["id"], [])
            yield SourceItem(
                key=key,
                image_path=self.images / info["file_name"],
                size=(info["height"], info["width"]),
                label=lambda info=info, anns=anns, problems=problems: rasterize(info, anns, problems),
                source=source,
                problems=problems,
            )


def _no_label() -> np.ndarray:
    raise ValueError("this item has no label (it is skipped)")
