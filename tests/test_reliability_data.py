"""Untrusted files stay data: shard members are never unpickled, config YAML never builds Python objects."""

from __future__ import annotations

import io
import json
import os
import pickle
import re
import shutil
import tarfile
import time
from pathlib import Path

import pytest
import webdataset as wds

from jc2a.config import ConfigError, load_config
from jc2a.data.locations import ShardSet
from jc2a.data.records import decode_record
from jc2a.data.shards import read_shard_entries


class _Payload:
    """Unpickling this writes `path`: proof that something unpickled it."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def _member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _poisoned_shard(coco_shards: Path, folder: Path, marker: Path, records: int = 4) -> tuple[Path, list[str]]:
    """val-000000.tar with the first records of a real shard, each followed by `.pyd` and `.pickle` payloads."""
    folder.mkdir(parents=True)
    source = coco_shards / "val-000000.tar"
    entries = read_shard_entries(source, 0)[:records]
    payload = pickle.dumps(_Payload(marker))
    path = folder / "val-000000.tar"
    with open(source, "rb") as f, tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for entry in entries:
            for ext in ("json", "jpg", "png"):
                offset, size = entry["offsets"][ext]
                f.seek(offset)
                _member(tar, f"{entry['key']}.{ext}", f.read(size))
            _member(tar, f"{entry['key']}.pyd", payload)
            _member(tar, f"{entry['key']}.pickle", payload)
    return path, [e["key"] for e in entries]


def _index_for(path: Path, keys: list[str], with_pickles: bool) -> dict:
    """An index of the poisoned shard: offsets of the three record members (and of the payloads, if asked)."""
    records = {k: {"key": k, "shard": 0, "offsets": {}, "classes": {}, "size": [1, 1]} for k in keys}
    with tarfile.open(path) as tar:
        for info in tar:
            key, _, ext = info.name.rpartition(".")
            if ext in ("json", "jpg", "png") or with_pickles:
                records[key]["offsets"][ext] = [info.offset_data, info.size]
    shards = [{"name": path.name, "records": len(keys)}]
    return {"format": "jc2a-shards/2", "dataset": "coco", "split": "val", "classes": {"1": "person"},
            "shards": shards, "records": list(records.values()), "skipped": []}  # fmt: skip


def test_pickled_members_are_never_unpickled(coco_shards, tmp_path):
    marker = tmp_path / "unpickled"
    path, keys = _poisoned_shard(coco_shards, tmp_path / "shards", marker)
    # 1. the streaming path: plain webdataset samples, then decode_record
    samples = list(wds.WebDataset(str(path), shardshuffle=False))
    assert [s["__key__"] for s in samples] == keys and all("pyd" in s and "pickle" in s for s in samples)
    for sample in samples:
        image, label, meta = decode_record(sample)
        assert image.shape[:2] == label.shape and meta["height"] == label.shape[0]
    # 2. random access: ShardSet.read gives only the three record members
    (tmp_path / "shards/val-index.json").write_text(json.dumps(_index_for(path, keys, with_pickles=False)))
    with ShardSet(str(tmp_path / "shards"), "val") as shards:
        for position in range(len(keys)):
            sample = shards.read(position)
            assert set(sample) == {"__key__", "__url__", "json", "jpg", "png"}
            decode_record(sample)
    assert not marker.exists()
    # an index that names the payloads as members is refused before anything is read
    (tmp_path / "shards/val-index.json").write_text(json.dumps(_index_for(path, keys, with_pickles=True)))
    with pytest.raises(ValueError, match=r"record 0 has members \['jpg', 'json', 'pickle', 'png', 'pyd'\]"):
        ShardSet(str(tmp_path / "shards"), "val")
    assert not marker.exists()
    pickle.loads(pickle.dumps(_Payload(marker)))  # the payload is live: unpickling it would have left the marker
    assert marker.exists()


def test_decode_record_refuses_members_that_are_not_bytes(coco_shards):
    """A sample decoded by something else (e.g. webdataset's default decoders) is refused, not trusted."""
    from jc2a.data.records import RecordError

    sample = next(iter(wds.WebDataset(str(coco_shards / "val-000000.tar"), shardshuffle=False)))
    with pytest.raises(RecordError, match="unreadable image"):
        decode_record({**sample, "jpg": object()})
    with pytest.raises(RecordError, match="the json member is not JSON"):
        decode_record({**sample, "json": b"\x80not json"})


@pytest.mark.parametrize(
    "text",
    [
        "data: !!python/object/apply:os.system ['touch {marker}']\n",
        "data:\n  shards: !!python/object/new:os.system ['touch {marker}']\n",
        "!!python/name:os.system\n",
    ],
    ids=["object-apply", "object-new", "name"],
)
def test_config_yaml_never_builds_python_objects(tmp_path, text):
    marker = tmp_path / "ran"
    path = tmp_path / "evil.yaml"
    path.write_text(text.format(marker=marker))
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value).startswith(f"{path}: line ") and "is not valid YAML" in str(err.value)
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(None, [f"data.shards=!!python/object/apply:os.system ['touch {marker}']"])
    assert not marker.exists() and not os.path.exists("ran")


