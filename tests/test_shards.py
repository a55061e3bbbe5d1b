"""Shards: pixel-exact labels against pycocotools, crowds, id gaps, index, bad input, atomic resumable writes."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from pycocotools.coco import COCO

from jc2a.cli import main
from jc2a.data.coco import CocoSource
from jc2a.data.records import decode_label
from jc2a.data.shards import read_shard_entries, write_shards


def _records(folder: Path, split: str) -> dict[str, dict]:
    """Every record of a split, read with plain webdataset (no jc2a reader)."""
    urls = sorted(str(p) for p in folder.glob(f"{split}-*.tar"))
    return {s["__key__"]: s for s in wds.WebDataset(urls, shardshuffle=False)}


def _expected_label(coco: COCO, image_id: int, rank: dict[int, int]) -> np.ndarray:
    """The protocol's label map, rebuilt here from pycocotools masks one instance at a time."""
    info = coco.imgs[image_id]
    label = np.zeros((info["height"], info["width"]), np.uint8)
    anns = coco.loadAnns(coco.getAnnIds(imgIds=image_id, iscrowd=None))
    things = [a for a in anns if not a["iscrowd"]]
    for ann in sorted(things, key=lambda a: (-int(coco.annToMask(a).sum()), a["id"])):
        label[coco.annToMask(ann) > 0] = rank[ann["category_id"]]
    for ann in (a for a in anns if a["iscrowd"]):
        label[(coco.annToMask(ann) > 0) & (label == 0)] = 255
    return label


@pytest.mark.parametrize("split", ["train", "val"])
def test_round_trip_pixel_exact(toy_coco, coco_shards, split):
    coco = COCO(str(toy_coco / "annotations" / f"instances_{split}2014.json"))
    rank = {cid: i for i, cid in enumerate(sorted(coco.getCatIds()), start=1)}
    records = _records(coco_shards, split)
    assert len(records) == len(coco.imgs)
    for image_id, info in coco.imgs.items():
        sample = records[f"{split}2014/{image_id:012d}"]
        assert sample["jpg"] == (toy_coco / f"{split}2014" / info["file_name"]).read_bytes()  # not re-encoded
        label = decode_label(sample["png"])
        np.testing.assert_array_equal(label, _expected_label(coco, image_id, rank))
        meta = json.loads(sample["json"])
        assert (meta["height"], meta["width"]) == (info["height"], info["width"])
        counts = np.bincount(label.ravel(), minlength=256)
        assert meta["classes"] == {str(c): int(counts[c]) for c in range(1, 81) if counts[c]}


def test_crowd_becomes_ignore_and_small_objects_stay_visible(toy_coco, coco_shards):
    coco = COCO(str(toy_coco / "annotations/instances_train2014.json"))
    records = _records(coco_shards, "train")
    crowds = coco.loadAnns(coco.getAnnIds(iscrowd=True))
    assert crowds, "toy data must have crowd annotations"
    checked = 0
    for ann in crowds:
        label = decode_label(records[f"train2014/{ann['image_id']:012d}"]["png"])
        region = coco.annToMask(ann) > 0
        things = np.zeros_like(region)
        for other in coco.loadAnns(coco.getAnnIds(imgIds=ann["image_id"], iscrowd=False)):
            things |= coco.annToMask(other) > 0
        assert (label[region & ~things] == 255).all()
        assert (label[things] != 255).all()
        checked += int((region & ~things).sum())
    assert checked > 0


def test_category_id_gaps(toy_coco, coco_shards):
    index = json.loads((coco_shards / "train-index.json").read_text())
    coco = COCO(str(toy_coco / "annotations/instances_train2014.json"))
    names = {c["id"]: c["name"] for c in coco.loadCats(coco.getCatIds())}
    assert 12 not in names and 83 not in names
    assert index["classes"]["12"] == names[13] == "stop sign"
    assert index["classes"]["80"] == names[90] == "toothbrush"
    assert len(index["classes"]) == 80
    # an instance of category 90 is painted 80 where nothing smaller covers it
    records = _records(coco_shards, "train")
    ann = next(a for a in coco.loadAnns(coco.getAnnIds(catIds=[90], iscrowd=False)))
    label = decode_label(records[f"train2014/{ann['image_id']:012d}"]["png"])
    assert (label[coco.annToMask(ann) > 0] == 80).mean() > 0.5


