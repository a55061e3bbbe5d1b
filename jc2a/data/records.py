"""The shard record format: one image, its label map and a json header; encoding and decoding."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import cv2
import numpy as np

from jc2a.errors import RecordError
from jc2a.labels import IGNORE_INDEX


@dataclass
class SourceItem:
    """One image of a source dataset, before it becomes a record.

    `label()` builds the label map `uint8 [H, W]` (0 background, 1..N classes, 255 ignore);
    `size` is the (height, width) the source's metadata claims, or None when it has none;
    `error` says why the item cannot become a record (it is skipped and named; no file is read);
    `problems` names the parts left out of a record that is written (e.g. malformed annotations); `label()` may
    append to it.
    """

    key: str
    image_path: Path
    label: Callable[[], np.ndarray]
    source: str
    size: Optional[tuple[int, int]] = None
    error: Optional[str] = None
    problems: list[str] = field(default_factory=list)


def _is_bytes(data: object) -> bool:
    """Non-empty raw bytes (a member decoded by something else, e.g. into an object, is refused)."""
    return isinstance(data, (bytes, bytearray, memoryview)) and len(data) > 0


def decode_image(data: bytes, name: str = "image") -> np.ndarray:
    """JPEG/PNG bytes -> RGB `uint8 [H, W, 3]`; a RecordError naming `name` when unreadable."""
    # EXIF orientation is ignored: label maps are aligned with the stored pixels, as COCO's masks are.
    flags = cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION
    array = cv2.imdecode(np.frombuffer(data, np.uint8), flags) if _is_bytes(data) else None
    if array is None:
        what = f"{len(data)} bytes" if isinstance(data, (bytes, bytearray, memoryview)) else type(data).__name__
        raise RecordError(f"{name}: unreadable image ({what})")
    return cv2.cvtColor(array, cv2.COLOR_BGR2RGB)


def decode_label(data: bytes, name: str = "label") -> np.ndarray:
    """Label PNG bytes -> `uint8 [H, W]` (values as stored, never palette-converted)."""
    array = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED) if _is_bytes(data) else None
    if array is None or array.ndim != 2 or array.dtype != np.uint8:
        raise RecordError(f"{name}: unreadable or non single-channel 8-bit label PNG")
    return array


# Fast lossless PNG for label maps: zlib level 1 and no row filter (flat label regions compress well without one;
# about 5x faster than cv2's default here, and smaller).
_PNG_PARAMS = [cv2.IMWRITE_PNG_COMPRESSION, 1]
if hasattr(cv2, "IMWRITE_PNG_FILTER"):  # OpenCV >= 4.10
    _PNG_PARAMS += [cv2.IMWRITE_PNG_FILTER, cv2.IMWRITE_PNG_FILTER_NONE]


def encode_label(label: np.ndarray) -> bytes:
    """`uint8 [H, W]` -> single-channel PNG bytes (zlib level 1, no row filter)."""
    ok, buf = cv2.imencode(".png", np.ascontiguousarray(label, np.uint8), _PNG_PARAMS)
    if not ok:
        raise RecordError("label could not be PNG-encoded")
    return buf.tobytes()


def class_pixels(label: np.ndarray) -> dict[int, int]:
    """Pixel count of every class present (0 and 255 excluded)."""
    counts = np.bincount(label.ravel(), minlength=256)
    return {int(c): int(counts[c]) for c in np.flatnonzero(counts) if c not in (0, IGNORE_INDEX)}


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
    out[label == IGNORE_INDEX] = IGNORE_INDEX
    return out


def decode_record(sample: dict, name: Optional[str] = None) -> tuple[np.ndarray, np.ndarray, dict]:
    """A webdataset sample with raw `jpg`, `png`, `json` bytes -> (image, label, header).

    Only these three members are read, by cv2 and json: nothing is unpickled, whatever else the sample holds.
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
    if isinstance(meta, (bytes, str)):
        try:
            meta = json.loads(meta)
        except ValueError:
            raise RecordError(f"{name}: the json member is not JSON") from None
    if not isinstance(meta, dict):
        raise RecordError(f"{name}: the json member is not a JSON object")
    return image, label, meta