# --------------------------------------------------------------------------- images are bounded (issue 16.6)


def _png(width: int, height: int, level: int = 9) -> bytes:
    """A real greyscale PNG of zeros, `width` x `height`: 30000 x 30000 is 875 KB on disk, 900 MB decoded."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    deflate, row = zlib.compressobj(level), bytes(width + 1)
    idat = b"".join(deflate.compress(row) for _ in range(height)) + deflate.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def bomb(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("bomb") / "bomb.png"
    path.write_bytes(_png(30000, 30000))
    return path


def _decodes(monkeypatch) -> list:
    """Count the calls of cv2.imdecode (they must not reach a bomb)."""
    import cv2

    calls, real = [], cv2.imdecode

    def spy(buf, flags):
        calls.append(len(buf))
        return real(buf, flags)

    monkeypatch.setattr(cv2, "imdecode", spy)
    return calls


def test_predict_refuses_a_pixel_bomb_from_its_header(bomb, tmp_path, capsys, monkeypatch):
    """A 875 KB PNG of 30000 x 30000 pixels as a query, a support or a mask: one line naming the file and the limit,
    in well under a second (before: past 5 minutes), before the model is even loaded (`--checkpoint` is absent)."""
    from jc2a.cli import main

    small = tmp_path / "small.png"
    small.write_bytes(_png(143, 97))
    calls = _decodes(monkeypatch)
    for support, query in ((f"{small}:{small}", bomb), (f"{bomb}:{small}", small), (f"{small}:{bomb}", small)):
        start = time.monotonic()
        code = main(["predict", "--checkpoint", str(tmp_path / "absent"), "--support", support, "--query", str(query)])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1, err
        what = "mask" if support.endswith(str(bomb)) else "image"
        assert err[0] == (
            f"jc2a predict: error: {bomb}: {what} 30000x30000 = 900000000 pixels, more than the limit of 160000000 "
            "(data.max_image_pixels); refused before decoding"
        )
        assert time.monotonic() - start < 2
    assert all(n < 10_000 for n in calls)  # only the small image was ever decoded
    # the limit is one option: lowered on the command line, a 143 x 97 query is refused too
    code = main(["predict", "--checkpoint", str(tmp_path / "absent"), "--support", f"{small}:{small}", "--query",
                 str(small), "data.max_image_pixels=10000"])  # fmt: skip
    assert code == 2 and "143x97 = 13871 pixels, more than the limit of 10000" in capsys.readouterr().err


def _shard_with_label(coco_shards: Path, folder: Path, position: int, png: bytes) -> tuple[Path, str]:
    """A copy of val-000000.tar (as val, one shard) whose record `position` has `png` as its label, and its index."""
    folder.mkdir(parents=True)
    source = coco_shards / "val-000000.tar"
    entries = read_shard_entries(source, 0)
    path = folder / "val-000000.tar"
    with open(source, "rb") as f, tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for i, entry in enumerate(entries):
            for ext in ("json", "jpg", "png"):
                offset, size = entry["offsets"][ext]
                f.seek(offset)
                _member(tar, f"{entry['key']}.{ext}", png if (i, ext) == (position, "png") else f.read(size))
    index = json.loads((coco_shards / "val-index.json").read_text())
    index["shards"] = [{"name": "val-000000.tar", "records": len(entries)}]
    index["records"] = read_shard_entries(path, 0)
    (folder / "val-index.json").write_text(json.dumps(index))
    return path, entries[position]["key"]


def test_a_label_bomb_in_a_shard_is_refused_from_its_header_and_skipped(coco_shards, bomb, tmp_path, caplog,
                                                                        monkeypatch):  # fmt: skip
    """The bank pass decoded a 1.8 GB label bomb before skipping it: now the PNG header is read, the record is
    skipped and counted without a decode, in the bank pass and in the training stream's decoder."""
    from jc2a.data.episodes import BankImages
    from jc2a.data.records import RecordError
    from jc2a.folds import base_classes

    shards_dir = tmp_path / "shards"
    train = ShardSet(str(coco_shards), "val")
    base = base_classes("coco20i", 0)
    position = next(i for i, r in enumerate(train.records) if r["shard"] == 0 and any(
        int(k) in base and n >= 200 for k, n in r["classes"].items()))  # fmt: skip
    _, key = _shard_with_label(coco_shards, shards_dir, position, bomb.read_bytes())
    shards = ShardSet(str(shards_dir), "val")
    bank = BankImages(shards, base, 200, 65)
    item = next(i for i in range(len(bank)) if shards.records[bank.items[bank.positions[i]][0]]["key"] == key)
    calls = _decodes(monkeypatch)
    start = time.monotonic()
    with caplog.at_level("WARNING", logger="jc2a.data"):
        got = bank[item]
    assert got["skipped"] == 1 and got["classes"] == [] and time.monotonic() - start < 1
    assert f"CKMM bank: skipped record {key} of " in caplog.text and "label 30000x30000 = 900000000" in caplog.text
    assert all(n < 10**6 for n in calls), calls  # the JPEG was decoded, never the 875 KB PNG
    with pytest.raises(RecordError, match=r"label 30000x30000 = 900000000 pixels, more than the limit"):
        decode_record(shards.read(shards.records.index(next(r for r in shards.records if r["key"] == key))))
    shards.close()


