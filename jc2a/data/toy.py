"""A seeded, procedurally drawn toy dataset in the real COCO 2014 or PASCAL VOC 2012 + SBD layout."""

from __future__ import annotations

import colorsys
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import cv2
import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils
from tqdm import tqdm

from jc2a.atomic import write_text
from jc2a.data.coco import COCO_CATEGORIES
from jc2a.errors import UserError

# The 20 PASCAL VOC classes in label order: 1 aeroplane ... 20 tvmonitor.
VOC_CLASSES: list[str] = [
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
]  # fmt: skip

SHAPES = ("ellipse", "polygon", "star", "ring", "cross", "rounded_rect", "arrow", "heart")
TEXTURES = ("solid", "stripes", "checker", "dots", "gradient", "rings")
# (saturation, value) of a class's main colour; each hue is used once per tone.
_TONES = ((0.95, 1.0), (0.7, 0.95), (0.95, 0.65), (0.55, 1.0))  # chosen to spread the classes' mean colours
# Each category appears in at least this many distinct images of the split (when the split is large enough).
MIN_IMAGES = {"train": 4, "val": 3}
_MAX_OBJECTS = 4
# PFENet keeps an (image, class) pair with >= 2*32*32 = 2048 pixels: the main objects stay above it at the default
# size, with a margin for the border, a split gap and occlusion.
_MIN_OBJECT_PIXELS = 2600
_JPEG_QUALITY = 90


# ---------------------------------------------------------------------------------------------------------------
# 1. Class appearance: shape family, colours and texture, all derived from the class index
# ---------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Appearance:
    """How one class is drawn. `color`/`color2` are RGB in [0, 1]; the texture mixes them."""

    shape: str
    vertices: int  # polygon sides, star points (unused by the other families)
    aspect: float  # height / width of the unit shape
    color: tuple[float, float, float]
    color2: tuple[float, float, float]
    texture: str
    frequency: float  # texture repeats per object radius


def appearance(index: int, num_classes: int) -> Appearance:
    """The appearance of class `index` (0-based) among `num_classes`: shape, colour and texture from the index.

    Shapes cycle with `index % 8` and colours with `index % n_hues` at four (or two) saturation/value tones,
    so every class of the 80 COCO (20 VOC) gets a different (shape, colour, texture) triple.
    """
    variant = index // len(SHAPES)
    n_tones = len(_TONES) if num_classes > 40 else 2
    n_hues = math.ceil(num_classes / n_tones)
    hue = (index % n_hues) / n_hues + 0.02
    saturation, value = _TONES[(index // n_hues + index) % n_tones]  # neighbouring hues get different tones
    color = colorsys.hsv_to_rgb(hue % 1.0, saturation, value)
    color2 = colorsys.hsv_to_rgb(hue % 1.0, saturation, value * 0.45)
    return Appearance(
        shape=SHAPES[index % len(SHAPES)],
        vertices=3 + variant % 6 if index % len(SHAPES) == 1 else 4 + variant % 4,
        aspect=(1.0, 0.7, 0.5)[variant % 3],
        color=color,
        color2=color2,
        texture=TEXTURES[(index + variant) % len(TEXTURES)],
        frequency=2.0 + 0.75 * (variant % 3),
    )


# ---------------------------------------------------------------------------------------------------------------
# 2. Geometry: unit shapes as lists of polygons [N, 2], clipping, placement
# ---------------------------------------------------------------------------------------------------------------
def _circle(n: int, radius: float = 1.0, start: float = 0.0, stop: float = 2 * math.pi) -> np.ndarray:
    t = np.linspace(start, stop, n, endpoint=False)
    return np.stack([radius * np.cos(t), radius * np.sin(t)], axis=1)


def _unit_shape(app: Appearance) -> list[np.ndarray]:
    """The class's outline around the origin, radius about 1, as one or more polygons (a ring is two halves)."""
    if app.shape == "ellipse":
        polys = [_circle(40)]
    elif app.shape == "polygon":
        polys = [_circle(app.vertices, start=math.pi / 2, stop=math.pi / 2 + 2 * math.pi)]
    elif app.shape == "star":
        t = np.arange(2 * app.vertices) * math.pi / app.vertices
        r = np.where(np.arange(2 * app.vertices) % 2 == 0, 1.0, 0.45)
        polys = [np.stack([r * np.cos(t), r * np.sin(t)], axis=1)]
    elif app.shape == "ring":
        # An annulus cannot be one COCO polygon (no holes): two half-annuli, whose union is the ring.
        t = np.linspace(0, math.pi, 21)
        outer = np.stack([np.cos(t), np.sin(t)], axis=1)
        half = np.concatenate([outer, 0.55 * outer[::-1]])
        polys = [half, -half]
    elif app.shape == "cross":
        a = 0.33
        polys = [np.array([[a, -1], [a, -a], [1, -a], [1, a], [a, a], [a, 1],
                           [-a, 1], [-a, a], [-1, a], [-1, -a], [-a, -a], [-a, -1]], float)]  # fmt: skip
    elif app.shape == "rounded_rect":
        corners = [(0.7, 0.7, 0.0), (-0.7, 0.7, math.pi / 2), (-0.7, -0.7, math.pi), (0.7, -0.7, 1.5 * math.pi)]
        polys = [np.concatenate([_circle(6, 0.3, s, s + math.pi / 2) + (x, y) for x, y, s in corners])]
    elif app.shape == "arrow":
        polys = [np.array([[1, 0], [0.1, 0.8], [0.1, 0.35], [-1, 0.35], [-1, -0.35], [0.1, -0.35], [0.1, -0.8]])]
    elif app.shape == "heart":
        t = np.linspace(0, 2 * math.pi, 48, endpoint=False)
        x = 16 * np.sin(t) ** 3
        y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
        polys = [np.stack([x, y], axis=1) / 16.0]
    else:
        raise ValueError(f"unknown shape {app.shape!r}")
    return [p * (1.0, app.aspect) for p in polys]


def _polygon_area(poly: np.ndarray) -> float:
    x, y = poly[:, 0], poly[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))


def _clip_half_plane(poly: np.ndarray, normal: np.ndarray, offset: float) -> np.ndarray:
    """Sutherland–Hodgman: the part of `poly` where `normal · p <= offset`."""
    out = []
    d = poly @ normal - offset
    for i in range(len(poly)):
        j = (i + 1) % len(poly)
        if d[i] <= 0:
            out.append(poly[i])
        if (d[i] <= 0) != (d[j] <= 0):
            out.append(poly[i] + (poly[j] - poly[i]) * (d[i] / (d[i] - d[j])))
    return np.array(out).reshape(-1, 2)


def _clip_to_image(poly: np.ndarray, width: int, height: int) -> np.ndarray:
    for normal, offset in (((-1, 0), 0.0), ((1, 0), float(width)), ((0, -1), 0.0), ((0, 1), float(height))):
        if len(poly) == 0:
            break
        poly = _clip_half_plane(poly, np.array(normal, float), offset)
    return poly


def _split_in_two(polys: list[np.ndarray], angle: float, gap: float) -> list[np.ndarray]:
    """Cut the outline along a line through its centre, leaving a `gap`-wide band (object radii)."""
    normal = np.array([math.cos(angle), math.sin(angle)])
    pieces = []
    for poly in polys:
        pieces.append(_clip_half_plane(poly, normal, -gap / 2))
        pieces.append(_clip_half_plane(poly, -normal, -gap / 2))
    return pieces


@dataclass
class _Object:
    """One drawn instance: its class, frame (centre, radius, angle), polygons in pixels and its mask."""

    class_index: int
    center: tuple[float, float]
    radius: float
    angle: float
    polygons: list[list[float]]
    mask: np.ndarray  # bool [H, W], the decoded annotation
    iscrowd: bool = False
    parts: Optional[list[_Object]] = None  # the blobs a crowd region is drawn as
    look: Optional[tuple[Appearance, Appearance, float, float]] = None  # v2: (body, part, part axis, cut)


def _polygons_to_mask(polygons: list[list[float]], height: int, width: int) -> np.ndarray:
    rle = mask_utils.merge(mask_utils.frPyObjects(polygons, height, width))
    return mask_utils.decode(rle).astype(bool)


def _make_object(
    app: Appearance,
    class_index: int,
    center: tuple[float, float],
    radius: float,
    angle: float,
    width: int,
    height: int,
    split: Optional[tuple[float, float]] = None,
    polys: Optional[list[np.ndarray]] = None,
) -> Optional[_Object]:
    """Place the class outline (`polys`, default `_unit_shape(app)`) in the image; `split=(angle, gap)` cuts it in
    two. None if too little is left."""
    polys = _unit_shape(app) if polys is None else polys
    if split is not None:
        polys = _split_in_two(polys, split[0] - angle, split[1])
    rotation = np.array([[math.cos(angle), math.sin(angle)], [-math.sin(angle), math.cos(angle)]])
    polygons = []
    for poly in polys:
        pixels = _clip_to_image(poly @ rotation * radius + center, width, height)
        if len(pixels) >= 3 and _polygon_area(pixels) >= 4.0:
            polygons.append([round(float(v), 2) for v in pixels.reshape(-1)])
    if not polygons:
        return None
    mask = _polygons_to_mask(polygons, height, width)
    if mask.sum() < 16:
        return None
    return _Object(class_index, center, radius, angle, polygons, mask)


# ---------------------------------------------------------------------------------------------------------------
# 3. Painting: textured backgrounds and textured objects
# ---------------------------------------------------------------------------------------------------------------
def _muted_color(rng: np.random.Generator) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(rng.random(), rng.uniform(0.0, 0.25), rng.uniform(0.25, 0.8)))


