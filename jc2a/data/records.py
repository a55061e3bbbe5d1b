"""The shard record format: one image, its label map and a json header; encoding and decoding."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import cv2
import numpy as np

IGNORE = 255  # label value that is never scored


@dataclass
class SourceItem:
    """One image of a source dataset, before it becomes a record.

    `label()` builds the label map `uint8 [H, W]` (0 background, 1..N classes, 255 ignore);
    `size` is the (height, width) the source's metadata claims, or None when it has none.
    """

    key: str
    image_path: Path
    label: Callable[[], np.ndarray]
    source: str
    size: Optional[tuple[int, int]] = None


class RecordError(ValueError):
    """A record that cannot be read: its message names the key (and shard where known)."""


def decode_image(data: bytes, name: str = "image") -> np.ndarray:
    """JPEG/PNG bytes -> RGB `uint8 [H, W, 3]`; a RecordError naming `name` when unreadable."""
    # EXIF orientation is ignored: label maps are aligned with the stored pixels, as COCO's masks are.
    flags = cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION
    array = cv2.imdecode(np.frombuffer(data, np.uint8), flags) if data else None
    if array is None:
        raise RecordError(f"{name}: unreadable image ({len(data)} bytes)")
    return cv2.cvtColor(array, cv2.COLOR_BGR2RGB)


def decode_label(data: bytes, name: str = "label") -> np.ndarray:
    """Label PNG bytes -> `uint8 [H, W]` (values as stored, never palette-converted)."""
    array = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED) if data else None
    if array is None or array.ndim != 2 or array.dtype != np.uint8:
        raise RecordError(f"{name}: unreadable or non single-channel 8-bit label PNG")
    return array


def encode_label(label: np.ndarray) -> bytes:
    """`uint8 [H, W]` -> single-channel PNG bytes."""
    ok, buf = cv2.imencode(".png", np.ascontiguousarray(label, np.uint8))
    if not ok:
        raise RecordError("label could not be PNG-encoded")
    return buf.tobytes()


def class_pixels(label: np.ndarray) -> dict[int, int]:
    """Pixel count of every class present (0 and 255 excluded)."""
    counts = np.bincount(label.ravel(), minlength=256)
    return {int(c): int(counts[c]) for c in np.flatnonzero(counts) if c not in (0, IGNORE)}


def header(label: np.ndarray, source: str) -> dict:
    """The record's `json` member: size, class pixel counts and where the image came from."""
    return {
        "height": int(label.shape[0]),
        "width": int(label.shape[1]),
        "classes": {str(c): n for c, n in class_pixels(label).items()},
        "source": source,
    }


def binarize(label: np.ndarray, class_id: int) -> np.ndarray:
    """Episode target for `class_id`: the class -> 1, 255 stays 255, everything else -> 0."""
    out = (label == class_id).astype(np.uint8)
    out[label == IGNORE] = IGNORE
    return out


def decode_record(sample: dict, name: Optional[str] = None) -> tuple[np.ndarray, np.ndarray, dict]:
    """A webdataset sample with raw `jpg`, `png`, `json` bytes -> (image, label, header).

    Raises RecordError naming the record when a member is missing or unreadable, or when the label's
    size differs from the image's.
    """
    name = name or f"record {sample.get('__key__', '?')} of {sample.get('__url__', '?')}"
    for member in ("jpg", "png", "json"):
        if member not in sample:
            raise RecordError(f"{name}: missing member '{member}'")
    image = decode_image(sample["jpg"], name)
    label = decode_label(sample["png"], name)
    if image.shape[:2] != label.shape:
        raise RecordError(
            f"{name}: label {label.shape[1]}x{label.shape[0]} but image {image.shape[1]}x{image.shape[0]}"
        )
    meta = sample["json"]
    meta = json.loads(meta) if isinstance(meta, (bytes, str)) else meta
    return image, label, meta
