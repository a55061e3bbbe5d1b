"""COCO-20i and PASCAL-5i folds: disjoint, complete, the published splits."""

from __future__ import annotations

import json

import pytest

from jc2a.data.coco import COCO_CLASS_NAMES, COCO_CONTIGUOUS
from jc2a.folds import base_classes, novel_classes

FOLD0_COCO = [
    "person", "airplane", "boat", "parking meter", "dog", "elephant", "backpack", "suitcase", "sports ball",
    "skateboard", "wine glass", "spoon", "sandwich", "hot dog", "chair", "dining table", "mouse", "microwave",
    "refrigerator", "scissors",
]  # fmt: skip


@pytest.mark.parametrize("dataset,n,per_fold", [("coco20i", 80, 20), ("pascal5i", 20, 5)])
def test_folds_disjoint_and_complete(dataset, n, per_fold):
    novel = [novel_classes(dataset, f) for f in range(4)]
    assert all(len(f) == per_fold and f == sorted(f) for f in novel)
    assert sorted(c for f in novel for c in f) == list(range(1, n + 1))
    for f in range(4):
        base = base_classes(dataset, f)
        assert base == sorted(base) and not set(base) & set(novel[f])
        assert sorted(base + novel[f]) == list(range(1, n + 1))


def test_coco_interleaved_split():
    assert novel_classes("coco20i", 1) == list(range(2, 81, 4))
    assert novel_classes("pascal5i", 3) == [16, 17, 18, 19, 20]


def test_coco_fold0_names_from_annotation_file(toy_coco):
    cats = json.loads((toy_coco / "annotations/instances_val2014.json").read_text())["categories"]
    names = {COCO_CONTIGUOUS[c["id"]]: c["name"] for c in cats}
    assert names == COCO_CLASS_NAMES
    assert [names[c] for c in novel_classes("coco20i", 0)] == FOLD0_COCO


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown dataset"):
        novel_classes("voc", 0)
    with pytest.raises(ValueError, match="fold"):
        base_classes("coco20i", 4)