def _background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A muted, textured background `float [H, W, 3]` in [0, 1]: blotchy noise, a gradient or soft stripes."""
    a, b = _muted_color(rng), _muted_color(rng)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    kind = rng.integers(3)
    if kind == 0:  # low-frequency noise: a small random grid, upsampled bilinearly
        grid = rng.random((int(rng.integers(3, 7)), int(rng.integers(3, 7))))
        gy = ys / max(height - 1, 1) * (grid.shape[0] - 1)
        gx = xs / max(width - 1, 1) * (grid.shape[1] - 1)
        y0, x0 = np.minimum(gy.astype(int), grid.shape[0] - 2), np.minimum(gx.astype(int), grid.shape[1] - 2)
        fy, fx = gy - y0, gx - x0
        t = (grid[y0, x0] * (1 - fy) * (1 - fx) + grid[y0 + 1, x0] * fy * (1 - fx)
             + grid[y0, x0 + 1] * (1 - fy) * fx + grid[y0 + 1, x0 + 1] * fy * fx)  # fmt: skip
    else:
        theta = rng.uniform(0, math.pi)
        u = (xs * math.cos(theta) + ys * math.sin(theta)) / max(height, width)
        if kind == 1:  # linear gradient
            t = (u - u.min()) / max(float(u.max() - u.min()), 1e-6)
        else:  # soft stripes
            t = 0.5 + 0.5 * np.sin(2 * math.pi * u * rng.uniform(3, 8))
    t = t.astype(np.float32)[..., None]
    image = a.astype(np.float32) * (1 - t) + b.astype(np.float32) * t
    return image + 0.03 * rng.standard_normal(image.shape, dtype=np.float32)


def _texture(app: Appearance, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """The weight of `color2` in [0, 1] at object-frame coordinates (u, v) (units of the object radius)."""
    f = app.frequency
    if app.texture == "solid":
        return np.zeros_like(u)
    if app.texture == "stripes":
        return np.floor(u * f) % 2
    if app.texture == "checker":
        return (np.floor(u * f) + np.floor(v * f)) % 2
    if app.texture == "dots":
        du, dv = u * f - np.round(u * f), v * f - np.round(v * f)
        return (du**2 + dv**2 < 0.3**2).astype(u.dtype)
    if app.texture == "gradient":
        return np.clip((u + 1) / 2, 0, 1)
    if app.texture == "rings":
        return np.floor(np.hypot(u, v) * f) % 2
    raise ValueError(f"unknown texture {app.texture!r}")


def _paint(image: np.ndarray, obj: _Object, app: Appearance, rng: np.random.Generator) -> None:
    """Paint `obj`'s mask with its class colours and texture, in its own rotated frame, plus shading and noise."""
    rows, cols = np.nonzero(obj.mask.any(axis=1))[0], np.nonzero(obj.mask.any(axis=0))[0]
    y0, y1, x0, x1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    ys, xs = np.mgrid[y0:y1, x0:x1].astype(np.float32)
    dx, dy = xs - obj.center[0], ys - obj.center[1]
    c, s = math.cos(obj.angle), math.sin(obj.angle)
    u, v = (dx * c + dy * s) / obj.radius, (-dx * s + dy * c) / obj.radius
    t = _texture(app, u, v)[..., None]
    shade = rng.uniform(0.92, 1.08) * (1 + 0.1 * np.clip(v, -1, 1))[..., None]
    colors = (np.array(app.color, np.float32) * (1 - t) + np.array(app.color2, np.float32) * t) * shade
    colors += 0.02 * rng.standard_normal(colors.shape, dtype=np.float32)
    region = obj.mask[y0:y1, x0:x1]
    image[y0:y1, x0:x1][region] = colors[region]


