"""PASCAL-5i: PFENet's image lists ship with jc2a and are the default of `jc2a shards pascal`."""

from __future__ import annotations

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