def test_index_lists_records_and_offsets(coco_shards):
    index = json.loads((coco_shards / "val-index.json").read_text())
    assert len(index["shards"]) >= 2, "bounded size must split the toy val set"
    assert sum(s["records"] for s in index["shards"]) == len(index["records"])
    rec = index["records"][5]
    with open(coco_shards / index["shards"][rec["shard"]]["name"], "rb") as f:
        f.seek(rec["offsets"]["json"][0])
        meta = json.loads(f.read(rec["offsets"]["json"][1]))
    assert meta["classes"] == rec["classes"]
    for shard in index["shards"]:
        assert (coco_shards / shard["name"]).stat().st_size <= 400_000 + 200_000


def _copy_toy(toy_coco: Path, dst: Path) -> Path:
    shutil.copytree(toy_coco, dst)
    return dst


def test_bad_images_are_skipped_and_named(toy_coco, tmp_path):
    root = _copy_toy(toy_coco, tmp_path / "coco")
    ann_file = root / "annotations/instances_val2014.json"
    data = json.loads(ann_file.read_text())
    imgs = data["images"]
    (root / "val2014" / imgs[0]["file_name"]).unlink()  # named in the json, absent
    (root / "val2014" / imgs[1]["file_name"]).write_bytes(b"\xff\xd8 not a jpeg")  # unreadable
    imgs[2]["height"] += 7  # the json's size differs from the image (so the label would too)
    ann_file.write_text(json.dumps(data))
    source = CocoSource(root / "val2014", ann_file)
    summary = write_shards(source, tmp_path / "out", "val", "coco", source.class_names, progress=False)
    assert summary.records == len(imgs) - 3 and len(summary.skipped) == 3
    text = "\n".join(summary.lines())
    for i in range(3):
        assert imgs[i]["file_name"] in text
    assert "image not found" in text and "unreadable image" in text and "size mismatch" in text
    index = json.loads((tmp_path / "out/val-index.json").read_text())
    assert len(index["skipped"]) == 3


def _shards_cli(images: Path, annotations: Path, out: Path, extra: tuple = ()) -> int:
    args = ["shards", "coco", "--images", str(images), "--annotations", str(annotations), "--out", str(out)]
    return main(args + list(extra))


def test_missing_inputs_are_named(toy_coco, tmp_path, capsys):
    ann = toy_coco / "annotations/instances_val2014.json"
    assert _shards_cli(tmp_path / "nope", ann, tmp_path / "o") == 2
    assert str(tmp_path / "nope") in capsys.readouterr().err
    assert _shards_cli(toy_coco / "val2014", tmp_path / "missing.json", tmp_path / "o") == 2
    assert "missing.json" in capsys.readouterr().err
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    assert _shards_cli(toy_coco / "val2014", broken, tmp_path / "o") == 2
    assert "broken.json" in capsys.readouterr().err


class _Interrupt(Exception):
    pass


class _DyingSource:
    """The items of a source; building the `n`-th record raises (a writer killed mid-shard)."""

    def __init__(self, source, n):
        self.items, self.class_names = list(source), source.class_names
        item = self.items[n]
        self.items[n] = dataclasses.replace(item, label=lambda: (_ for _ in ()).throw(_Interrupt()))

    def __iter__(self):
        return iter(self.items)

    def __len__(self):
        return len(self.items)