# ---------------------------------------------------------------------------------------------------------------
# 4. One image: sizes, placement, occlusion order
# ---------------------------------------------------------------------------------------------------------------
def _image_size(rng: np.random.Generator, size: int) -> tuple[int, int]:
    """(height, width), each in [0.75, 1.25] x size."""
    return int(round(size * rng.uniform(0.75, 1.25))), int(round(size * rng.uniform(0.75, 1.25)))


def _place(rng: np.random.Generator, reach: float, width: int, height: int, taken: list) -> tuple[float, float]:
    """A centre that keeps most of the object inside the image, far from earlier centres (best of 8 tries)."""
    best, best_score = (width / 2, height / 2), -1.0
    for _ in range(8):
        lo_x, hi_x = min(0.5 * reach, width / 2), max(width - 0.5 * reach, width / 2)
        lo_y, hi_y = min(0.5 * reach, height / 2), max(height - 0.5 * reach, height / 2)
        cand = (float(rng.uniform(lo_x, hi_x)), float(rng.uniform(lo_y, hi_y)))
        score = min((math.hypot(cand[0] - x, cand[1] - y) / (r + reach) for x, y, r in taken), default=1.0)
        if score > best_score:
            best, best_score = cand, score
    return best


def _crowd(rng: np.random.Generator, app: Appearance, class_index: int, covered: np.ndarray) -> Optional[_Object]:
    """A crowd region: 6-12 small copies of the class shape packed in a box, annotated as one RLE mask.

    It is painted behind the objects, so its box is the least `covered` of 8 random ones.
    """
    height, width = covered.shape
    boxes = []
    for _ in range(8):
        bw, bh = rng.uniform(0.3, 0.5) * width, rng.uniform(0.2, 0.35) * height
        bx, by = rng.uniform(0, width - bw), rng.uniform(0, height - bh)
        boxes.append((covered[int(by) : int(by + bh), int(bx) : int(bx + bw)].mean(), bx, by, bw, bh))
    _, bx, by, bw, bh = min(boxes)
    radius = 0.06 * min(width, height)
    parts = []
    for _ in range(int(rng.integers(6, 13))):
        center = (float(rng.uniform(bx, bx + bw)), float(rng.uniform(by, by + bh)))
        part = _make_object(app, class_index, center, radius, rng.uniform(0, 2 * math.pi), width, height)
        if part is not None:
            parts.append(part)
    if not parts:
        return None
    mask = np.logical_or.reduce([p.mask for p in parts])
    return _Object(class_index, (bx + bw / 2, by + bh / 2), radius, 0.0, [], mask, iscrowd=True, parts=parts)


def _layout(
    rng: np.random.Generator,
    class_indices: list[int],
    appearances: list[Appearance],
    width: int,
    height: int,
    split_prob: float,
) -> list[tuple[_Object, float]]:
    """Size and place one outline per class index: (object, target pixels), by decreasing mask area."""
    # 1. target areas: a fraction of the image that shrinks as the image gets busier
    crowding = (1.0, 0.9, 0.8, 0.7)[min(len(class_indices), 4) - 1] if class_indices else 1.0
    floor = min(0.3, _MIN_OBJECT_PIXELS / (width * height))
    first = [c not in class_indices[:k] for k, c in enumerate(class_indices)]
    fractions = [max(rng.uniform(0.08, 0.36) * crowding, floor) if f else rng.uniform(0.02, 0.06) for f in first]
    # 2. place the outlines, the larger ones first, each away from the earlier ones
    placed, taken = [], []
    for k in sorted(range(len(class_indices)), key=lambda k: -fractions[k]):
        app = appearances[class_indices[k]]
        unit = _unit_shape(app)
        unit_area = sum(_polygon_area(p) for p in unit)
        reach_unit = max(float(np.abs(p).max()) for p in unit)
        radius = math.sqrt(fractions[k] * width * height / unit_area)
        center = _place(rng, radius * reach_unit, width, height, taken)
        taken.append((center[0], center[1], radius * reach_unit))
        split = None
        if app.shape != "ring" and rng.random() < split_prob:
            split = (float(rng.uniform(0, math.pi)), float(rng.uniform(0.08, 0.18)))
        obj = _make_object(app, class_indices[k], center, radius, rng.uniform(0, 2 * math.pi), width, height, split)
        if obj is not None:
            placed.append((obj, fractions[k] * width * height if first[k] else 0.0))
    return sorted(placed, key=lambda p: -int(p[0].mask.sum()))