def test_the_shard_writer_refuses_images_larger_than_the_limit_before_decoding(toy_coco, bomb, tmp_path, monkeypatch):
    """A PASCAL label, a COCO image file, and a COCO entry that declares 100000 x 100000 (its RLE masks would be
    decoded at that size): each skipped and named, nothing of it decoded."""
    from jc2a.data.coco import CocoSource
    from jc2a.data.pascal import PascalSource
    from jc2a.data.shards import write_shards
    from jc2a.data.toy import write_toy_voc

    root = tmp_path / "VOC2012"
    write_toy_voc(root, train_images=6, val_images=5, size=64, seed=3)
    lists = (root / "ImageSets/SegmentationAug/train_aug.txt", root / "ImageSets/Segmentation/val.txt")
    victim = lists[1].read_text().split()[0]
    (root / "SegmentationClassAug" / f"{victim}.png").write_bytes(bomb.read_bytes())
    calls = _decodes(monkeypatch)
    source = PascalSource(root, "val", *lists)
    summary = write_shards(source, tmp_path / "voc", "val", "pascal", source.class_names, progress=False)
    assert summary.records == 4 and len(summary.skipped) == 1
    assert "label 30000x30000 = 900000000 pixels, more than the limit of 160000000" in summary.skipped[0]["reason"]
    coco = tmp_path / "coco"
    shutil.copytree(toy_coco, coco, ignore=shutil.ignore_patterns("train2014"))
    ann = coco / "annotations/instances_val2014.json"
    data = json.loads(ann.read_text())
    (coco / "val2014" / data["images"][0]["file_name"]).write_bytes(bomb.read_bytes())
    data["images"][1].update(height=100_000, width=100_000)
    rle = {"size": [100_000, 100_000], "counts": "0" * 10 + "1"}
    data["annotations"].append({"id": 10**8, "image_id": data["images"][1]["id"], "category_id": 1, "iscrowd": 1,
                                "segmentation": rle, "area": 1, "bbox": [0, 0, 1, 1]})  # fmt: skip
    ann.write_text(json.dumps(data))
    start = time.monotonic()
    source = CocoSource(coco / "val2014", ann)
    summary = write_shards(source, tmp_path / "coco-out", "val", "coco", source.class_names, progress=False,
                           max_shard_bytes=10**7)  # fmt: skip
    reasons = {s["source"]: s["reason"] for s in summary.skipped}
    assert len(reasons) == 2 and time.monotonic() - start < 30
    first, second = (f"val2014/{data['images'][i]['file_name']}" for i in (0, 1))
    assert "image too large: " in reasons[first] and "image 30000x30000 = 900000000 pixels" in reasons[first]
    assert reasons[second] == "image size 100000x100000 is more than 160000000 pixels (data.max_image_pixels)"
    assert all(n < 10**6 for n in calls)


