"""The procedural toy dataset: real COCO 2014 / VOC 2012 + SBD layouts, coverage, determinism, appearances."""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import re
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO

from jc2a.data import toy
from jc2a.folds import novel_classes
from jc2a.runs import toy_cmd

MISSING_IDS = {12, 26, 29, 30, 45, 66, 68, 69, 71, 83}
FOLD0 = [
    "person", "airplane", "boat", "parking meter", "dog", "elephant", "backpack", "suitcase", "sports ball",
    "skateboard", "wine glass", "spoon", "sandwich", "hot dog", "chair", "dining table", "mouse", "microwave",
    "refrigerator", "scissors",
]  # fmt: skip


def _load(path: Path) -> COCO:
    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(str(path))


def _digest(root: Path) -> dict[str, str]:
    files = sorted(p for p in root.rglob("*") if p.is_file())
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


@pytest.fixture(scope="module")
def coco_default(tmp_path_factory) -> tuple[Path, dict]:
    """The toy COCO dataset at its default sizes (160 train, 80 val, side 160, seed 0)."""
    out = tmp_path_factory.mktemp("coco")
    return out, toy.write_toy_coco(out)


@pytest.fixture(scope="module")
def voc_small(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("voc")
    return out, toy.write_toy_voc(out, train_images=40, val_images=24, size=96, seed=3)


def test_categories_are_the_real_coco_80():
    ids = [c["id"] for c in toy.COCO_CATEGORIES]
    assert len(ids) == 80 and ids == sorted(ids) and set(ids) == set(range(1, 91)) - MISSING_IDS
    by_id = {c["id"]: c["name"] for c in toy.COCO_CATEGORIES}
    assert (by_id[1], by_id[5], by_id[9], by_id[14], by_id[90]) == (
        "person", "airplane", "boat", "parking meter", "toothbrush",
    )  # fmt: skip
    assert len(set(by_id.values())) == 80 and all(c["supercategory"] for c in toy.COCO_CATEGORIES)
    # contiguous id = rank of the COCO id: fold 0 of COCO-20i is the protocol's list
    assert [toy.COCO_CATEGORIES[c - 1]["name"] for c in novel_classes("coco20i", 0)] == FOLD0
    assert len(toy.VOC_CLASSES) == 20 and toy.VOC_CLASSES[0] == "aeroplane" and toy.VOC_CLASSES[-1] == "tvmonitor"


def test_coco_layout_and_json(coco_default):
    out, summary = coco_default
    image_ids = {}
    for split in ("train", "val"):
        coco = _load(out / "annotations" / f"instances_{split}2014.json")
        cats = coco.loadCats(coco.getCatIds())
        assert [(c["id"], c["name"]) for c in cats] == [(c["id"], c["name"]) for c in toy.COCO_CATEGORIES]
        assert not MISSING_IDS & {c["id"] for c in cats}
        image_ids[split] = set(coco.getImgIds())
        for info in coco.loadImgs(coco.getImgIds()):
            assert re.fullmatch(rf"COCO_{split}2014_\d{{12}}\.jpg", info["file_name"])
            assert info["file_name"] == f"COCO_{split}2014_{info['id']:012d}.jpg"
            with Image.open(out / f"{split}2014" / info["file_name"]) as image:
                assert image.format == "JPEG" and image.mode == "RGB"
                assert image.size == (info["width"], info["height"])
            assert 0.75 * 160 - 1 <= info["width"] <= 1.25 * 160 + 1
            assert 0.75 * 160 - 1 <= info["height"] <= 1.25 * 160 + 1
        anns = coco.loadAnns(coco.getAnnIds())
        assert len({a["id"] for a in anns}) == len(anns)
        for ann in anns:  # area and bbox are the decoded mask's
            info = coco.imgs[ann["image_id"]]
            mask = coco.annToMask(ann)
            assert mask.shape == (info["height"], info["width"])
            assert ann["area"] == mask.sum() > 0
            rows, cols = np.nonzero(mask.any(1))[0], np.nonzero(mask.any(0))[0]
            x, y, w, h = ann["bbox"]
            assert (x, y, x + w, y + h) == (cols[0], rows[0], cols[-1] + 1, rows[-1] + 1)
        assert len(coco.getImgIds()) == summary["splits"][split]["images"]
    assert len(image_ids["train"]) == 160 and len(image_ids["val"]) == 80
    assert not image_ids["train"] & image_ids["val"]  # COCO ids are unique across train and val


def test_coco_every_category_in_enough_images(coco_default):
    out, _ = coco_default
    for split, least in (("train", 4), ("val", 3)):
        coco = _load(out / "annotations" / f"instances_{split}2014.json")
        for cat_id in coco.getCatIds():
            anns = coco.loadAnns(coco.getAnnIds(catIds=[cat_id], iscrowd=False))
            assert len({a["image_id"] for a in anns}) >= least, (split, cat_id)


def test_coco_polygons_crowds_and_empty_images(coco_default):
    out, summary = coco_default
    coco = _load(out / "annotations" / "instances_train2014.json")
    anns = coco.loadAnns(coco.getAnnIds())
    things = [a for a in anns if not a["iscrowd"]]
    crowds = [a for a in anns if a["iscrowd"]]
    assert all(isinstance(a["segmentation"], list) and all(len(p) >= 6 for p in a["segmentation"]) for a in things)
    assert sum(len(a["segmentation"]) > 1 for a in things) >= 10  # multi-polygon instances
    assert crowds and all(isinstance(a["segmentation"]["counts"], str) for a in crowds)
    assert all(a["segmentation"]["size"] == [coco.imgs[a["image_id"]][k] for k in ("height", "width")] for a in crowds)
    crowd_images = {a["image_id"] for a in crowds}
    assert 0.04 <= len(crowd_images) / len(coco.imgs) <= 0.2
    empty = [i for i in coco.getImgIds() if not coco.getAnnIds(imgIds=[i], iscrowd=None)]
    assert 1 <= len(empty) == summary["splits"]["train"]["empty"] <= 10
    # objects large enough for small inputs: most cover >= 6% of their image
    fractions = [a["area"] / (coco.imgs[a["image_id"]]["height"] * coco.imgs[a["image_id"]]["width"]) for a in things]
    assert np.mean(np.array(fractions) >= 0.06) > 0.6
    assert summary["instances"] + summary["crowd"] == sum(
        len(_load(out / "annotations" / f"instances_{s}2014.json").dataset["annotations"]) for s in ("train", "val")
    )


def test_every_category_usable_for_one_shot(coco_default):
    """At defaults each category covers >= 2*32*32 pixels (PFENet's filter) in >= 2 images of each split.

    The label map is painted as docs/PROTOCOL.md does: larger instances first, crowds 255 where nothing else is.
    """
    out, _ = coco_default
    for split in ("train", "val"):
        coco = _load(out / "annotations" / f"instances_{split}2014.json")
        usable = dict.fromkeys(coco.getCatIds(), 0)
        for image_id, info in coco.imgs.items():
            label = np.zeros((info["height"], info["width"]), np.int32)
            anns = coco.loadAnns(coco.getAnnIds(imgIds=[image_id], iscrowd=False))
            for ann in sorted(anns, key=lambda a: (-a["area"], a["id"])):
                label[coco.annToMask(ann).astype(bool)] = ann["category_id"]
            for cat_id in {a["category_id"] for a in anns}:
                usable[cat_id] += int((label == cat_id).sum() >= 2 * 32 * 32)
        assert min(usable.values()) >= 2, split


def test_categories_look_different(coco_default):
    """The mean colour of the visible part of each category's objects differs from every other category's."""
    out, _ = coco_default
    coco = _load(out / "annotations" / "instances_train2014.json")
    sums, counts = {}, {}
    for image_id, info in coco.imgs.items():
        pixels = np.asarray(Image.open(out / "train2014" / info["file_name"]), np.float64)
        anns = coco.loadAnns(coco.getAnnIds(imgIds=[image_id], iscrowd=None))  # in painting order
        masks = [coco.annToMask(a).astype(bool) for a in anns]
        for k, ann in enumerate(anns):
            if ann["iscrowd"]:
                continue
            visible = masks[k] & ~np.logical_or.reduce(masks[k + 1 :] + [np.zeros_like(masks[k])])
            sums[ann["category_id"]] = sums.get(ann["category_id"], 0) + pixels[visible].sum(0)
            counts[ann["category_id"]] = counts.get(ann["category_id"], 0) + visible.sum()
    means = np.array([sums[c] / counts[c] for c in sorted(sums)])
    assert len(means) == 80
    distances = np.linalg.norm(means[:, None] - means[None], axis=-1) + np.eye(80) * 1e9
    assert distances.min() > 12.0
    # and every class has its own (shape, texture, colour)
    apps = [toy.appearance(i, 80) for i in range(80)]
    assert len({(a.shape, a.texture, a.color) for a in apps}) == 80
    assert len({a.shape for a in apps}) == len(toy.SHAPES) and len({a.texture for a in apps}) == len(toy.TEXTURES)


def test_objects_are_drawn_where_annotated(coco_default):
    """Inside the topmost object the picture has the class colours; just outside it does not."""
    out, _ = coco_default
    coco = _load(out / "annotations" / "instances_val2014.json")
    checked = 0
    for image_id, info in list(coco.imgs.items())[:20]:
        anns = coco.loadAnns(coco.getAnnIds(imgIds=[image_id], iscrowd=False))
        if not anns:
            continue
        top = anns[-1]
        app = toy.appearance([c["id"] for c in toy.COCO_CATEGORIES].index(top["category_id"]), 80)
        pixels = np.asarray(Image.open(out / "val2014" / info["file_name"]), np.float64) / 255
        mask = coco.annToMask(top).astype(bool)
        # distance of each pixel to the segment between the class's two colours (textures mix them)
        c1, c2 = np.array(app.color), np.array(app.color2)
        t = np.clip((pixels - c2) @ (c1 - c2) / ((c1 - c2) @ (c1 - c2)), 0, 1)
        err = np.linalg.norm(pixels - (c2 + t[..., None] * (c1 - c2)), axis=-1)
        ring = cv2.dilate(mask.astype(np.uint8), np.ones((7, 7), np.uint8)).astype(bool) & ~mask
        assert np.median(err[mask]) < 0.1 < np.median(err[ring])
        checked += 1
    assert checked >= 10


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    a = toy.write_toy_coco(tmp_path / "a", train_images=30, val_images=24, size=64, seed=7)
    toy.write_toy_coco(tmp_path / "b", train_images=30, val_images=24, size=64, seed=7)
    toy.write_toy_coco(tmp_path / "c", train_images=30, val_images=24, size=64, seed=8)
    da, db, dc = (_digest(tmp_path / n) for n in "abc")
    assert da == db and len(da) == 30 + 24 + 2
    json_name = "annotations/instances_train2014.json"
    assert dc[json_name] != da[json_name] and set(dc.values()).isdisjoint(da.values())
    # tiny splits still hold all 80 categories
    coco = _load(tmp_path / "a" / json_name)
    assert {a["category_id"] for a in coco.dataset["annotations"]} == {c["id"] for c in toy.COCO_CATEGORIES}
    assert a["splits"]["train"]["images"] == 30


def test_too_few_images_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="cannot show all 80 classes"):
        toy.write_toy_coco(tmp_path, train_images=10, val_images=10, size=64)