def _visible_enough(placed: list[tuple[_Object, float]]) -> bool:
    """Whether every main object keeps >= 80% of min(target, `_MIN_OBJECT_PIXELS`) pixels once painted over."""
    if not placed:
        return True
    covered = np.zeros_like(placed[0][0].mask)
    for obj, target in reversed(placed):  # the last painted is on top
        if (obj.mask & ~covered).sum() < 0.8 * min(target, _MIN_OBJECT_PIXELS):
            return False
        covered |= obj.mask
    return True


def draw_image(
    rng: np.random.Generator,
    size: int,
    class_indices: list[int],
    appearances: list[Appearance],
    crowd_class: Optional[int] = None,
    split_prob: float = 0.12,
) -> tuple[np.ndarray, list[_Object]]:
    """Draw one image with one object per entry of `class_indices` (and a crowd region of `crowd_class`).

    The first instance of a class covers 8-36% of the image (less in busier images, never under
    `_MIN_OBJECT_PIXELS`), and the layout is redrawn (up to 5 times) until each one stays visible; a repeated
    class is a small second instance (2-6%). Returns the image `uint8 [H, W, 3]` and its objects in painting
    order: the crowd region first, then the objects by decreasing mask area, so a smaller overlapping object
    stays visible (the order the COCO rasteriser of docs/PROTOCOL.md paints in). Each object's mask is its full outline,
    occluded parts included.
    """
    height, width = _image_size(rng, size)
    image = _background(rng, height, width)
    for _ in range(5):
        placed = _layout(rng, class_indices, appearances, width, height, split_prob)
        if _visible_enough(placed):
            break
    objects = [obj for obj, _ in placed]
    # paint: crowd behind, then objects by decreasing area
    if crowd_class is not None:
        covered = np.zeros((height, width), bool)
        for obj in objects:
            covered |= obj.mask
        crowd = _crowd(rng, appearances[crowd_class], crowd_class, covered)
        if crowd is not None:
            for part in crowd.parts or []:
                _paint(image, part, appearances[crowd_class], rng)
            objects.insert(0, crowd)
    for obj in objects:
        if not obj.iscrowd:
            _paint(image, obj, appearances[obj.class_index], rng)
    return (np.clip(image, 0, 1) * 255 + 0.5).astype(np.uint8), objects


# ---------------------------------------------------------------------------------------------------------------
# 4b. Version 2 (issue 17): appearance modes and parts, look-alikes across folds, clutter, occlusion, any size
# ---------------------------------------------------------------------------------------------------------------
VERSIONS = (1, 2)
VERSION = 2  # what `jc2a toy`, the demo, `jc2a pretrain` and the toy tables draw; 1: the flat set of before
MODE_WEIGHTS = (0.55, 0.3, 0.15)  # a class's own modes 0 and 1, then its look-alike mode (the next class's body)
_MIN_OBJECT_PIXELS_V2 = 450  # v2 objects go down to 2% of the image: usable at the toy configs' min_pixels (256)
_SIZE_RANGE_V2 = (0.02, 0.8)  # first instance of a class: a log-uniform fraction of the image, before crowding


@dataclass(frozen=True)
class Style:
    """How one class is drawn in version 2: its shape, where its part is, and its appearance modes.

    An object is a body and a part: the side of a line across the object's own frame (at `part_angle`, beyond
    `part_cut` object radii) has other colours and another texture, so one masked average over the object (one
    prototype) mixes two looks. Each mode is a `(body, part)` pair of appearances (their shape fields are the
    class's). Mode 2's body is the next class's first body in this class's shape: neighbouring classes are in
    different COCO-20i / PASCAL-5i folds, so every novel class has a base-class look-alike that only its shape and
    its part tell apart.
    """

    shape: Appearance  # the shape fields (shape, vertices, aspect) and mode 0's body
    part_angle: float
    part_cut: float
    modes: tuple[tuple[Appearance, Appearance], ...]


def _random_look(rng: np.random.Generator, shape: Appearance, avoid: str = "") -> Appearance:
    """An appearance with `shape`'s shape fields and a random colour pair, texture and frequency."""
    hue = float(rng.random())
    saturation, value = _TONES[int(rng.integers(len(_TONES)))]
    dark = float(rng.uniform(0.35, 0.6))
    textures = [t for t in TEXTURES if t != avoid]
    return Appearance(shape.shape, shape.vertices, shape.aspect, colorsys.hsv_to_rgb(hue, saturation, value),
                      colorsys.hsv_to_rgb((hue + rng.uniform(-0.08, 0.08)) % 1.0, saturation, value * dark),
                      textures[int(rng.integers(len(textures)))], float(rng.uniform(1.5, 3.5)))  # fmt: skip


def _with_shape(look: Appearance, shape: Appearance) -> Appearance:
    return Appearance(shape.shape, shape.vertices, shape.aspect, look.color, look.color2, look.texture, look.frequency)


def styles(num_classes: int) -> list[Style]:
    """The version-2 look of every class (0-based index): fixed by the index alone, whatever the dataset's seed.

    Mode 0's body is version 1's look of the class, mode 1's a random one; the part keeps its look in every mode (the
    class's signature, as a head or a wheel); mode 2's body is the next class's mode-0 body (the look-alike).
    """
    own = []
    for index in range(num_classes):
        base = appearance(index, num_classes)  # v1's shape, colours and texture: mode 0's body
        rng = np.random.default_rng([0x70E2, num_classes, index])
        part = _random_look(rng, base, avoid=base.texture)
        body1 = _random_look(rng, base, avoid=base.texture)
        angle, cut = float(rng.uniform(0, 2 * math.pi)), float(rng.uniform(-0.1, 0.3))
        own.append((base, angle, cut, part, body1))
    out = []
    for index, (base, angle, cut, part, body1) in enumerate(own):
        alike = _with_shape(own[(index + 1) % num_classes][0], base)  # the next class's first body, in this shape
        out.append(Style(base, angle, cut, ((base, part), (body1, part), (alike, part))))
    return out


