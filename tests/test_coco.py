"""COCO conversion: the fixed 80-category table, files that are not COCO, malformed annotations skipped and named."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from jc2a.cli import main
from jc2a.data.coco import COCO_CATEGORIES, COCO_CLASS_NAMES, COCO_CONTIGUOUS, CocoSource
from jc2a.data.records import decode_label
from jc2a.data.shards import write_shards


def _small(toy_coco: Path, n: int = 3) -> dict:
    """The first `n` toy val images holding at least two non-crowd instances, with their annotations."""
    data = json.loads((toy_coco / "annotations/instances_val2014.json").read_text())
    things: dict[int, int] = {}
    for ann in data["annotations"]:
        things[ann["image_id"]] = things.get(ann["image_id"], 0) + (not ann["iscrowd"])
    data["images"] = [im for im in data["images"] if things.get(im["id"], 0) >= 2][:n]
    ids = {im["id"] for im in data["images"]}
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] in ids]
    return data


def _write(data: dict, path: Path) -> Path:
    path.write_text(json.dumps(data))
    return path


def _oracle(data: dict, image_id: int, path: Path) -> np.ndarray:
    """The protocol's label map from pycocotools' own `annToMask`, one instance at a time."""
    coco = COCO(str(_write(data, path)))
    info = coco.imgs[image_id]
    label = np.zeros((info["height"], info["width"]), np.uint8)
    anns = coco.loadAnns(coco.getAnnIds(imgIds=image_id, iscrowd=None))
    things = [a for a in anns if not a["iscrowd"]]
    for ann in sorted(things, key=lambda a: (-int(coco.annToMask(a).sum()), a["id"])):
        label[coco.annToMask(ann) > 0] = COCO_CONTIGUOUS[ann["category_id"]]
    for ann in (a for a in anns if a["iscrowd"]):
        label[(coco.annToMask(ann) > 0) & (label == 0)] = 255
    return label


# --------------------------------------------------------------------------- stable class ids


def test_table_is_coco_80_with_its_gaps():
    assert len(COCO_CATEGORIES) == 80 and COCO_CONTIGUOUS[1] == 1 and COCO_CONTIGUOUS[90] == 80
    assert not {12, 26, 29, 30, 45, 66, 68, 69, 71, 83} & set(COCO_CONTIGUOUS)
    assert sorted(COCO_CONTIGUOUS.values()) == list(range(1, 81))
    assert (COCO_CLASS_NAMES[12], COCO_CLASS_NAMES[80]) == ("stop sign", "toothbrush")
    from jc2a.data import toy

    assert toy.COCO_CATEGORIES is COCO_CATEGORIES  # one table


@pytest.mark.parametrize(
    "change,message",
    [
        (
            lambda cats: cats.append({"id": 91, "name": "foo"}),
            "category id 91 'foo' is not one of COCO's 80 categories",
        ),
        (lambda cats: cats[4].update(name="plane"), "category id 5 is named 'plane', COCO's table says 'airplane'"),
        (lambda cats: cats.pop(), "category id 90 'toothbrush' is missing"),
        (lambda cats: cats.append(dict(cats[0])), "category id 1 is listed twice"),
    ],
    ids=["extra", "renamed", "missing", "twice"],
)
def test_categories_that_differ_from_the_table_are_refused(toy_coco, tmp_path, change, message):
    data = _small(toy_coco)
    change(data["categories"])
    path = _write(data, tmp_path / "ann.json")
    with pytest.raises(ValueError) as err:
        CocoSource(toy_coco / "val2014", path)
    assert str(err.value) == f"{path}: {message}"


def test_a_file_with_a_subset_of_categories_keeps_coco_ids(toy_coco, tmp_path, capsys):
    """Ids never come from the file's own list: a file listing fewer categories is refused, not renumbered."""
    data = _small(toy_coco)
    data["categories"] = [c for c in data["categories"] if c["id"] in (1, 13, 90)]
    path = _write(data, tmp_path / "ann.json")
    args = ["shards", "coco", "--images", str(toy_coco / "val2014"), "--annotations", str(path)]
    assert main(args + ["--out", str(tmp_path / "o"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(path) in err[0] and "is missing" in err[0]


# --------------------------------------------------------------------------- files that are not COCO


@pytest.mark.parametrize(
    "content,reason",
    [
        (b"[1, 2]", "a JSON list"),
        (b"{}", "no 'images', 'annotations', 'categories'"),
        (b'{"images": [], "categories": []}', "no 'annotations'"),
        (b'{"images": {}, "annotations": [], "categories": []}', "'images' is a dict, not a list"),
        (b"{not json", "not JSON"),
        (b'{"images": "\xff\xfe"}', "not JSON"),
    ],
    ids=["list", "empty", "missing-key", "wrong-type", "not-json", "not-utf8"],
)
def test_not_a_coco_file_is_one_clear_error(toy_coco, tmp_path, capsys, content, reason):
    path = tmp_path / "ann.json"
    path.write_bytes(content)
    with pytest.raises(ValueError, match="not a COCO instances file") as err:
        CocoSource(toy_coco / "val2014", path)
    assert str(err.value).startswith(f"{path}: ") and reason in str(err.value) and "\n" not in str(err.value)
    args = ["shards", "coco", "--images", str(toy_coco / "val2014"), "--annotations", str(path)]
    assert main(args + ["--out", str(tmp_path / "o")]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


# --------------------------------------------------------------------------- malformed annotations


def _rle_of(data: dict, image_id: int) -> dict:
    info = next(im for im in data["images"] if im["id"] == image_id)
    mask = np.zeros((info["height"], info["width"]), np.uint8, order="F")
    mask[2:9, 3:12] = 1
    rle = mask_utils.encode(np.asfortranarray(mask))
    return {"size": list(rle["size"]), "counts": rle["counts"].decode()}


BAD_ANNOTATIONS = {  # name -> (change to one annotation, words the summary must hold)
    "polygon-2-points": (lambda a, d: a.update(segmentation=[[1.0, 1.0, 5.0, 5.0]]), "polygon with 2 points"),
    "empty-segmentation": (lambda a, d: a.update(segmentation=[]), "empty segmentation"),
    "bbox-only": (lambda a, d: a.pop("segmentation"), "no segmentation (bbox only)"),
    "unknown-category": (lambda a, d: a.update(category_id=91), "unknown category id 91"),
    "category-gap": (lambda a, d: a.update(category_id=12), "unknown category id 12"),
    "rle-size": (
        lambda a, d: a.update(segmentation={**_rle_of(d, a["image_id"]), "size": [7, 5]}),
        "RLE size 5x7 differs from the image's",
    ),
    "rle-counts": (
        lambda a, d: a.update(segmentation={"size": _rle_of(d, a["image_id"])["size"], "counts": [5, 5]}),
        "RLE covers 10 pixels",
    ),
    "rle-garbage": (
        lambda a, d: a.update(segmentation={**_rle_of(d, a["image_id"]), "counts": "\x7f\x7f"}),
        "malformed compressed RLE",
    ),
    "non-numeric": (lambda a, d: a.update(segmentation=[["a", 1, 20, 1, 20, 20]]), "non-numeric coordinates"),
    "nan": (lambda a, d: a.update(segmentation=[[float("nan"), 1, 20, 1, 20, 20]]), "non-numeric coordinates"),
    "far-outside": (lambda a, d: a.update(segmentation=[[0, 0, 1e12, 0, 0, 1e12]]), "far outside the image"),
}


@pytest.mark.parametrize("case", sorted(BAD_ANNOTATIONS))
def test_malformed_annotation_is_skipped_and_named(toy_coco, tmp_path, case):
    change, words = BAD_ANNOTATIONS[case]
    data = _small(toy_coco)
    clean = copy.deepcopy(data)
    image = data["images"][0]
    victim = next(a for a in data["annotations"] if a["image_id"] == image["id"] and not a["iscrowd"])
    change(victim, data)
    clean["annotations"] = [a for a in clean["annotations"] if a["id"] != victim["id"]]
    source = CocoSource(toy_coco / "val2014", _write(data, tmp_path / "ann.json"))
    summary = write_shards(source, tmp_path / "out", "val", "coco", source.class_names, progress=False)
    assert summary.records == len(data["images"]) and not summary.skipped  # the image is written
    assert summary.dropped == [
        {"source": f"val2014/{image['file_name']}", "reason": summary.dropped[0]["reason"]}
    ] and summary.dropped[0]["reason"].startswith(f"annotation {victim['id']}: ")
    text = "\n".join(summary.lines())
    assert image["file_name"] in text and f"annotation {victim['id']}" in text and words in text
    index = json.loads((tmp_path / "out/val-index.json").read_text())
    assert index["dropped"] == summary.dropped
    import webdataset as wds

    sample = next(s for s in wds.WebDataset(str(tmp_path / "out/val-000000.tar"), shardshuffle=False)
                  if s["__key__"] == f"val2014/{image['id']:012d}")  # fmt: skip
    np.testing.assert_array_equal(decode_label(sample["png"]), _oracle(clean, image["id"], tmp_path / "c.json"))


def test_annotation_of_an_unlisted_image_is_named(toy_coco, tmp_path):
    data = _small(toy_coco)
    data["annotations"].append({**data["annotations"][0], "id": 999_999, "image_id": 123})
    source = CocoSource(toy_coco / "val2014", _write(data, tmp_path / "ann.json"))
    summary = write_shards(source, tmp_path / "out", "val", "coco", source.class_names, progress=False)
    assert summary.records == len(data["images"])
    assert summary.dropped == [
        {"source": "ann.json", "reason": "annotation 999999: image id 123 is not among the file's images"}
    ]


@pytest.mark.parametrize(
    "bad",
    ["../val2014/{name}", "{outside}", "sub/../../{name}", "C:\\{name}"],
    ids=["dotdot", "absolute", "inner-dotdot", "windows-drive"],
)
def test_file_name_leaving_the_image_folder_is_refused(toy_coco, tmp_path, bad):
    data = _small(toy_coco)
    victim = data["images"][1]
    outside = tmp_path / "outside.jpg"  # a valid image of the right size: only the name gives it away
    shutil.copy(toy_coco / "val2014" / victim["file_name"], outside)
    victim["file_name"] = bad.format(name=victim["file_name"], outside=outside)
    source = CocoSource(toy_coco / "val2014", _write(data, tmp_path / "ann.json"))
    summary = write_shards(source, tmp_path / "out", "val", "coco", source.class_names, progress=False)
    assert summary.records == len(data["images"]) - 1 and len(summary.skipped) == 1
    reason = summary.skipped[0]["reason"]
    assert repr(victim["file_name"]) in reason and ("leave the image folder" in reason)
    assert summary.lines()[-1] == f"    {summary.skipped[0]['source']}: {reason}" and not summary.dropped


# --------------------------------------------------------------------------- decoding


def test_every_segmentation_form_decodes_as_pycocotools(toy_coco, tmp_path):
    """Polygons (several per instance), compressed RLE (a crowd) and uncompressed RLE, against `annToMask`."""
    full = json.loads((toy_coco / "annotations/instances_val2014.json").read_text())
    crowd = next(a for a in full["annotations"] if a["iscrowd"])
    assert isinstance(crowd["segmentation"]["counts"], str)  # compressed
    data = _small(toy_coco, n=2)
    data["images"].append(next(im for im in full["images"] if im["id"] == crowd["image_id"]))
    data["annotations"] += [a for a in full["annotations"] if a["image_id"] == crowd["image_id"]]
    image = data["images"][0]
    mask = np.zeros((image["height"], image["width"]), np.uint8)
    mask[5:40, 7:30] = 1
    mask[50:60, 10:100] = 1
    flat = mask.flatten(order="F")  # COCO runs are column-major, starting with a run of zeros
    ends = np.flatnonzero(np.diff(flat)) + 1
    counts = np.diff(np.r_[0, ends, flat.size]).tolist()
    uncompressed = {"size": [image["height"], image["width"]], "counts": counts}
    polygons = [[60, 60, 90, 60, 90, 90], [100, 10, 120, 10, 120, 30, 100, 30]]
    data["annotations"] += [
        {"id": 900_001, "image_id": image["id"], "category_id": 90, "iscrowd": 0, "segmentation": uncompressed},
        {"id": 900_002, "image_id": image["id"], "category_id": 3, "iscrowd": 0, "segmentation": polygons},
    ]
    for ann in data["annotations"][-2:]:  # pycocotools' COCO index wants these
        ann["area"], ann["bbox"] = 1.0, [0, 0, 1, 1]
    source = CocoSource(toy_coco / "val2014", _write(data, tmp_path / "ann.json"))
    labels = {int(item.key.split("/")[1]): (item.label(), item.problems) for item in source}
    assert len(labels) == 3
    for image_id, (label, problems) in labels.items():
        np.testing.assert_array_equal(label, _oracle(data, image_id, tmp_path / "o.json"))
        assert not problems
    assert (labels[image["id"]][0] == 80).sum() > 0 and (labels[crowd["image_id"]][0] == 255).sum() > 0


def test_compressed_rle_is_checked_before_pycocotools_decodes_it():
    """No Python copy of pycocotools' RLE decoder: its characters are checked (the C parser trusts them), then
    pycocotools' own decoder says whether the runs cover the image exactly, on its canvas and one pixel short."""
    from jc2a.data.coco import decode_mask, segmentation_problem

    mask = np.zeros((7, 9), np.uint8, order="F")
    mask[2:5, 3:8] = 1
    counts = mask_utils.encode(mask)["counts"].decode()
    assert segmentation_problem({"size": [7, 9], "counts": counts}, 7, 9) is None
    np.testing.assert_array_equal(decode_mask({"size": [7, 9], "counts": counts}, 7, 9), mask.astype(bool))
    cases = {
        counts + "1": "covers more than the image's 63 pixels",  # one run too many
        "i" + counts[1:]: "covers more than the image's 63 pixels",  # a first run too long
        counts[:-1]: "covers fewer than the image's 63 pixels",  # the last run missing: pixels left unset
        counts[:-1] + "P": "malformed compressed RLE (empty or truncated)",  # a run that never ends
        "": "malformed compressed RLE (empty or truncated)",
        counts[:3] + "\x7f" + counts[4:]: "malformed compressed RLE (character '\\x7f')",
    }
    for bad, words in cases.items():
        assert words in segmentation_problem({"size": [7, 9], "counts": bad}, 7, 9), bad


def test_a_file_that_lists_no_image_is_one_line(toy_coco, tmp_path, capsys):
    """`images: []` wrote "val: 0 images" and exited 0."""
    path = tmp_path / "ann.json"
    data = json.loads((toy_coco / "annotations/instances_val2014.json").read_text())
    path.write_text(json.dumps({**data, "images": [], "annotations": []}))
    args = ["shards", "coco", "--images", str(toy_coco / "val2014"), "--annotations", str(path)]
    assert main(args + ["--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"jc2a shards: error: {path}: lists no image ('images' is empty); nothing to write"]
    assert not (tmp_path / "o").exists()


def test_a_coco_file_nested_200000_deep_is_one_line(toy_coco, tmp_path, capsys):
    path = tmp_path / "ann.json"
    path.write_text('{"images": ' + "[" * 200_000 + "]" * 200_000 + "}")
    args = ["shards", "coco", "--images", str(toy_coco / "val2014"), "--annotations", str(path)]
    assert main(args + ["--out", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"jc2a shards: error: {path}: not a COCO instances file (JSON nested too deep)"
    ]