def test_interrupted_write_resumes_without_rewriting(toy_coco, tmp_path):
    source = CocoSource(toy_coco / "train2014", toy_coco / "annotations/instances_train2014.json")
    whole = tmp_path / "whole"
    write_shards(source, whole, "train", "coco", source.class_names, max_shard_bytes=300_000, progress=False)
    out = tmp_path / "resumed"
    with pytest.raises(_Interrupt):
        write_shards(
            _DyingSource(source, 70), out, "train", "coco", source.class_names, max_shard_bytes=300_000, progress=False
        )
    complete = sorted(out.glob("train-*.tar"))
    assert complete and list(out.glob("*.tmp")), "a complete shard and a partial temporary one"
    assert not (out / "train-index.json").exists()
    stamps = {p.name: p.stat().st_mtime_ns for p in complete}
    summary = write_shards(source, out, "train", "coco", source.class_names, max_shard_bytes=300_000, progress=False)
    assert summary.shards_kept == len(complete)
    assert any("interrupted shard" in line for line in summary.lines())  # the deleted .tmp is reported
    assert {p.name: p.stat().st_mtime_ns for p in complete} == stamps  # not rewritten
    assert not list(out.glob("*.tmp"))
    keys = [e["key"] for e in json.loads((out / "train-index.json").read_text())["records"]]
    assert len(keys) == len(set(keys)) == len(source)
    for a, b in zip(sorted(whole.glob("train-*.tar")), sorted(out.glob("train-*.tar")), strict=True):
        assert a.read_bytes() == b.read_bytes()  # same shards as an uninterrupted run
    # a rerun of a finished write changes nothing
    again = write_shards(source, out, "train", "coco", source.class_names, max_shard_bytes=300_000, progress=False)
    assert again.shards_written == 0 and again.records == len(source) and not again.removed
    # a shard missing in the middle: the ones after it are removed, reported and rewritten without duplicates
    (out / "train-000001.tar").unlink()
    gap = write_shards(source, out, "train", "coco", source.class_names, max_shard_bytes=300_000, progress=False)
    assert gap.shards_kept == 1 and any("follows a missing shard" in r for r in gap.removed)
    keys = [e["key"] for e in json.loads((out / "train-index.json").read_text())["records"]]
    assert len(keys) == len(set(keys)) == len(source)
    for a, b in zip(sorted(whole.glob("train-*.tar")), sorted(out.glob("train-*.tar")), strict=True):
        assert a.read_bytes() == b.read_bytes()


def test_foreign_shards_refused(toy_coco, coco_shards, tmp_path):
    out = tmp_path / "mixed"
    out.mkdir()
    shutil.copy(coco_shards / "val-000000.tar", out / "train-000000.tar")
    shutil.copy(coco_shards / "val-000001.tar", out / "train-000002.tar")  # after a gap
    (out / "train-000003.tar.tmp").write_bytes(b"partial")
    before = sorted(p.name for p in out.iterdir())
    source = CocoSource(toy_coco / "train2014", toy_coco / "annotations/instances_train2014.json")
    with pytest.raises(ValueError, match="records this source does not list"):
        write_shards(source, out, "train", "coco", source.class_names, progress=False)
    assert sorted(p.name for p in out.iterdir()) == before  # refused before removing anything


def test_shard_members_are_plain_webdataset(coco_shards):
    with tarfile.open(coco_shards / "train-000000.tar") as tar:
        names = tar.getnames()[:3]
    key = names[0].rsplit(".", 1)[0]
    assert names == [f"{key}.json", f"{key}.jpg", f"{key}.png"] and key.startswith("train2014/")
    entries = read_shard_entries(coco_shards / "train-000000.tar", 0)
    assert entries[0]["key"] == key


def test_pascal_shards(tmp_path):
    from jc2a.data.toy import write_toy_voc

    root = tmp_path / "VOC2012"
    write_toy_voc(root, train_images=30, val_images=12, size=96, seed=1)
    train_list = root / "ImageSets/SegmentationAug/train_aug.txt"
    val_ids = (root / "ImageSets/Segmentation/val.txt").read_text().split()
    # PFENet-style pair lines, a duplicate and a val image in the train list are all handled
    lines = [f"JPEGImages/{i}.jpg SegmentationClassAug/{i}.png" for i in train_list.read_text().split()]
    train_list.write_text("\n".join(lines + lines[:3] + [val_ids[0]]) + "\n")
    lists = ["--train-list", str(train_list), "--val-list", str(root / "ImageSets/Segmentation/val.txt")]
    assert main(["shards", "pascal", "--root", str(root), "--out", str(tmp_path / "out"), "--no-progress"] + lists) == 0
    train = json.loads((tmp_path / "out/train-index.json").read_text())
    val = json.loads((tmp_path / "out/val-index.json").read_text())
    assert len(train["records"]) == 30 and len(val["records"]) == 12
    assert not {r["key"] for r in train["records"]} & {r["key"] for r in val["records"]}
    assert train["classes"]["1"] == "aeroplane" and train["classes"]["20"] == "tvmonitor"
    sample = next(iter(wds.WebDataset(str(tmp_path / "out/val-000000.tar"), shardshuffle=False)))
    label = decode_label(sample["png"])
    original = np.array(
        __import__("PIL.Image", fromlist=["Image"]).open(
            root / "SegmentationClassAug" / (sample["__key__"].split("/")[1] + ".png")
        )
    )
    np.testing.assert_array_equal(label, original)
    assert 255 in label