def _jitter(look: Appearance, gain: np.ndarray, aspect: float) -> Appearance:
    """One instance's appearance: the colours scaled per channel by `gain`, the aspect by `aspect`."""
    color = tuple(float(c) for c in np.clip(np.array(look.color) * gain, 0, 1))
    color2 = tuple(float(c) for c in np.clip(np.array(look.color2) * gain, 0, 1))
    return Appearance(look.shape, look.vertices, look.aspect * aspect, color, color2, look.texture, look.frequency)  # type: ignore[arg-type]


def _wobble(polys: list[np.ndarray], rng: np.random.Generator, amount: float = 0.12) -> list[np.ndarray]:
    """The outline with a smooth random radial deformation (harmonics 2 and 3, each up to `amount`)."""
    amps, phases = rng.uniform(0, amount, 2), rng.uniform(0, 2 * math.pi, 2)
    out = []
    for p in polys:
        theta = np.arctan2(p[:, 1], p[:, 0])
        r = 1 + amps[0] * np.cos(2 * theta + phases[0]) + amps[1] * np.cos(3 * theta + phases[1])
        out.append(p * r[:, None])
    return out


def _layout_v2(
    rng: np.random.Generator,
    class_indices: list[int],
    looks: list[Style],
    width: int,
    height: int,
    sizes: tuple[float, float] = _SIZE_RANGE_V2,
) -> list[tuple[_Object, float]]:
    """Version 2's layout: sizes from 2% to 80% of the image, centres anywhere (objects occlude each other),
    a mode, a colour jitter, an aspect and a smooth deformation per instance. (object, target pixels) by
    decreasing mask area."""
    crowding = (1.0, 0.85, 0.7, 0.6)[min(len(class_indices), 4) - 1] if class_indices else 1.0
    floor = min(0.3, _MIN_OBJECT_PIXELS_V2 / (width * height))
    low, high = (math.log(v) for v in sizes)
    first = [c not in class_indices[:k] for k, c in enumerate(class_indices)]
    fractions = [max(math.exp(rng.uniform(low, high)) * crowding, floor) if f else rng.uniform(0.01, 0.04)
                 for f in first]  # fmt: skip
    placed = []
    for k in sorted(range(len(class_indices)), key=lambda k: -fractions[k]):
        style = looks[class_indices[k]]
        body, part = style.modes[int(rng.choice(len(style.modes), p=MODE_WEIGHTS))]
        gain, aspect = rng.uniform(0.85, 1.15, 3), float(rng.uniform(0.75, 1.33))
        body, part = _jitter(body, gain, aspect), _jitter(part, gain, aspect)
        unit = _wobble(_unit_shape(body), rng)
        radius = math.sqrt(fractions[k] * width * height / sum(_polygon_area(p) for p in unit))
        reach = radius * max(float(np.abs(p).max()) for p in unit)
        margin_x, margin_y = min(0.6 * reach, width / 2), min(0.6 * reach, height / 2)
        center = (float(rng.uniform(margin_x, width - margin_x)), float(rng.uniform(margin_y, height - margin_y)))
        split = None
        if body.shape != "ring" and rng.random() < 0.1:
            split = (float(rng.uniform(0, math.pi)), float(rng.uniform(0.08, 0.18)))
        angle = float(rng.uniform(0, 2 * math.pi))
        obj = _make_object(body, class_indices[k], center, radius, angle, width, height, split, unit)
        if obj is not None:
            obj.look = (body, part, style.part_angle, style.part_cut)
            placed.append((obj, fractions[k] * width * height if first[k] else 0.0))
    return sorted(placed, key=lambda p: -int(p[0].mask.sum()))


def _visible_enough_v2(placed: list[tuple[_Object, float]]) -> bool:
    """Whether every main object keeps half of its outline and >= 80% of min(target, `_MIN_OBJECT_PIXELS_V2`)
    pixels visible once the later (smaller) ones are painted over it."""
    if not placed:
        return True
    covered = np.zeros_like(placed[0][0].mask)
    for obj, target in reversed(placed):
        visible = int((obj.mask & ~covered).sum())
        if target and (visible < 0.5 * obj.mask.sum() or visible < 0.8 * min(target, _MIN_OBJECT_PIXELS_V2)):
            return False
        covered |= obj.mask
    return True


def _clutter(image: np.ndarray, rng: np.random.Generator) -> None:
    """Background clutter, never annotated: 2-5 strokes and 1-5 distractor blobs (irregular outlines of no class's
    shape family, in muted random colours and any texture, 0.3-2% of the image each), painted behind the objects."""
    height, width = image.shape[:2]
    for _ in range(int(rng.integers(2, 6))):
        color = tuple(float(c) for c in colorsys.hsv_to_rgb(rng.random(), rng.uniform(0, 0.8), rng.uniform(0.2, 0.9)))
        p1 = (int(rng.integers(width)), int(rng.integers(height)))
        p2 = (int(rng.integers(width)), int(rng.integers(height)))
        cv2.line(image, p1, p2, color, int(rng.integers(1, 4)), lineType=cv2.LINE_AA)
    for _ in range(int(rng.integers(1, 6))):
        n = int(rng.integers(6, 11))
        t = np.sort(rng.uniform(0, 2 * math.pi, n))
        r = rng.uniform(0.45, 1.0, n)
        poly = np.stack([r * np.cos(t), r * np.sin(t)], axis=1)
        radius = math.sqrt(rng.uniform(0.003, 0.02) * width * height / max(_polygon_area(poly), 1e-3))
        hue, saturation, value = rng.random(), rng.uniform(0.1, 0.55), rng.uniform(0.3, 0.85)
        look = Appearance("blob", 0, 1.0, colorsys.hsv_to_rgb(hue, saturation, value),
                          colorsys.hsv_to_rgb(hue, saturation, value * rng.uniform(0.4, 0.7)),
                          TEXTURES[int(rng.integers(len(TEXTURES)))], float(rng.uniform(1.5, 3.5)))  # fmt: skip
        center = (float(rng.uniform(0, width)), float(rng.uniform(0, height)))
        blob = _make_object(look, -1, center, radius, float(rng.uniform(0, 2 * math.pi)), width, height,
                            polys=[poly])  # fmt: skip
        if blob is not None:
            _paint(image, blob, look, rng)


