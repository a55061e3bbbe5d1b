"""The label convention of every dataset: 0 background, 1..N contiguous class ids, `IGNORE_INDEX` never scored."""

from __future__ import annotations

__all__ = ["IGNORE_INDEX"]

IGNORE_INDEX = 255  # label value of pixels that are never scored: crowds, boundaries, padding