def test_the_pixel_limit_is_one_bounded_option():
    from jc2a.config import ConfigError, load_config
    from jc2a.data.records import MAX_IMAGE_PIXELS

    assert load_config().data.max_image_pixels == MAX_IMAGE_PIXELS == 160_000_000
    for value, words in (("0", "must be in [1, 178956970], got 0"), ("178956971", "must be in [1, 178956970]")):
        with pytest.raises(ConfigError, match=rf"^command line: key 'data.max_image_pixels' {re.escape(words)}"):
            load_config(None, [f"data.max_image_pixels={value}"])


# --------------------------------------------------------------------------- a device that is not here (issue 16.8)


@pytest.mark.parametrize("device,words", [
    ("cuda", "CUDA is not available on this machine"),
    ("cuda:7", "CUDA is not available on this machine"),
    ("tpu9", "not a device name (cpu, cuda, cuda:1, mps)"),
    ("meta", "jc2a predicts on cpu, cuda or mps"),
], ids=["cuda", "cuda-7", "unknown-name", "meta"])  # fmt: skip
def test_predict_on_a_device_that_is_not_here_is_one_line(tmp_path, capsys, monkeypatch, device, words):
    import torch

    from jc2a.cli import main

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # as on a machine without CUDA
    small = tmp_path / "small.png"
    small.write_bytes(_png(30, 20))
    code = main(["predict", "--checkpoint", str(tmp_path / "absent"), "--support", f"{small}:{small}", "--query",
                 str(small), "--device", device])  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith(f"jc2a predict: error: device '{device}': "), err
    assert words in err[0]


def test_predictor_checks_its_device_too(monkeypatch):
    import torch

    from jc2a.errors import UserError
    from jc2a.runs.predict import Predictor

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UserError, match=r"^device 'cuda': CUDA is not available on this machine"):
        Predictor(torch.nn.Identity(), load_config(), device="cuda")


# --------------------------------------------------------------------------- configs refused quickly (issue 16.5)