def test_pascal_label_of_another_size_is_skipped_and_named(tmp_path):
    from PIL import Image

    from jc2a.data.pascal import PascalSource
    from jc2a.data.toy import write_toy_voc

    root = tmp_path / "VOC2012"
    write_toy_voc(root, train_images=8, val_images=6, size=64, seed=2)
    victim = (root / "ImageSets/Segmentation/val.txt").read_text().split()[0]
    label_path = root / "SegmentationClassAug" / f"{victim}.png"
    with Image.open(label_path) as im:
        im.resize((im.width + 5, im.height), Image.NEAREST).save(label_path)
    lists = (root / "ImageSets/SegmentationAug/train_aug.txt", root / "ImageSets/Segmentation/val.txt")
    source = PascalSource(root, "val", *lists)
    summary = write_shards(source, tmp_path / "out", "val", "pascal", source.class_names, progress=False)
    assert summary.records == 5 and len(summary.skipped) == 1
    reason = summary.skipped[0]["reason"]
    assert reason.startswith("size mismatch") and f"{victim}.jpg" in reason


def test_rasterize_hand_built_overlaps_crowds_and_gaps():
    """An oracle written by hand: big object under a small one, a crowd partly under an object, id 90 -> 80."""
    from pycocotools import mask as mask_utils

    from jc2a.data.coco import COCO_CONTIGUOUS, rasterize

    def rle(rows, cols):
        m = np.zeros((8, 10), np.uint8, order="F")
        m[rows, cols] = 1
        r = mask_utils.encode(np.asfortranarray(m))
        r["counts"] = r["counts"].decode()
        return r

    anns = [  # listed small first: painting order must come from the areas, not the file order
        {"id": 1, "image_id": 7, "category_id": 90, "segmentation": rle(slice(2, 4), slice(2, 4)), "iscrowd": 0},
        {"id": 2, "image_id": 7, "category_id": 13, "segmentation": rle(slice(1, 6), slice(1, 7)), "iscrowd": 0},
        {"id": 3, "image_id": 7, "category_id": 1, "segmentation": rle(slice(4, 8), slice(5, 10)), "iscrowd": 1},
    ]
    label = rasterize({"id": 7, "file_name": "x.jpg", "height": 8, "width": 10}, anns)
    expected = np.zeros((8, 10), np.uint8)
    expected[4:8, 5:10] = 255  # crowd
    expected[1:6, 1:7] = 12  # stop sign (big, COCO id 13 -> 12) covers part of the crowd
    expected[2:4, 2:4] = 80  # toothbrush (small, COCO id 90 -> 80) stays visible on top
    np.testing.assert_array_equal(label, expected)
    assert (COCO_CONTIGUOUS[1], COCO_CONTIGUOUS[13], COCO_CONTIGUOUS[90], len(COCO_CONTIGUOUS)) == (1, 12, 80, 80)


# --------------------------------------------------------------------------- killed and damaged writes


