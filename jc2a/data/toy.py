"""A seeded, procedurally drawn toy dataset in the real COCO 2014 or PASCAL VOC 2012 + SBD layout."""

from __future__ import annotations

import colorsys
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

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
) -> Optional[_Object]:
    """Place the class outline in the image; `split=(angle, gap)` cuts it in two. None if too little is left."""
    polys = _unit_shape(app)
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
) -> dict:
    """Write `train2014/`, `val2014/` and `annotations/instances_{train,val}2014.json` under `out`.

    The 80 real COCO categories (real ids and names), 1-4 objects an image, multi-polygon instances, ~10%
    of images with an `iscrowd` RLE region, a few empty images. The same arguments give byte-identical files.
    Returns counts: images, instances, multi_polygon, crowd, empty (totals, and per split under `splits`).
    """
    _check_sizes(train_images, val_images, size)
    out = Path(out)
    appearances = [appearance(i, len(COCO_CATEGORIES)) for i in range(len(COCO_CATEGORIES))]
    # COCO image ids are unique across train and val 2014
    ids = np.random.default_rng([seed, 0]).choice(581_929, size=train_images + val_images, replace=False) + 1
    id_lists = {"train": sorted(ids[:train_images].tolist()), "val": sorted(ids[train_images:].tolist())}
    (out / "annotations").mkdir(parents=True, exist_ok=True)
    splits = {}
    for split_code, (split, image_ids) in enumerate(id_lists.items(), start=1):
        folder = out / f"{split}2014"
        folder.mkdir(parents=True, exist_ok=True)
        plan = plan_split(
            np.random.default_rng([seed, split_code, 0]), len(image_ids), len(appearances), MIN_IMAGES[split]
        )
        images, annotations, counts = [], [], {"images": 0, "instances": 0, "multi_polygon": 0, "crowd": 0, "empty": 0}
        for k, (image_id, classes) in enumerate(
            tqdm(list(zip(image_ids, plan)), desc=f"toy coco {split}", disable=not progress, leave=False)
        ):
            rng = np.random.default_rng([seed, split_code, 1, k])
            crowd = int(rng.choice(classes)) if classes and rng.random() < 0.1 else None
            pixels, objects = draw_image(rng, size, classes, appearances, crowd_class=crowd)
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
                "version": "1.0",
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
) -> dict:
    """Write `JPEGImages/`, `SegmentationClassAug/` and the train_aug / val lists under `out` (20 VOC classes).

    Same drawing as `write_toy_coco`, no crowds and no empty images (VOC has neither). Returns counts.
    """
    _check_sizes(train_images, val_images, size)
    out = Path(out)
    appearances = [appearance(i, len(VOC_CLASSES)) for i in range(len(VOC_CLASSES))]
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
            len(appearances),
            MIN_IMAGES[split],
            empty_fraction=0.0,
        )
        counts = {"images": 0, "instances": 0, "multi_polygon": 0, "crowd": 0, "empty": 0}
        for k, (image_id, classes) in enumerate(
            tqdm(list(zip(image_ids, plan)), desc=f"toy voc {split}", disable=not progress, leave=False)
        ):
            rng = np.random.default_rng([seed, split_code, 1, k])
            pixels, objects = draw_image(rng, size, classes, appearances)
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