def _paint_v2(image: np.ndarray, obj: _Object, rng: np.random.Generator) -> None:
    """Paint a version-2 object: body and part, each with its colours and texture, in the object's own frame."""
    assert obj.look is not None
    body, part, axis, cut = obj.look
    rows, cols = np.nonzero(obj.mask.any(axis=1))[0], np.nonzero(obj.mask.any(axis=0))[0]
    y0, y1, x0, x1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    ys, xs = np.mgrid[y0:y1, x0:x1].astype(np.float32)
    dx, dy = xs - obj.center[0], ys - obj.center[1]
    c, s = math.cos(obj.angle), math.sin(obj.angle)
    u, v = (dx * c + dy * s) / obj.radius, (-dx * s + dy * c) / obj.radius
    in_part = (u * math.cos(axis) + v * math.sin(axis) > cut)[..., None]
    shade = rng.uniform(0.92, 1.08) * (1 + 0.1 * np.clip(v, -1, 1))[..., None]
    colors = []
    for look in (body, part):
        t = _texture(look, u, v)[..., None]
        colors.append(np.array(look.color, np.float32) * (1 - t) + np.array(look.color2, np.float32) * t)
    painted = np.where(in_part, colors[1], colors[0]) * shade
    painted += 0.02 * rng.standard_normal(painted.shape, dtype=np.float32)
    region = obj.mask[y0:y1, x0:x1]
    image[y0:y1, x0:x1][region] = painted[region]


def draw_image_v2(
    rng: np.random.Generator,
    size: int,
    class_indices: list[int],
    looks: list[Style],
    crowd_class: Optional[int] = None,
    sizes: tuple[float, float] = _SIZE_RANGE_V2,
) -> tuple[np.ndarray, list[_Object]]:
    """Version 2 of `draw_image`: a textured background with clutter and distractors, then one object per entry
    of `class_indices` (in one of its class's modes, body and part, jittered and deformed; 2-80% of the image for a
    class's first instance, anywhere, so objects occlude each other), and a crowd region of `crowd_class`.

    The layout is redrawn (up to 8 times) until each main object keeps half of its outline visible. Returns the
    image `uint8 [H, W, 3]` and its objects in painting order (crowd first, then by decreasing mask area), as
    `draw_image` does.
    """
    height, width = _image_size(rng, size)
    image = np.ascontiguousarray(_background(rng, height, width))
    _clutter(image, rng)
    for _ in range(8):
        placed = _layout_v2(rng, class_indices, looks, width, height, sizes)
        if _visible_enough_v2(placed):
            break
    objects = [obj for obj, _ in placed]
    if crowd_class is not None:
        covered = np.zeros((height, width), bool)
        for obj in objects:
            covered |= obj.mask
        look = looks[crowd_class].modes[0][0]
        crowd = _crowd(rng, look, crowd_class, covered)
        if crowd is not None:
            for piece in crowd.parts or []:
                _paint(image, piece, look, rng)
            objects.insert(0, crowd)
    for obj in objects:
        if not obj.iscrowd:
            _paint_v2(image, obj, rng)
    return (np.clip(image, 0, 1) * 255 + 0.5).astype(np.uint8), objects


def _drawer(version: int, num_classes: int, sizes: tuple[float, float] = _SIZE_RANGE_V2):
    """`draw(rng, size, classes, crowd_class)` of a toy version (`sizes`: version 2's range of object sizes)."""
    if version not in VERSIONS:
        raise UserError(f"toy data version {version}: expected one of {', '.join(map(str, VERSIONS))}")
    if version == 1:
        apps = [appearance(i, num_classes) for i in range(num_classes)]
        return lambda rng, size, classes, crowd=None: draw_image(rng, size, classes, apps, crowd_class=crowd)
    looks = styles(num_classes)
    return lambda rng, size, classes, crowd=None: draw_image_v2(rng, size, classes, looks, crowd, sizes)


def label_map(objects: list[_Object], height: int, width: int) -> np.ndarray:
    """Class index + 1 of the topmost object at each pixel (0: background), objects painted in order."""
    label = np.zeros((height, width), np.uint8)
    for obj in objects:
        label[obj.mask] = obj.class_index + 1
    return label


PRETRAIN_SPLIT = 3  # the generator's split code of the pretraining images (train 1, val 2): their own streams
PRETRAIN_SIZES = (0.1, 0.7)  # object-centric, as ImageNet's images are: a class's first instance is large


def pretrain_images(
    count: int,
    size: int = 112,
    seed: int = 0,
    version: int = VERSION,
    num_classes: int = 80,
    progress: bool = False,
    class_counts: tuple[float, ...] = (0.15, 0.6, 0.25),
) -> tuple[np.ndarray, np.ndarray]:
    """The pretraining split: `count` square toy images `uint8 [N, size, size, 3]` and their image-level labels
    `bool [N, num_classes]` (the classes with a visible part of at least 0.4% of the image).

    Drawn from their own random streams (split code `PRETRAIN_SPLIT`, never the few-shot train or val images):
    `class_counts[k]` of the images hold k classes (default: 15% none, only background, clutter and distractors; 60%
    one; 25% two), every class as often as the others, large objects (`PRETRAIN_SIZES`), no crowds: an ImageNet of
    the toy classes, with images of the background too.
    """
    draw = _drawer(version, num_classes, PRETRAIN_SIZES)
    plan_rng = np.random.default_rng([seed, PRETRAIN_SPLIT, 0])
    queue: list[int] = []
    images = np.zeros((count, size, size, 3), np.uint8)
    labels = np.zeros((count, num_classes), bool)
    for k in tqdm(range(count), desc="toy pretraining images", disable=not progress, leave=False):
        n = int(plan_rng.choice(len(class_counts), p=class_counts))
        classes: list[int] = []
        while len(classes) < n:
            if not queue:
                queue = plan_rng.permutation(num_classes).tolist()
            c = queue.pop()
            if c not in classes:
                classes.append(c)
        rng = np.random.default_rng([seed, PRETRAIN_SPLIT, 1, k])
        pixels, objects = draw(rng, size, classes)
        height, width = pixels.shape[:2]
        label = label_map(objects, height, width)
        counts = np.bincount(label.reshape(-1), minlength=num_classes + 1)[1:]
        labels[k] = counts >= 0.004 * height * width
        images[k] = np.asarray(Image.fromarray(pixels).resize((size, size), Image.BILINEAR))
    return images, labels


