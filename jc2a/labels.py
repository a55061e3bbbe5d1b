"""The label convention of every dataset: 0 background, 1..N contiguous class ids, `IGNORE_INDEX` never scored."""

from __future__ import annotations

__all__ = ["IGNORE_INDEX", "MASK_HELP"]

IGNORE_INDEX = 255  # label value of pixels that are never scored: crowds, boundaries, padding
# How a user's support mask is read (`jc2a predict`, `jc2a.Predictor`): its values to 1 object / 0 / 255 ignore.
MASK_HELP = (
    "support masks: a mask whose only values are 0 and 255 is a binary 0/255 mask (255 = object); otherwise 0 is "
    "background, 255 is ignore and any other value (1, a palette index, a class id) is the object. Palette PNGs are "
    "read as their indices; colour masks as black = background, white = 255, any other colour = object."
)
