"""PFENet's train and eval transforms on (image, label) pairs: numpy/cv2, an explicit rng, uint8 tensors at the end."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional, Protocol, Sequence

import cv2
import numpy as np
import torch

from jc2a.labels import IGNORE_INDEX

if TYPE_CHECKING:
    from jc2a.config import AugmentConfig

__all__ = [
        "Compose",
    "RandCrop",
    "RandRotate",
    "RandScale",
    "RandomGaussianBlur",
    "RandomHorizontalFlip",
    "Resize",
    "TestResize",
    "ToTensor",
    "Transform",
    "CANVASES",
    "check_size",
    "eval_canvas",
    "eval_transform",
    "mean_pixel",
    "canvas_size",
    "train_transform",
]



class Transform(Protocol):
    """One step: `(image, label, rng) -> (image, label)`; deterministic steps ignore `rng`."""

    def __call__(self, image: Any, label: Any, rng: Optional[np.random.Generator] = None) -> tuple[Any, Any]: ...


# --------------------------------------------------------------------------- helpers


def check_size(size: int) -> int:
    """Return `size` if it is a valid network input side, `(size - 1) % 8 == 0`; raise ValueError otherwise."""
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 9 or (size - 1) % 8 != 0:
        raise ValueError(
            f"image size must be an integer >= 9 with (size - 1) % 8 == 0, e.g. 473, 641 or 129; got {size!r}"
        )
    return int(size)


def mean_pixel(mean: Sequence[float]) -> tuple[int, int, int]:
    """The padding colour of a uint8 RGB image: `round(mean * 255)` per channel, `mean` in 0..1 units."""
    r, g, b = (int(np.floor(float(m) * 255.0 + 0.5)) for m in mean)
    return r, g, b




def _range(name: str, values: Sequence[float]) -> tuple[float, float]:
    lo, hi = (float(v) for v in values)
    if lo > hi:
        raise ValueError(f"{name} range must be (low, high) with low <= high, got {tuple(values)}")
    return lo, hi


def _probability(name: str, p: float) -> float:
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"{name} probability must be in [0, 1], got {p}")
    return float(p)


def _check_pair(step: str, image: Any, label: Any, channels_first: bool = False) -> tuple[int, int]:
    """Check an image `[H,W,3]` (or `[3,H,W]` with `channels_first`) against a label `[H,W]`; return `(H, W)`."""
    if image.ndim != 3 or image.shape[0 if channels_first else 2] != 3:
        layout = "[3,H,W]" if channels_first else "[H,W,3]"
        raise ValueError(f"{step}: image must be {layout} RGB, got shape {tuple(image.shape)}")
    if label.ndim != 2:
        raise ValueError(f"{step}: label must be [H,W], got shape {tuple(label.shape)}")
    h, w = image.shape[1:] if channels_first else image.shape[:2]
    if (h, w) != tuple(label.shape):
        raise ValueError(f"{step}: image {h}x{w} but label {label.shape[0]}x{label.shape[1]}")
    return int(h), int(w)


def _check_rng(step: str, rng: Optional[np.random.Generator]) -> np.random.Generator:
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"{step} draws random numbers: pass rng=np.random.Generator, got {type(rng).__name__}")
    return rng


def _resize(image: np.ndarray, label: np.ndarray, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """Image bilinear, label nearest, both to `h x w`.

    The label uses INTER_NEAREST_EXACT (pixel-centre aligned like INTER_LINEAR); cv2's INTER_NEAREST, which PFENet
    uses, samples `floor(x / s)` and shifts the label by up to half a source pixel against the image.
    """
    if (h, w) == label.shape:
        return image, label
    image = cv2.resize(image, (w, h), interpolation=cv2.INTER_LINEAR)
    label = cv2.resize(label, (w, h), interpolation=cv2.INTER_NEAREST_EXACT)
    return image, label


# --------------------------------------------------------------------------- training augmentation


class RandScale:
    """Isotropic random scale by `s ~ U(scale)`: image bilinear, label nearest (PFENet's RandScale, aspect 1)."""

    def __init__(self, scale: Sequence[float] = (0.9, 1.1)) -> None:
        self.scale = _range("RandScale scale", scale)
        if self.scale[0] <= 0:
            raise ValueError(f"RandScale scale must be positive, got {tuple(scale)}")

    def __call__(
        self, image: np.ndarray, label: np.ndarray, rng: Optional[np.random.Generator] = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """`[H,W,3]`, `[H,W]` -> `[h,w,3]`, `[h,w]` with `(h, w) = round(s * (H, W))`."""
        h, w = _check_pair("RandScale", image, label)
        s = _check_rng("RandScale", rng).uniform(*self.scale)
        return _resize(image, label, max(1, round(h * s)), max(1, round(w * s)))

    def __repr__(self) -> str:
        return f"RandScale(scale={self.scale})"


class RandRotate:
    """With probability `p`, rotate about the centre by `a ~ U(rotate)` degrees (PFENet's RandRotate).

    Image bilinear with border `padding` (the mean pixel), label nearest with border `ignore`; the size is kept.
    """

    def __init__(
        self,
        rotate: Sequence[float] = (-10.0, 10.0),
        p: float = 0.5,
        *,
        padding: Sequence[int],
        ignore: int = IGNORE_INDEX,
    ) -> None:
        self.rotate = _range("RandRotate rotate", rotate)
        self.p = _probability("RandRotate", p)
        self.padding = tuple(int(v) for v in padding)
        self.ignore = int(ignore)

    def __call__(
        self, image: np.ndarray, label: np.ndarray, rng: Optional[np.random.Generator] = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """`[H,W,3]`, `[H,W]` -> same shapes."""
        h, w = _check_pair("RandRotate", image, label)
        rng = _check_rng("RandRotate", rng)
        if rng.random() >= self.p:
            return image, label
        angle = rng.uniform(*self.rotate)
        matrix = cv2.getRotationMatrix2D(((w - 1) / 2.0, (h - 1) / 2.0), angle, 1.0)
        image = cv2.warpAffine(
            image, matrix, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=self.padding
        )
        label = cv2.warpAffine(
            label, matrix, (w, h), flags=cv2.INTER_NEAREST, borderMode=cv2.BORDER_CONSTANT, borderValue=self.ignore
        )
        return image, label

    def __repr__(self) -> str:
        return f"RandRotate(rotate={self.rotate}, p={self.p}, padding={self.padding}, ignore={self.ignore})"


class RandomGaussianBlur:
    """With probability `p`, blur the image (not the label) with a `radius x radius` Gaussian, sigma from the size."""

    def __init__(self, radius: int = 5, p: float = 0.5) -> None:
        if radius < 1 or radius % 2 != 1:
            raise ValueError(f"RandomGaussianBlur radius (kernel size) must be odd and positive, got {radius}")
        self.radius = int(radius)
        self.p = _probability("RandomGaussianBlur", p)

    def __call__(
        self, image: np.ndarray, label: np.ndarray, rng: Optional[np.random.Generator] = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """`[H,W,3]`, `[H,W]` -> same shapes."""
        _check_pair("RandomGaussianBlur", image, label)
        if _check_rng("RandomGaussianBlur", rng).random() < self.p:
            image = cv2.GaussianBlur(image, (self.radius, self.radius), 0)
        return image, label

    def __repr__(self) -> str:
        return f"RandomGaussianBlur(radius={self.radius}, p={self.p})"


class RandomHorizontalFlip:
    """With probability `p`, mirror image and label left to right."""

    def __init__(self, p: float = 0.5) -> None:
        self.p = _probability("RandomHorizontalFlip", p)

    def __call__(
        self, image: np.ndarray, label: np.ndarray, rng: Optional[np.random.Generator] = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """`[H,W,3]`, `[H,W]` -> same shapes."""
        _check_pair("RandomHorizontalFlip", image, label)
        if _check_rng("RandomHorizontalFlip", rng).random() < self.p:
            image, label = cv2.flip(image, 1), cv2.flip(label, 1)
        return image, label

    def __repr__(self) -> str:
        return f"RandomHorizontalFlip(p={self.p})"


class RandCrop:
    """Pad to at least `size x size`, then crop `size x size` at random, retrying to keep the target (PFENet's Crop).

    Padding is split around the centre (`pad // 2` before, the rest after): image with `padding`, label with
    `ignore`. A crop is accepted when it keeps at least `keep` of the label's target (`== 1`) pixels; otherwise up
    to `retries` more crops are drawn and the last one is taken. A label without target pixels gets one crop.
    """

    def __init__(
        self,
        size: int,
        *,
        padding: Sequence[int],
        ignore: int = IGNORE_INDEX,
        retries: int = 30,
        keep: float = 0.85,
    ) -> None:
        if size < 1:
            raise ValueError(f"RandCrop size must be positive, got {size}")
        if retries < 0:
            raise ValueError(f"RandCrop retries must be >= 0, got {retries}")
        self.size = int(size)
        self.padding = tuple(int(v) for v in padding)
        self.ignore = int(ignore)
        self.retries = int(retries)
        self.keep = _probability("RandCrop keep", keep)

    def __call__(
        self, image: np.ndarray, label: np.ndarray, rng: Optional[np.random.Generator] = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """`[H,W,3]`, `[H,W]` -> `[S,S,3]`, `[S,S]` with `S = size`."""
        _check_pair("RandCrop", image, label)
        rng = _check_rng("RandCrop", rng)
        image, label = self._pad(image, label)
        h, w = label.shape
        s = self.size

        # 1. every candidate offset at once: the first crop, then the retries
        target = label == 1
        total = int(np.count_nonzero(target))
        n = self.retries + 1 if total else 1
        ys = rng.integers(0, h - s + 1, size=n)
        xs = rng.integers(0, w - s + 1, size=n)

        # 2. the first candidate that keeps enough of the target, else the last one
        pick = n - 1
        if total:
            sat = cv2.integral(target.view(np.uint8))  # [h+1, w+1] summed-area table of the target
            kept = sat[ys + s, xs + s] - sat[ys, xs + s] - sat[ys + s, xs] + sat[ys, xs]
            good = np.flatnonzero(kept >= self.keep * total)
            if good.size:
                pick = int(good[0])
        y, x = int(ys[pick]), int(xs[pick])
        return np.ascontiguousarray(image[y : y + s, x : x + s]), np.ascontiguousarray(label[y : y + s, x : x + s])

    def _pad(self, image: np.ndarray, label: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        h, w = label.shape
        pad_h, pad_w = max(self.size - h, 0), max(self.size - w, 0)
        if not (pad_h or pad_w):
            return image, label
        top, left = pad_h // 2, pad_w // 2
        border = (top, pad_h - top, left, pad_w - left)
        image = cv2.copyMakeBorder(image, *border, cv2.BORDER_CONSTANT, value=self.padding)
        label = cv2.copyMakeBorder(label, *border, cv2.BORDER_CONSTANT, value=self.ignore)
        return image, label

    def __repr__(self) -> str:
        return (
            f"RandCrop(size={self.size}, padding={self.padding}, ignore={self.ignore}, "
            f"retries={self.retries}, keep={self.keep})"
        )


# --------------------------------------------------------------------------- deterministic steps


CANVASES = ("resize", "test_resize")  # `data.eval_resize`: PFENet's Resize (its configs' default) | test_Resize


def canvas_size(h: int, w: int, size: int, upscale: bool = True) -> tuple[int, int]:
    """PFENet's `find_new_hw`: the image size on the evaluation canvas.

    `upscale=True`, PFENet's `Resize` (every shipped config sets `resized_val: True`): the longer side is scaled to
    `size` whether the image is smaller or larger, the other side truncated, then *both* sides are floored to a
    multiple of 8: 375x500 -> 352x472, 300x400 -> 352x472, 473x473 -> 472x472. `upscale=False`, PFENet's
    `test_Resize`: only an image whose longer side exceeds `size` is scaled (and floored); a smaller one keeps its
    size. A side that would floor to 0 (an image over 60 times longer than wide) is kept at 8, where PFENet's code
    would fail.
    """
    if not upscale and max(h, w) <= size:
        return h, w
    if h >= w:
        new_h, new_w = size, int(w * (size * 1.0 / h))
    else:
        new_h, new_w = int(h * (size * 1.0 / w)), size
    return max(8, new_h // 8 * 8), max(8, new_w // 8 * 8)


class Resize:
    """PFENet's evaluation canvas: the image top-left on a black `size x size` canvas, the label on a 255 canvas.

    `upscale=True` is PFENet's `Resize` (the default of its configs), `upscale=False` its `test_Resize` (see
    `canvas_size`). Image bilinear, label nearest (cv2.INTER_NEAREST, as PFENet), both to `canvas_size(h, w, size,
    upscale)`. The canvas is black *before* normalisation, so the padding is `-mean/std` once the model
    normalises it.
    """

    def __init__(self, size: int, ignore: int = IGNORE_INDEX, upscale: bool = True) -> None:
        self.size = check_size(size)
        self.ignore = int(ignore)
        self.upscale = bool(upscale)

    def region(self, h: int, w: int) -> tuple[int, int]:
        """`(new_h, new_w)`: the part of the canvas an `h x w` image covers, from its top-left corner."""
        return canvas_size(h, w, self.size, self.upscale)

    def __call__(
        self, image: np.ndarray, label: np.ndarray, rng: Optional[np.random.Generator] = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """`[H,W,3]` uint8, `[H,W]` uint8 -> `[S,S,3]` uint8, `[S,S]` uint8."""
        h, w = _check_pair(type(self).__name__, image, label)
        new_h, new_w = self.region(h, w)
        if (new_h, new_w) != (h, w):
            image = cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
            label = cv2.resize(label, (new_w, new_h), interpolation=cv2.INTER_NEAREST)
        canvas = np.zeros((self.size, self.size, 3), np.uint8)
        canvas[:new_h, :new_w] = image
        mask = np.full((self.size, self.size), self.ignore, np.uint8)
        mask[:new_h, :new_w] = label
        return canvas, mask

    def __repr__(self) -> str:
        return f"{type(self).__name__}(size={self.size}, ignore={self.ignore})"


class TestResize(Resize):
    """PFENet's `test_Resize`: `Resize` without upscaling (an option, `data.eval_resize: test_resize`)."""

    __test__ = False  # not a pytest class

    def __init__(self, size: int, ignore: int = IGNORE_INDEX) -> None:
        super().__init__(size, ignore, upscale=False)


def eval_canvas(size: int, resize: str = "resize") -> Resize:
    """The evaluation canvas `data.eval_resize` names: `resize` (PFENet's configs) or `test_resize`."""
    if resize not in CANVASES:
        raise ValueError(f"unknown evaluation canvas {resize!r}: expected one of {', '.join(CANVASES)}")
    return Resize(size) if resize == "resize" else TestResize(size)


class ToTensor:
    """Image `[H,W,3]` uint8 to a `[3,H,W]` uint8 tensor, label to `[H,W]` uint8.

    Images stay uint8 across the loader's worker boundary (4x less than float32); the run normalises them on
    the device with the backbone's own mean and std.
    """

    def __call__(
        self, image: np.ndarray, label: np.ndarray, rng: Optional[np.random.Generator] = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`[H,W,3]` uint8, `[H,W]` uint8 -> `[3,H,W]` uint8, `[H,W]` uint8."""
        _check_pair("ToTensor", image, label)
        x = np.ascontiguousarray(image.transpose(2, 0, 1), dtype=np.uint8)
        return torch.from_numpy(x), torch.from_numpy(np.ascontiguousarray(label, dtype=np.uint8))

    def __repr__(self) -> str:
        return "ToTensor()"


class Compose:
    """Apply steps in order, passing the same `rng` to each."""

    def __init__(self, transforms: Sequence[Transform]) -> None:
        self.transforms = list(transforms)

    def __call__(self, image: Any, label: Any, rng: Optional[np.random.Generator] = None) -> tuple[Any, Any]:
        for t in self.transforms:
            image, label = t(image, label, rng)
        return image, label

    def __repr__(self) -> str:
        steps = "".join(f"\n  {t!r}," for t in self.transforms)
        return f"Compose([{steps}\n])"


# --------------------------------------------------------------------------- pipelines


def train_transform(augment: AugmentConfig, size: int, mean: Sequence[float]) -> Compose:
    """PFENet's training pipeline (docs/PROTOCOL.md), called as `t(image, label, rng)`.

    RandScale -> RandRotate -> GaussianBlur 5x5 -> HFlip -> RandCrop -> ToTensor; image `[H,W,3]` uint8 and
    label `[H,W]` (0/1/255) in, `[3,S,S]` uint8 and `[S,S]` uint8 out. `augment` is `data.augment`, `size` the
    crop (`data.image_size`). Padding uses the mean pixel (`mean`, the backbone's, in 0..1 units) and 255.
    """
    size = check_size(size)
    pad = mean_pixel(mean)
    return Compose(
        [
            RandScale(augment.scale),
            RandRotate(augment.rotate, p=augment.rotate_p, padding=pad, ignore=IGNORE_INDEX),
            RandomGaussianBlur(radius=5, p=augment.blur_p),
            RandomHorizontalFlip(p=augment.flip_p),
            RandCrop(size, padding=pad, ignore=IGNORE_INDEX, retries=augment.crop_retries, keep=augment.crop_keep),
            ToTensor(),
        ]
    )


def eval_transform(size: int, resize: str = "resize") -> Compose:
    """The evaluation input of queries and supports (PFENet's `Resize`, or `test_Resize` with
    `resize="test_resize"`), called as `t(image, label)`.

    `[3,S,S]` uint8 with black outside the image and `[S,S]` uint8 with 255 there; the caller keeps the
    original-size label for scoring.
    """
    return Compose([eval_canvas(size, resize), ToTensor()])