def test_a_10_mb_yaml_of_5_million_numbers_is_refused_by_jc2a_config_in_a_second(tmp_path):
    """Before the 1 MiB bound it ran past 3 minutes; `python -m jc2a config` now refuses it unparsed."""
    import subprocess
    import sys

    path = tmp_path / "numbers.yaml"
    path.write_text("data:\n  eval_seeds: [" + ", ".join(["1"] * 5_000_000) + "]\n")
    assert path.stat().st_size > 10 * 10**6
    deep = tmp_path / "deep.yaml"
    deep.write_text("data: " + "[" * 50_000 + "]" * 50_000 + "\n")
    for config, words in ((path, f"is {path.stat().st_size} bytes, more than a config file may be (1 MiB)"),
                          (deep, "is nested deeper than 32 levels (line 1)")):  # fmt: skip
        start = time.monotonic()
        done = subprocess.run([sys.executable, "-m", "jc2a", "config", "--config", str(config)], capture_output=True,
                              text=True, timeout=60)  # fmt: skip
        lines = done.stderr.strip().splitlines()
        assert done.returncode == 2 and lines == [f"jc2a config: error: {config}: {words}, more than a config may be"
                                                  if config == deep else f"jc2a config: error: {config}: {words}"]
        assert time.monotonic() - start < 10  # the interpreter's start-up included; the refusal itself is instant


def test_a_record_header_nested_deep_is_skipped_and_counted(coco_shards, tmp_path):
    """A json member nested 100,000 deep was a RecursionError in the stream (a traceback, the run lost): now the
    stream skips and counts it, and `decode_record` refuses it in one line."""
    from jc2a.data.episodes import TrainEpisodes
    from jc2a.data.records import RecordError
    from jc2a.folds import base_classes

    deep = b"[" * 100_000 + b"]" * 100_000
    sample = next(iter(wds.WebDataset(str(coco_shards / "val-000000.tar"), shardshuffle=False)))
    with pytest.raises(RecordError, match=r"the json member is nested too deep to be a record header$"):
        decode_record({**sample, "json": deep})
    folder = tmp_path / "shards"
    folder.mkdir()
    entries = []  # every val record, in one shard; every other one with the deep header
    with tarfile.open(folder / "val-000000.tar", "w", format=tarfile.USTAR_FORMAT) as tar:
        for number, source in enumerate(sorted(coco_shards.glob("val-*.tar"))):
            with open(source, "rb") as f:
                for entry in read_shard_entries(source, number):
                    for ext in ("json", "jpg", "png"):
                        offset, size = entry["offsets"][ext]
                        f.seek(offset)
                        data = f.read(size)
                        _member(tar, f"{entry['key']}.{ext}", deep if (len(entries) % 2, ext) == (0, "json") else data)
                    entries.append(entry)
    index = json.loads((coco_shards / "val-index.json").read_text())
    index["shards"] = [{"name": "val-000000.tar", "records": len(entries)}]
    written = _entries_without_headers(folder / "val-000000.tar")
    index["records"] = [{**e, "classes": r["classes"], "size": r["size"]} for e, r in zip(written, entries)]
    (folder / "val-index.json").write_text(json.dumps(index))
    shards = ShardSet(str(folder), "val")
    from jc2a.data.transforms import train_transform

    transform = train_transform(load_config().data.augment, 65, (0.485, 0.456, 0.406))
    stream = TrainEpisodes(shards, base_classes("coco20i", 0), 1, 1, transform, pool_size=4, shuffle_buffer=1,
                           max_failures=10_000)  # fmt: skip
    deep_keys = {e["key"] for i, e in enumerate(entries) if i % 2 == 0}
    used = []
    for episode in stream:
        used += [episode["query_key"], *episode["support_keys"]]
        if stream.skipped["record"] >= 20:
            break
    assert stream.skipped["record"] >= 20 and used and not deep_keys & set(used)


def _entries_without_headers(path: Path) -> list[dict]:
    """Offsets of each record's members, read from the tar alone (its json members are not parsed)."""
    out: dict[str, dict] = {}
    with tarfile.open(path) as tar:
        for info in tar:
            key, _, ext = info.name.rpartition(".")
            out.setdefault(key, {"key": key, "shard": 0, "offsets": {}})["offsets"][ext] = [info.offset_data,
                                                                                           info.size]  # fmt: skip
    return list(out.values())
