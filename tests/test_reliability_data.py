"""Untrusted files stay data: shard members are never unpickled, config YAML never builds Python objects."""

from __future__ import annotations

import io
import json
import os
import pickle
import tarfile
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
