"""The shard record format: one image, its label map and a json header; encoding and decoding.

Every image jc2a decodes (shard records, source images and labels, `jc2a predict`'s inputs) is first measured from
its header (`image_size`: PIL reads the header only) against one pixel limit, `data.max_image_pixels`
(`MAX_IMAGE_PIXELS` by default), so a decompression bomb is refused before a byte of it is decoded.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import threading
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional, Union

import cv2
import numpy as np
from PIL import Image

from jc2a.config import DataConfig
from jc2a.errors import RecordError
from jc2a.labels import IGNORE_INDEX

MAX_IMAGE_PIXELS: int = DataConfig.model_fields["max_image_pixels"].default  # data.max_image_pixels' default


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


_NO_PIL_CEILING = threading.Lock()  # held while PIL's own ceiling is lifted to read a bomb's header


class ImageTooLarge(RecordError):
    """An image whose header declares more pixels than the limit: refused before it is decoded."""


@contextlib.contextmanager
def opened_image(
    source: Union[bytes, bytearray, memoryview, str, os.PathLike], name: str, max_pixels: int, what: str = "image"
) -> Iterator[Image.Image]:
    """A PIL image of `source` (bytes or a file), opened lazily (header only) and checked against `max_pixels`
    (width x height) before anything is decoded: ImageTooLarge, or RecordError when no header can be read, both
    naming `name`. PIL's own bomb warning is silenced; its bomb error (above `PIL_PIXEL_CEILING`, more than any
    allowed limit) is ImageTooLarge."""
    if not isinstance(max_pixels, int) or isinstance(max_pixels, bool) or max_pixels < 1:
        raise ValueError(f"max_pixels must be a positive integer, got {max_pixels!r}")
    fp = io.BytesIO(source) if isinstance(source, (bytes, bytearray, memoryview)) else source
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            image = Image.open(fp)
        except Image.DecompressionBombError:  # over PIL's own ceiling: its header again, to name the size
            if hasattr(fp, "seek"):
                fp.seek(0)
            with _NO_PIL_CEILING:
                saved, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
                try:
                    image = Image.open(fp)  # the header only; refused below, never decoded
                except Exception:
                    raise ImageTooLarge(f"{name}: {what} of more than {max_pixels} pixels (data.max_image_pixels)"
                                        ) from None  # fmt: skip
                finally:
                    Image.MAX_IMAGE_PIXELS = saved
        except Exception as exc:  # PIL raises several types for what it cannot identify
            raise RecordError(f"{name}: unreadable {what} ({' '.join(str(exc).split())[:200]})") from None
        with image:
            width, height = image.size
            if width * height > max_pixels:
                raise ImageTooLarge(
                    f"{name}: {what} {width}x{height} = {width * height} pixels, more than the limit of {max_pixels} "
                    "(data.max_image_pixels); refused before decoding"
                )
            yield image


def image_size(
    source: Union[bytes, str, os.PathLike], name: str, max_pixels: int = MAX_IMAGE_PIXELS, what: str = "image"
) -> tuple[int, int]:
    """(height, width) of an image (bytes or a file) from its header, within `max_pixels`; nothing decoded."""
    with opened_image(source, name, max_pixels, what) as image:
        return image.size[1], image.size[0]


def decode_image(data: bytes, name: str = "image", max_pixels: int = MAX_IMAGE_PIXELS) -> np.ndarray:
    """JPEG/PNG bytes -> RGB `uint8 [H, W, 3]`; a RecordError naming `name` when unreadable or larger than
    `max_pixels` (checked from the header, before decoding)."""
    if _is_bytes(data):
        image_size(data, name, max_pixels)
    # EXIF orientation is ignored: label maps are aligned with the stored pixels, as COCO's masks are.
    flags = cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION
    array = cv2.imdecode(np.frombuffer(data, np.uint8), flags) if _is_bytes(data) else None
    if array is None:
        what = f"{len(data)} bytes" if isinstance(data, (bytes, bytearray, memoryview)) else type(data).__name__
        raise RecordError(f"{name}: unreadable image ({what})")
    return cv2.cvtColor(array, cv2.COLOR_BGR2RGB)


def decode_label(data: bytes, name: str = "label", max_pixels: int = MAX_IMAGE_PIXELS) -> np.ndarray:
    """Label PNG bytes -> `uint8 [H, W]` (values as stored, never palette-converted); larger than `max_pixels`
    is refused from the header, before decoding."""
    if _is_bytes(data):
        try:
            image_size(data, name, max_pixels, "label")
        except ImageTooLarge:
            raise
        except RecordError:
            raise RecordError(f"{name}: unreadable or non single-channel 8-bit label PNG") from None
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


def decode_record(
    sample: dict, name: Optional[str] = None, max_pixels: int = MAX_IMAGE_PIXELS
) -> tuple[np.ndarray, np.ndarray, dict]:
    """A webdataset sample with raw `jpg`, `png`, `json` bytes -> (image, label, header).

    Only these three members are read, by cv2 and json: nothing is unpickled, whatever else the sample holds.
    Raises RecordError naming the record when a member is missing or unreadable, when the image or the label
    declares more than `max_pixels` pixels (from its header, before decoding), or when the label's size differs
    from the image's.
    """
    name = name or f"record {sample.get('__key__', '?')} of {sample.get('__url__', '?')}"
    for member in ("jpg", "png", "json"):
        if member not in sample:
            raise RecordError(f"{name}: missing member '{member}'")
    image = decode_image(sample["jpg"], name, max_pixels)
    label = decode_label(sample["png"], name, max_pixels)
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
        except RecursionError:  # json's parser stops at Python's recursion limit
            raise RecordError(f"{name}: the json member is nested too deep to be a record header") from None
    if not isinstance(meta, dict):
        raise RecordError(f"{name}: the json member is not a JSON object")
    return image, label, meta