def test_plan_covers_every_class_at_default_sizes():
    for split, n in (("train", 160), ("val", 80)):
        plan = toy.plan_split(np.random.default_rng(0), n, 80, toy.MIN_IMAGES[split])
        assert len(plan) == n and all(len(c) <= 4 for c in plan)
        per_class = np.bincount([c for classes in plan for c in set(classes)], minlength=80)
        assert per_class.min() >= toy.MIN_IMAGES[split]


def test_voc_layout_and_labels(voc_small):
    out, summary = voc_small
    train = (out / "ImageSets/SegmentationAug/train_aug.txt").read_text().split()
    val = (out / "ImageSets/Segmentation/val.txt").read_text().split()
    assert len(train) == 40 and len(val) == 24 and not set(train) & set(val)
    assert all(re.fullmatch(r"20(0[7-9]|1[01])_\d{6}", i) for i in train + val)
    for ids in (train, val):
        seen = set()
        for image_id in ids:
            with Image.open(out / "JPEGImages" / f"{image_id}.jpg") as image:
                size = image.size
            with Image.open(out / "SegmentationClassAug" / f"{image_id}.png") as png:
                assert png.mode == "L" and png.size == size
                label = np.asarray(png)
            values = set(np.unique(label).tolist())
            assert values <= set(range(21)) | {255} and 255 in values and values - {0, 255}
            seen |= values - {0, 255}
            # boundaries: two different labels (object/background or object/object) never touch directly
            for a, b in ((label[1:], label[:-1]), (label[:, 1:], label[:, :-1])):
                touching = (a != 255) & (b != 255)
                assert np.all(a[touching] == b[touching])
            band = (label == 255).mean()
            assert 0.005 < band < 0.25
        assert seen == set(range(1, 21))
    assert summary["crowd"] == 0 and summary["empty"] == 0 and summary["images"] == 64


