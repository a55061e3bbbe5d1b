"""PASCAL-5i: PFENet's image lists ship with jc2a and are the default of `jc2a shards pascal`."""

from __future__ import annotations

import pytest

from jc2a.data.pascal import PascalSource, default_list, read_list, split_ids


def test_default_lists_are_pfenets():
    train, val = read_list(default_list("train")), read_list(default_list("val"))
    assert len(train) == len(set(train)) == 5953  # VOC 2012 train + SBD, duplicates removed
    assert len(val) == len(set(val)) == 1449  # VOC 2012 val
    assert not set(train) & set(val)
    assert train[:2] == ["2008_000008", "2008_000015"] and val[0] == "2007_000033"
    assert split_ids(default_list("train"), default_list("val")) == {"train": train, "val": val}


def test_pascal_source_defaults_to_the_shipped_lists(tmp_path):
    from jc2a.data.toy import write_toy_voc

    root = tmp_path / "VOC2012"
    write_toy_voc(root, train_images=8, val_images=6, size=64, seed=3)
    assert PascalSource(root, "train").ids == read_list(default_list("train"))
    assert PascalSource(root, "val").ids[:1] == ["2007_000033"]
    own = PascalSource(root, "val", val_list=root / "ImageSets/Segmentation/val.txt")
    assert own.ids == (root / "ImageSets/Segmentation/val.txt").read_text().split()


@pytest.mark.parametrize("case", ["empty-train", "train-inside-val", "empty-val", "blank-lines-only"])
def test_a_list_that_selects_nothing_is_one_line(tmp_path, capsys, case):
    """`jc2a shards pascal` with an empty train list, or one entirely inside the val list, exited 0 with
    "train: 0 images"; now one line naming the list, and no output folder is left."""
    from jc2a.cli import main
    from jc2a.data.toy import write_toy_voc

    root = tmp_path / "VOC2012"
    write_toy_voc(root, train_images=6, val_images=5, size=64, seed=4)
    train, val = tmp_path / "train.txt", tmp_path / "val.txt"
    val_ids = (root / "ImageSets/Segmentation/val.txt").read_text().split()
    train.write_text({"empty-train": "", "train-inside-val": "\n".join(val_ids[:3]) + "\n",
                      "empty-val": "2007_000032\n", "blank-lines-only": "\n  \n\n"}[case])  # fmt: skip
    val.write_text("" if case == "empty-val" else "\n".join(val_ids) + "\n")
    out = tmp_path / "out"
    code = main(["shards", "pascal", "--root", str(root), "--out", str(out), "--no-progress",
                 "--train-list", str(train), "--val-list", str(val)])  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    expected = {
        "empty-train": f"{train}: the train list names no image (empty)",
        "blank-lines-only": f"{train}: the train list names no image (empty)",
        "train-inside-val": f"{train}: the train list selects no image: all 3 of its ids are in the val list {val} "
        "(held out)",
        "empty-val": f"{val}: the val list names no image (empty)",
    }[case]
    assert err[0] == f"jc2a shards: error: {expected}"
    assert not out.exists()