# ---------------------------------------------------------------------------------------------------------------
# 5. Which classes go in which image: every class in >= MIN_IMAGES images of each split
# ---------------------------------------------------------------------------------------------------------------
def plan_split(
    rng: np.random.Generator, num_images: int, num_classes: int, min_images: int, empty_fraction: float = 0.03
) -> list[list[int]]:
    """Class indices of each image: a few empty images, 1-4 objects in the others.

    Balanced assignment (each image takes the classes seen in the fewest images so far) guarantees every class
    is in at least `min(min_images, capacity)` distinct images; a few random extra instances of a class already
    in the image follow. Raises ValueError when the split is too small to hold every class once.
    """
    n_empty = max(1, round(empty_fraction * num_images)) if num_images >= 5 and empty_fraction > 0 else 0
    filled = num_images - n_empty
    per_class = min(min_images, _MAX_OBJECTS * filled // num_classes)
    if per_class < 1:
        need = math.ceil(num_classes / _MAX_OBJECTS) + n_empty
        raise UserError(f"{num_images} images cannot show all {num_classes} classes: use at least {need}")
    counts = rng.choice(np.arange(1, _MAX_OBJECTS + 1), size=filled, p=[0.2, 0.35, 0.3, 0.15])
    while counts.sum() < per_class * num_classes:  # add objects to random images until every class fits
        counts[rng.choice(np.flatnonzero(counts < _MAX_OBJECTS))] += 1
    seen = np.zeros(num_classes, int)
    plan = []
    for count in counts:
        key = seen + rng.random(num_classes)  # the least-seen classes first, ties broken at random
        chosen = [int(c) for c in np.argsort(key)[:count]]
        seen[chosen] += 1
        if count < _MAX_OBJECTS and rng.random() < 0.15:
            chosen.append(chosen[int(rng.integers(len(chosen)))])
        plan.append(chosen)
    empties = set(rng.choice(num_images, size=n_empty, replace=False).tolist())
    it = iter(plan)
    return [[] if i in empties else next(it) for i in range(num_images)]


# ---------------------------------------------------------------------------------------------------------------
# 6. Writers: COCO 2014 and VOC 2012 + SBD layouts
# ---------------------------------------------------------------------------------------------------------------
def _save_jpeg(path: Path, image: np.ndarray) -> None:
    Image.fromarray(image).save(path, format="JPEG", quality=_JPEG_QUALITY)


def _coco_annotation(obj: _Object, ann_id: int, image_id: int, height: int, width: int) -> dict:
    """A COCO annotation: polygons for objects, compressed RLE for crowds; area and bbox by pycocotools."""
    if obj.iscrowd:
        rle = mask_utils.encode(np.asfortranarray(obj.mask.astype(np.uint8)))
        segmentation = {"counts": rle["counts"].decode("ascii"), "size": [int(v) for v in rle["size"]]}
    else:
        segmentation = obj.polygons
        rle = mask_utils.merge(mask_utils.frPyObjects(obj.polygons, height, width))
    return {
        "id": ann_id,
        "image_id": image_id,
        "category_id": COCO_CATEGORIES[obj.class_index]["id"],
        "segmentation": segmentation,
        "area": float(mask_utils.area(rle)),
        "bbox": [round(float(v), 2) for v in mask_utils.toBbox(rle)],
        "iscrowd": int(obj.iscrowd),
    }


def _summary(out: Path, fmt: str, splits: dict[str, dict]) -> dict:
    total = {k: sum(s[k] for s in splits.values()) for k in next(iter(splits.values()))}
    return {"format": fmt, "out": str(out), **total, "splits": splits}


def write_toy_coco(
    out: Path,
    train_images: int = 160,
    val_images: int = 80,
    size: int = 160,
    seed: int = 0,
    progress: bool = False,
    version: int = 1,
) -> dict:
    """Write `train2014/`, `val2014/` and `annotations/instances_{train,val}2014.json` under `out`.

    The 80 real COCO categories (real ids and names), 1-4 objects an image, multi-polygon instances, ~10%
    of images with an `iscrowd` RLE region, a few empty images. The same arguments give byte-identical files.
    `version`: 1 (the default, what the tests' fixtures draw: one flat look a class, objects apart) or 2 (`VERSION`,
    the demo's: appearance modes and parts, look-alikes across folds, clutter, occlusion; `draw_image_v2`).
    Returns counts: images, instances, multi_polygon, crowd, empty (totals, and per split under `splits`).
    """
    _check_sizes(train_images, val_images, size)
    out = Path(out)
    draw = _drawer(version, len(COCO_CATEGORIES))
    # COCO image ids are unique across train and val 2014
    ids = np.random.default_rng([seed, 0]).choice(581_929, size=train_images + val_images, replace=False) + 1
    id_lists = {"train": sorted(ids[:train_images].tolist()), "val": sorted(ids[train_images:].tolist())}
    (out / "annotations").mkdir(parents=True, exist_ok=True)
    splits = {}
    for split_code, (split, image_ids) in enumerate(id_lists.items(), start=1):
        folder = out / f"{split}2014"
        folder.mkdir(parents=True, exist_ok=True)
        plan = plan_split(
            np.random.default_rng([seed, split_code, 0]), len(image_ids), len(COCO_CATEGORIES), MIN_IMAGES[split]
        )
        images, annotations, counts = [], [], {"images": 0, "instances": 0, "multi_polygon": 0, "crowd": 0, "empty": 0}
        for k, (image_id, classes) in enumerate(
            tqdm(list(zip(image_ids, plan)), desc=f"toy coco {split}", disable=not progress, leave=False)
        ):
            rng = np.random.default_rng([seed, split_code, 1, k])
            crowd = int(rng.choice(classes)) if classes and rng.random() < 0.1 else None
            pixels, objects = draw(rng, size, classes, crowd)
            height, width = pixels.shape[:2]
            file_name = f"COCO_{split}2014_{image_id:012d}.jpg"
            _save_jpeg(folder / file_name, pixels)
            images.append({"license": 1, "file_name": file_name, "height": height, "width": width, "id": image_id})
            for obj in objects:
                annotations.append(
                    _coco_annotation(obj, len(annotations) + 1 + split_code * 10**6, image_id, height, width)
                )
                counts["crowd" if obj.iscrowd else "instances"] += 1
                counts["multi_polygon"] += int(len(obj.polygons) > 1)
            counts["images"] += 1
            counts["empty"] += int(not objects)
        dataset = {
            "info": {
                "description": "jc2a procedural toy dataset (COCO 2014 layout)",
                "version": f"{version}.0",
                "year": 2014,
                "contributor": "jc2a",
                "seed": seed,
            },
            "images": images,
            "licenses": [{"id": 1, "name": "CC0 1.0", "url": "https://creativecommons.org/publicdomain/zero/1.0/"}],
            "annotations": annotations,
            "categories": [dict(c) for c in COCO_CATEGORIES],
        }
        _write_text(out / "annotations" / f"instances_{split}2014.json", json.dumps(dataset, separators=(",", ":")))
        splits[split] = counts
    return _summary(out, "coco", splits)


def _boundary(instances: np.ndarray, width: int = 3) -> np.ndarray:
    """Pixels where a `width`x`width` window sees two different instances (or an instance and background)."""
    pad = width // 2
    padded = np.pad(instances, pad, mode="edge")
    h, w = instances.shape
    windows = [padded[dy : dy + h, dx : dx + w] for dy in range(width) for dx in range(width)]
    return np.maximum.reduce(windows) != np.minimum.reduce(windows)


def voc_label(objects: list[_Object], height: int, width: int) -> np.ndarray:
    """The `SegmentationClassAug` label `uint8 [H, W]`: objects painted in order as class index + 1, 255 on a
    2-3 pixel band along every object outline (against background or another object), as VOC marks them."""
    label = np.zeros((height, width), np.uint8)
    instances = np.zeros((height, width), np.int32)
    for k, obj in enumerate(objects, start=1):
        label[obj.mask] = obj.class_index + 1
        instances[obj.mask] = k
    label[_boundary(instances)] = 255
    return label


def write_toy_voc(
    out: Path,
    train_images: int = 160,
    val_images: int = 80,
    size: int = 160,
    seed: int = 0,
    progress: bool = False,
    version: int = 1,
) -> dict:
    """Write `JPEGImages/`, `SegmentationClassAug/` and the train_aug / val lists under `out` (20 VOC classes).

    Same drawing as `write_toy_coco` (and the same `version`s), no crowds and no empty images (VOC has neither).
    Returns counts.
    """
    _check_sizes(train_images, val_images, size)
    out = Path(out)
    draw = _drawer(version, len(VOC_CLASSES))
    id_rng = np.random.default_rng([seed, 0])
    numbers = id_rng.choice(5 * 10**5, size=train_images + val_images, replace=False)  # years 2007..2011, unique
    names = [f"{2007 + n // 10**5}_{n % 10**5:06d}" for n in numbers.tolist()]
    id_lists = {"train": sorted(names[:train_images]), "val": sorted(names[train_images:])}
    for sub in ("JPEGImages", "SegmentationClassAug", "ImageSets/SegmentationAug", "ImageSets/Segmentation"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    splits = {}
    for split_code, (split, image_ids) in enumerate(id_lists.items(), start=1):
        plan = plan_split(
            np.random.default_rng([seed, split_code, 0]),
            len(image_ids),
            len(VOC_CLASSES),
            MIN_IMAGES[split],
            empty_fraction=0.0,
        )
        counts = {"images": 0, "instances": 0, "multi_polygon": 0, "crowd": 0, "empty": 0}
        for k, (image_id, classes) in enumerate(
            tqdm(list(zip(image_ids, plan)), desc=f"toy voc {split}", disable=not progress, leave=False)
        ):
            rng = np.random.default_rng([seed, split_code, 1, k])
            pixels, objects = draw(rng, size, classes)
            _save_jpeg(out / "JPEGImages" / f"{image_id}.jpg", pixels)
            label = voc_label(objects, *pixels.shape[:2])
            Image.fromarray(label).save(out / "SegmentationClassAug" / f"{image_id}.png")
            counts["images"] += 1
            counts["instances"] += len(objects)
            counts["multi_polygon"] += sum(len(o.polygons) > 1 for o in objects)
            counts["empty"] += int(not objects)
        list_path = "ImageSets/SegmentationAug/train_aug.txt" if split == "train" else "ImageSets/Segmentation/val.txt"
        _write_text(out / list_path, "".join(f"{i}\n" for i in image_ids))
        splits[split] = counts
    return _summary(out, "voc", splits)


def _check_sizes(train_images: int, val_images: int, size: int) -> None:
    if train_images < 1 or val_images < 1:
        raise UserError(f"--train-images and --val-images must be positive, got {train_images}, {val_images}")
    if size < 32:
        raise UserError(f"--size must be at least 32 pixels, got {size}")


def _write_text(path: Path, text: str) -> None:
    """Write atomically: a temporary name, then rename."""
    write_text(path, text)