def test_voc_same_seed_same_bytes(tmp_path, voc_small):
    out, _ = voc_small
    toy.write_toy_voc(tmp_path, train_images=40, val_images=24, size=96, seed=3)
    assert _digest(tmp_path) == _digest(out)


def test_cli_hooks(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    toy_cmd.add_arguments(parser)
    defaults = parser.parse_args(["--out", str(tmp_path)])
    assert (defaults.train_images, defaults.val_images, defaults.size, defaults.seed, defaults.format,
            defaults.version) == (160, 80, 160, 0, "coco", toy.VERSION) == (160, 80, 160, 0, "coco", 2)  # fmt: skip
    args = parser.parse_args(
        ["--out", str(tmp_path / "v"), "--format", "voc", "--train-images", "8", "--val-images", "6", "--size", "64"]
    )
    assert toy_cmd.run(args) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith("toy voc v2: 14 images (8 train, 6 val)") and str(tmp_path / "v") in line
    assert (tmp_path / "v" / "ImageSets/Segmentation/val.txt").read_text().count("\n") == 6
    with pytest.raises(SystemExit):
        parser.parse_args(["--out", str(tmp_path), "--version", "3"])


# --------------------------------------------------------------------------- version 2 (issue 17)


@pytest.fixture(scope="module")
def coco_v2(tmp_path_factory) -> tuple[Path, dict]:
    """Version 2 at the demo's image size: 90 train, 60 val."""
    out = tmp_path_factory.mktemp("coco2")
    return out, toy.write_toy_coco(out, train_images=90, val_images=60, size=160, seed=0, version=2)


def _masks(coco: COCO, image_id: int) -> list[tuple[dict, np.ndarray]]:
    anns = coco.loadAnns(coco.getAnnIds(imgIds=[image_id], iscrowd=None))  # painting order
    return [(a, coco.annToMask(a).astype(bool)) for a in anns]


def test_v2_is_the_same_coco_layout_and_deterministic(coco_v2, tmp_path):
    out, summary = coco_v2
    for split in ("train", "val"):
        coco = _load(out / "annotations" / f"instances_{split}2014.json")
        assert [c["id"] for c in coco.loadCats(coco.getCatIds())] == [c["id"] for c in toy.COCO_CATEGORIES]
        assert coco.dataset["info"]["version"] == "2.0"
        for ann in coco.loadAnns(coco.getAnnIds()):
            assert ann["area"] == coco.annToMask(ann).sum() > 0
    assert summary["crowd"] > 0 and summary["empty"] > 0
    a = toy.write_toy_coco(tmp_path / "a", train_images=30, val_images=24, size=64, seed=5, version=2)
    toy.write_toy_coco(tmp_path / "b", train_images=30, val_images=24, size=64, seed=5, version=2)
    toy.write_toy_coco(tmp_path / "c", train_images=30, val_images=24, size=64, seed=5)  # version 1
    da, db, dc = (_digest(tmp_path / n) for n in "abc")
    assert da == db and set(dc.values()).isdisjoint(da.values()) and a["images"] == 54
    with pytest.raises(ValueError, match="toy data version 3"):
        toy.write_toy_coco(tmp_path / "d", train_images=30, val_images=24, size=64, version=3)


def test_v2_classes_have_modes_a_constant_part_and_a_look_alike_across_folds():
    looks = toy.styles(80)
    assert len(looks) == 80 and all(len(s.modes) == 3 == len(toy.MODE_WEIGHTS) for s in looks)
    for k, style in enumerate(looks):
        bodies = [body for body, _ in style.modes]
        parts = {part for _, part in style.modes}
        assert len(parts) == 1 and len({b.color for b in bodies}) == 3  # one part look, three body looks
        assert bodies[0] == toy.appearance(k, 80)  # mode 0's body is version 1's class look
        nxt = looks[(k + 1) % 80]
        alike = bodies[2]
        assert (alike.color, alike.color2, alike.texture) == (nxt.modes[0][0].color, nxt.modes[0][0].color2,
                                                              nxt.modes[0][0].texture)  # fmt: skip
        assert alike.shape == style.shape.shape != nxt.shape.shape  # only the shape (and the part) tell them apart
        assert k % 4 != (k + 1) % 80 % 4  # neighbours are in different COCO-20i folds: base vs novel in every fold
    assert toy.styles(80) == looks  # fixed by the class index alone


def test_v2_sizes_range_from_small_to_most_of_the_image_and_objects_occlude(coco_v2):
    out, _ = coco_v2
    coco = _load(out / "annotations" / "instances_train2014.json")
    fractions, occluded = [], 0
    for image_id, info in coco.imgs.items():
        things = [(a, m) for a, m in _masks(coco, image_id) if not a["iscrowd"]]
        for k, (ann, mask) in enumerate(things):
            fractions.append(ann["area"] / (info["height"] * info["width"]))
            above = np.logical_or.reduce([m for _, m in things[k + 1 :]] + [np.zeros_like(mask)])
            occluded += int((mask & above).sum() >= 0.1 * mask.sum())
    fractions = np.array(fractions)
    assert fractions.min() < 0.02 and fractions.max() > 0.4  # small to most of the image
    assert np.mean(fractions < 0.05) > 0.1 and np.mean(fractions > 0.2) > 0.1
    assert occluded >= 10  # objects covering >= 10% of others


def test_v2_backgrounds_carry_clutter_that_is_not_annotated(coco_v2, tmp_path):
    """Background pixels (no annotation) hold edges: strokes and distractor blobs; version 1's are smooth."""
    v1 = tmp_path / "v1"
    toy.write_toy_coco(v1, train_images=90, val_images=24, size=160, seed=0)
    edges = {}
    for name, root in (("v1", v1), ("v2", coco_v2[0])):
        coco = _load(root / "annotations" / "instances_train2014.json")
        values = []
        for image_id, info in list(coco.imgs.items())[:40]:
            pixels = np.asarray(Image.open(root / "train2014" / info["file_name"]).convert("L"), np.float32)
            gradient = np.hypot(*np.gradient(cv2.GaussianBlur(pixels, (3, 3), 0)))
            things = [m for _, m in _masks(coco, image_id)] or [np.zeros(pixels.shape, bool)]
            background = ~cv2.dilate(np.logical_or.reduce(things).astype(np.uint8), np.ones((5, 5))).astype(bool)
            values.append(np.mean(gradient[background] > 8))
        edges[name] = float(np.mean(values))
    assert edges["v2"] > 3 * edges["v1"], edges


def test_pretrain_images_are_their_own_split():
    """The pretraining split: labelled, deterministic, and no image of it is (near) any few-shot train/val image
    of the demo's toy set drawn with the same seed."""
    images, labels = toy.pretrain_images(120, size=112, seed=0)
    again, _ = toy.pretrain_images(120, size=112, seed=0)
    assert images.shape == (120, 112, 112, 3) and labels.shape == (120, 80) and np.array_equal(images, again)
    per_image = labels.sum(1)
    assert 0.05 < np.mean(per_image == 0) < 0.3 and per_image.max() <= 2  # background-only images, then 1-2
    shown = labels.sum(0)
    assert (shown > 0).sum() >= 70  # every class about as often as the others
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        toy.write_toy_coco(root, train_images=150, val_images=90, size=160, seed=0, version=2)
        few = [np.asarray(Image.open(p).convert("RGB").resize((112, 112), Image.BILINEAR))
               for split in ("train2014", "val2014") for p in sorted((root / split).glob("*.jpg"))]  # fmt: skip
    few = np.stack(few)
    assert not {x.tobytes() for x in images} & {x.tobytes() for x in few}  # no image is another's
    # nor a near copy: at 28 x 28 the closest pair still differs by > 4 grey levels on average (a few-shot image
    # and its own JPEG re-encoding: about 1); the closest pairs are two background-only images
    small = lambda x: x.reshape(len(x), 28, 4, 28, 4, 3).mean((2, 4)).reshape(len(x), -1)  # noqa: E731
    a, b = small(images.astype(np.float32)), small(few.astype(np.float32))
    distance = np.abs(a[:, None] - b[None]).mean(-1)
    assert distance.min() > 4, distance.min()