def _damage_truncate_at_record(path: Path) -> None:
    entries = read_shard_entries(path, 0)
    cut = entries[len(entries) // 2]["offsets"]["json"][0] - 512  # the header of a record's first member
    path.write_bytes(path.read_bytes()[:cut])


def _damage_truncate_in_member(path: Path) -> None:
    entries = read_shard_entries(path, 0)
    offset, size = entries[len(entries) // 2]["offsets"]["jpg"]
    path.write_bytes(path.read_bytes()[: offset + size // 2])


def _damage_alter_jpg(path: Path) -> None:
    offset, size = read_shard_entries(path, 0)[1]["offsets"]["jpg"]
    data = bytearray(path.read_bytes())
    data[offset + size // 2] ^= 0x01
    path.write_bytes(bytes(data))


def _damage_alter_header(path: Path) -> None:
    offset, size = read_shard_entries(path, 0)[1]["offsets"]["json"]
    data = bytearray(path.read_bytes())
    member = bytes(data[offset : offset + size])
    meta = json.loads(member)
    first = next(iter(meta["classes"]))
    meta["classes"][first] += 1 if meta["classes"][first] % 10 != 9 else -1  # same length in bytes
    altered = json.dumps(meta, sort_keys=True).encode()
    assert len(altered) == size
    data[offset : offset + size] = altered
    path.write_bytes(bytes(data))


DAMAGES = {
    "truncated-at-record": _damage_truncate_at_record,
    "truncated-in-member": _damage_truncate_in_member,
    "altered-jpg": _damage_alter_jpg,
    "altered-header": _damage_alter_header,
}


# A flipped bit inside JPEG data may still decode: without an index only the size/sha256 of one could tell.
DAMAGE_CASES = [(d, True) for d in sorted(DAMAGES)] + [(d, False) for d in sorted(DAMAGES) if d != "altered-jpg"]


@pytest.mark.parametrize(
    "damage,with_index", DAMAGE_CASES, ids=[f"{d}-{'index' if i else 'no-index'}" for d, i in DAMAGE_CASES]
)
def test_damaged_kept_shard_is_rewritten(toy_coco, coco_shards, tmp_path, damage, with_index):
    """A kept shard that was cut or altered is detected (index size/sha256, or a full read) and written again."""
    out = tmp_path / "out"
    out.mkdir()
    for path in coco_shards.glob("train-*"):
        shutil.copy(path, out / path.name)
    if not with_index:
        (out / "train-index.json").unlink()
    originals = {p.name: p.read_bytes() for p in out.glob("train-*.tar")}
    assert len(originals) >= 3
    DAMAGES[damage](out / "train-000001.tar")
    source = CocoSource(toy_coco / "train2014", toy_coco / "annotations/instances_train2014.json")
    summary = write_shards(source, out, "train", "coco", source.class_names, max_shard_bytes=400_000, progress=False)
    assert summary.shards_kept == 1 and summary.removed[0].startswith("train-000001.tar (damaged: ")
    assert any(r.startswith("train-000002.tar (follows a damaged shard") for r in summary.removed)
    assert {p.name: p.read_bytes() for p in out.glob("train-*.tar")} == originals  # rewritten, byte-identical
    index = json.loads((out / "train-index.json").read_text())
    assert index["format"] == "jc2a-shards/2" and len(index["records"]) == len(source)
    for shard in index["shards"]:
        data = originals[shard["name"]]
        assert shard["bytes"] == len(data) and shard["sha256"] == __import__("hashlib").sha256(data).hexdigest()


def test_out_that_is_a_file_or_unwritable_is_one_line(toy_coco, tmp_path, capsys):
    ann = toy_coco / "annotations/instances_val2014.json"
    afile = tmp_path / "afile"
    afile.write_text("x")
    for out in (afile, afile / "sub"):
        assert _shards_cli(toy_coco / "val2014", ann, out) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and str(out) in err[0], err
    assert afile.read_text() == "x"


def test_full_disk_names_the_file_and_keeps_complete_shards(toy_coco, tmp_path, monkeypatch, capsys):
    import errno

    calls = {"n": 0}
    real = tarfile.TarFile.addfile

    def addfile(self, *args, **kw):
        calls["n"] += 1
        if calls["n"] > 150:  # 50 records: the first shards are complete by then
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, *args, **kw)

    monkeypatch.setattr(tarfile.TarFile, "addfile", addfile)
    out = tmp_path / "out"
    args = ["--max-shard-mb", "0.2", "--no-progress"]
    assert _shards_cli(toy_coco / "val2014", toy_coco / "annotations/instances_val2014.json", out, args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(out) in err[0] and "No space left on device" in err[0], err
    complete = sorted(out.glob("val-*.tar"))
    assert complete and not list(out.glob("*.tmp")) and not (out / "val-index.json").exists()
    from jc2a.data.shards import verify_shard

    for number, path in enumerate(complete):
        assert verify_shard(path, number)  # whole
    monkeypatch.setattr(tarfile.TarFile, "addfile", real)  # space again: a rerun keeps them and finishes
    source = CocoSource(toy_coco / "val2014", toy_coco / "annotations/instances_val2014.json")
    summary = write_shards(source, out, "val", "coco", source.class_names, max_shard_bytes=int(0.2 * 2**20))
    assert summary.shards_kept == len(complete) and summary.records == len(source)


def test_split_must_be_a_plain_name(toy_coco, tmp_path, capsys):
    source = CocoSource(toy_coco / "val2014", toy_coco / "annotations/instances_val2014.json")
    for split in ("../val", "val/x", "", "val-1", "v a l"):
        with pytest.raises(ValueError, match="plain name"):
            write_shards(source, tmp_path / "out", split, "coco", source.class_names, progress=False)
    with pytest.raises(SystemExit) as exc:
        main(["shards", "coco", "--images", str(toy_coco / "val2014"), "--annotations", "x.json", "--split", "../v"])
    assert exc.value.code == 2 and "plain name" in capsys.readouterr().err
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


def test_label_png_is_fast_and_lossless():
    """zlib level 1, no PNG row filter (every row's filter byte is 0), pixels identical."""
    import struct
    import zlib

    from jc2a.data.records import encode_label

    rng = np.random.default_rng(0)
    label = np.zeros((97, 131), np.uint8)
    label[10:60, 20:90] = 7
    label[40:80, 50:120] = 255
    noise = rng.random(label.shape) < 0.05
    label[noise] = rng.integers(0, 256, size=int(noise.sum()))
    for array in (label, rng.integers(0, 256, (33, 17), dtype=np.uint8), np.zeros((1, 1), np.uint8)):
        data = encode_label(array)
        np.testing.assert_array_equal(decode_label(data), array)
        idat, pos = b"", 8
        while pos < len(data):
            (length,) = struct.unpack(">I", data[pos : pos + 4])
            if data[pos + 4 : pos + 8] == b"IDAT":
                idat += data[pos + 8 : pos + 8 + length]
            pos += 12 + length
        assert idat[1] >> 6 == 0  # zlib FLEVEL 0: the fastest compression levels
        raw = zlib.decompress(idat)
        width = array.shape[1] + 1
        assert {raw[row * width] for row in range(array.shape[0])} == {0}  # filter type None on every row


# --------------------------------------------------------------------------- a real full disk (issue 16.4)


class _SmallDisk:
    """A folder on a file system of `size` bytes that runs out: a tmpfs mounted there (root), else None."""

    def __init__(self, folder: Path, size: int) -> None:
        import subprocess

        folder.mkdir(parents=True)
        self.folder, self.mounted = folder, False
        if os.geteuid() == 0 and not os.environ.get("JC2A_TEST_NO_TMPFS"):  # set: the /dev/full path
            done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                                  capture_output=True)  # fmt: skip
            self.mounted = done.returncode == 0

    def grow(self, size: int) -> None:
        import subprocess

        subprocess.run(["mount", "-o", f"remount,size={size}", str(self.folder)], check=True)

    def close(self) -> None:
        import subprocess

        if self.mounted:
            subprocess.run(["umount", "-l", str(self.folder)], check=False)


class _DevFullAfter:
    """Without a tmpfs: the items of a source; building item `n` points the next shard's temporary name at
    /dev/full (every write there fails with ENOSPC, from the kernel), so that shard's first flush fails."""

    def __init__(self, source, n: int, out: Path, shard: int) -> None:
        self.items, self.class_names = list(source), source.class_names
        item, target = self.items[n], out / f"val-{shard:06d}.tar.tmp"
        label = item.label

        def label_then_full():
            if not target.is_symlink():
                target.symlink_to("/dev/full")
            return label()

        self.items[n] = dataclasses.replace(item, label=label_then_full)

    def __iter__(self):
        return iter(self.items)

    def __len__(self):
        return len(self.items)


def test_a_real_full_disk_is_one_line_with_the_space_needed(toy_coco, tmp_path, capsys):
    """ENOSPC from the kernel, not a mock: a tmpfs two shards large (as root; else a shard's temporary file is
    /dev/full). One line naming the file, the error and the bytes that were to be written; no temporary file;
    the complete shards intact; once there is space a rerun keeps them and finishes."""
    images, annotations = toy_coco / "val2014", toy_coco / "annotations/instances_val2014.json"
    source = CocoSource(images, annotations)
    reference = tmp_path / "reference"
    write_shards(source, reference, "val", "coco", source.class_names, max_shard_bytes=int(0.2 * 2**20),
                 progress=False)  # fmt: skip
    sizes = [p.stat().st_size for p in sorted(reference.glob("val-*.tar"))]
    assert len(sizes) >= 4
    page = 4096
    disk = _SmallDisk(tmp_path / "disk", sum(-(-s // page) * page for s in sizes[:2]) + 3 * page)
    try:
        out = disk.folder / "out"
        if disk.mounted:  # the kernel's own ENOSPC when the third shard no longer fits
            code = _shards_cli(images, annotations, out, ("--max-shard-mb", "0.2", "--no-progress"))
        else:  # no tmpfs without root: the third shard's temporary file is /dev/full
            out.mkdir()
            first = len(read_shard_entries(reference / "val-000000.tar", 0))
            dying = _DevFullAfter(source, first + 1, out, 2)
            with pytest.raises(ValueError) as err:
                write_shards(dying, out, "val", "coco", source.class_names, max_shard_bytes=int(0.2 * 2**20),
                             progress=False)  # fmt: skip
            print(f"jc2a shards: error: {err.value}", file=__import__("sys").stderr)
            code = 2
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1, err
        line = err[0]
        tmp = out / "val-000002.tar.tmp"
        assert line.startswith(f"jc2a shards: error: {tmp}: cannot write (No space left on device): "), line
        assert " were to be written, " in line and f" free on {out}; the " in line and "images after it need" in line
        need = re.search(r"device\): (?:[\d.]+ MB \()?(\d+) bytes\)? were to be written", line)
        assert need and int(need.group(1)) > 0, line
        assert not list(out.glob("*.tmp")) and not (out / "val-index.json").exists()
        complete = sorted(out.glob("val-*.tar"))
        assert [p.name for p in complete] == ["val-000000.tar", "val-000001.tar"]
        for path in complete:
            assert path.read_bytes() == (reference / path.name).read_bytes()  # whole, as an uninterrupted run's
        if disk.mounted:
            disk.grow(16 * 2**20)  # space again
        summary = write_shards(source, out, "val", "coco", source.class_names, max_shard_bytes=int(0.2 * 2**20),
                               progress=False)  # fmt: skip
        assert summary.shards_kept == 2 and summary.records == len(source) and not summary.removed
        for path in sorted(reference.glob("val-*.tar")):
            assert (out / path.name).read_bytes() == path.read_bytes()
    finally:
        disk.close()


@pytest.mark.parametrize("value", ["inf", "nan", "0", "-1", "1e400", "2000000", "lots", "0.0001"])
def test_max_shard_mb_out_of_range_is_one_line(toy_coco, tmp_path, capsys, value):
    """`inf` was an OverflowError, `0` and `-1` wrote one record per shard; each is now one line, nothing written."""
    ann = toy_coco / "annotations/instances_val2014.json"
    assert _shards_cli(toy_coco / "val2014", ann, tmp_path / "out", ("--max-shard-mb", value)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"jc2a shards: error: --max-shard-mb {value}: expected a number of MB > 0 and <= 1048576 "
                   "(at least 0.001)"]  # fmt: skip
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("value", ["0", "-5", "178956971", "1e9", "many"])
def test_max_image_pixels_out_of_range_is_one_line(toy_coco, tmp_path, capsys, value):
    ann = toy_coco / "annotations/instances_val2014.json"
    assert _shards_cli(toy_coco / "val2014", ann, tmp_path / "out", ("--max-image-pixels", value)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"jc2a shards: error: --max-image-pixels {value}: expected an integer in [1, 178956970]"]


def test_a_source_that_selects_nothing_or_whose_every_image_is_skipped_is_refused(toy_coco, tmp_path):
    source = CocoSource(toy_coco / "val2014", toy_coco / "annotations/instances_val2014.json")
    with pytest.raises(ValueError, match=r"^val: the source lists no image; nothing to write to "):
        write_shards([], tmp_path / "empty", "val", "coco", source.class_names, progress=False)
    missing = [dataclasses.replace(item, image_path=tmp_path / "nowhere.jpg") for item in list(source)[:5]]
    with pytest.raises(ValueError) as err:
        write_shards(missing, tmp_path / "skipped", "val", "coco", source.class_names, progress=False)
    assert str(err.value).startswith("val: no record written, all 5 images were skipped (first: val2014/")
    assert "image not found" in str(err.value) and not (tmp_path / "skipped/val-index.json").exists()
