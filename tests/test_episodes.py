"""Episodes: the seeded eval list (independent of workers and ranks), the training stream, shard locations."""

from __future__ import annotations

import functools
import http.server
import io
import json
import shutil
import tarfile
import threading
from pathlib import Path

import pytest
import torch

from jc2a.data.episodes import TrainEpisodes, eval_episode_list, eval_loader, share, train_loader, usable_pairs
from jc2a.folds import base_classes, novel_classes
from jc2a.data.locations import ShardSet, resolve
from jc2a.data.transforms import train_transform


def _eval_items(cfg, **kw):
    out = []
    for batch in eval_loader(cfg, **kw):
        for i in range(len(batch["episode"])):
            item = {k: (v[i] if not isinstance(v, torch.Tensor) else v[i].clone()) for k, v in batch.items()}
            item["episode"], item["class_id"] = int(item["episode"]), int(item["class_id"])
            out.append(item)
    return out


def _same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], torch.Tensor):
            assert torch.equal(a[k], b[k]), k
        else:
            assert a[k] == b[k], k


def test_eval_list_depends_on_seed_only(toy_cfg):
    val = ShardSet(toy_cfg.data.shards, "val")
    classes = novel_classes("coco20i", 0)
    a = eval_episode_list(val, classes, 1, 200, seed=0, min_pixels=200)
    assert a == eval_episode_list(val, classes, 1, 200, seed=0, min_pixels=200)
    assert a != eval_episode_list(val, classes, 1, 200, seed=1, min_pixels=200)
    used = {e.class_id for e in a}
    assert used <= set(classes) and len(used) > 5
    for e in a:
        assert e.query not in e.supports and len(set(e.supports)) == 1
        for p in (e.query, *e.supports):
            assert val.records[p]["classes"][str(e.class_id)] >= 200
    five = eval_episode_list(val, classes, 5, 50, seed=0, min_pixels=200)
    assert all(len(set(e.supports)) == 5 and e.query not in e.supports for e in five)
    assert eval_episode_list(val, classes, 1, 50, seed=0, min_pixels=200) == a[:50]  # a prefix of the longer list
    one = eval_episode_list(val, classes, 1, 50, seed=0, min_pixels=20)  # every class usable for both shots
    five = eval_episode_list(val, classes, 5, 50, seed=0, min_pixels=20)
    assert [(e.class_id, e.query) for e in one] == [(e.class_id, e.query) for e in five]  # same queries


def test_eval_loader_same_for_0_and_2_workers_and_2_ranks(toy_cfg):
    toy_cfg.data.eval_episodes = 12
    zero = _eval_items(toy_cfg, batch_size=2)
    toy_cfg.data.num_workers = 2
    two = _eval_items(toy_cfg, batch_size=3)
    assert [e["episode"] for e in zero] == list(range(12))
    for a, b in zip(zero, two, strict=True):
        _same(a, b)
    toy_cfg.data.num_workers = 0
    ranks = [_eval_items(toy_cfg, rank=r, world=2) for r in range(2)]
    positions = [{e["episode"] for e in items} for items in ranks]
    assert not positions[0] & positions[1] and positions[0] | positions[1] == set(range(12))
    for items in ranks:
        for e in items:
            _same(e, zero[e["episode"]])


def test_eval_episode_dict(toy_cfg):
    e = _eval_items(toy_cfg)[0]
    s = toy_cfg.data.image_size
    assert e["query_img"].shape == (3, s, s) and e["query_mask"].shape == (s, s)
    assert e["support_imgs"].shape == (1, 3, s, s) and e["support_masks"].shape == (1, s, s)
    assert set(e["query_mask"].unique().tolist()) <= {0, 1, 255}
    val = ShardSet(toy_cfg.data.shards, "val")
    rec = next(r for r in val.records if r["key"] == e["query_key"])
    assert tuple(e["query_label"].shape) == tuple(rec["size"])  # original size, for scoring
    assert int((e["query_label"] == 1).sum()) == rec["classes"][str(int(e["class_id"]))]


def test_share_is_a_partition():
    parts = [share(10, r, 3) for r in range(3)]
    assert sorted(sum(parts, [])) == list(range(10))
    with pytest.raises(ValueError):
        share(10, 3, 3)


def test_training_episodes_respect_class_distinctness_and_min_pixels(toy_cfg):
    toy_cfg.data.shot = 2
    train = ShardSet(toy_cfg.data.shards, "train")
    by_key = {r["key"]: r for r in train.records}
    base = set(base_classes("coco20i", toy_cfg.data.fold))
    loader = train_loader(toy_cfg, batch_size=2, shards=train)
    expected_batches = -(-usable_pairs(train, sorted(base), 200) // 2)
    batches = list(loader)
    assert len(batches) == expected_batches  # with_epoch: one episode per usable pair
    seen = 0
    for batch in batches:
        assert batch["support_imgs"].shape[1:3] == (2, 3)
        for i, c in enumerate(batch["class_id"].tolist()):
            keys = [batch["query_key"][i], *batch["support_keys"][i]]
            assert c in base and len(set(keys)) == 3
            assert all(by_key[k]["classes"][str(c)] >= 200 for k in keys)
            seen += 1
    assert seen >= expected_batches * 2 - 1


def test_training_stream_is_seeded(toy_cfg):
    a = next(iter(train_loader(toy_cfg, batch_size=2)))
    b = next(iter(train_loader(toy_cfg, batch_size=2)))
    assert a["query_key"] == b["query_key"] and torch.equal(a["query_img"], b["query_img"])
    loader = train_loader(toy_cfg, batch_size=2)
    loader.set_epoch(1)  # another epoch, another draw
    c = next(iter(loader))
    assert c["query_key"] != a["query_key"] or not torch.equal(c["query_img"], a["query_img"])


def test_shards_split_by_node_and_worker(toy_cfg):
    train = ShardSet(toy_cfg.data.shards, "train")
    assert len(train.urls) >= 2
    parts = [TrainEpisodes(train, [1], 1, 1, None, rank=r, world=2).shard_urls() for r in range(2)]
    assert not set(parts[0]) & set(parts[1]) and set(parts[0]) | set(parts[1]) == set(train.urls)


def _corrupt_copy(src: Path, dst: Path, min_pixels: int) -> str:
    """Copy the shards; the first record of shard 0 with a usable base-class pair gets a broken JPEG."""
    shutil.copytree(src, dst)
    base = {str(c) for c in base_classes("coco20i", 0)}
    index = json.loads((dst / "train-index.json").read_text())
    bad_key = next(
        r["key"] for r in index["records"]
        if r["shard"] == 0 and any(k in base and n >= min_pixels for k, n in r["classes"].items())
    )  # fmt: skip
    shard = dst / "train-000000.tar"
    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(shard, "w", format=tarfile.USTAR_FORMAT) as tar:
        for m, data in members:
            if m.name == f"{bad_key}.jpg":
                data = b"\xff\xd8\xff\xe0 truncated garbage"
            m.size = len(data)
            tar.addfile(m, io.BytesIO(data))
    return bad_key


def test_corrupt_jpeg_is_skipped_and_counted(toy_cfg, coco_shards, tmp_path, caplog):
    bad_key = _corrupt_copy(coco_shards, tmp_path / "shards", 200)
    train = ShardSet(str(tmp_path / "shards"), "train")
    train.urls = train.urls[:1]  # stream the corrupted shard only
    mean_std = ((0.5,) * 3, (0.25,) * 3)
    stream = TrainEpisodes(
        train,
        base_classes("coco20i", 0),
        1,
        200,
        train_transform(toy_cfg.data.augment, 65, *mean_std),
        pool_size=4,
        shuffle_buffer=1,
    )
    episodes = []
    for ep in stream:
        episodes.append(ep)
        if stream.skipped["record"] >= 2:
            break
    assert stream.skipped["record"] >= 2  # the shard was read at least twice, the record skipped each time
    assert all(bad_key not in (e["query_key"], *e["support_keys"]) for e in episodes)
    assert bad_key in caplog.text


def test_skips_in_loader_workers_reach_the_main_process(toy_cfg, coco_shards, tmp_path):
    bad_key = _corrupt_copy(coco_shards, tmp_path / "shards", 200)
    toy_cfg.data.shards, toy_cfg.data.num_workers = str(tmp_path / "shards"), 2
    loader = train_loader(toy_cfg, batch_size=2)
    keys = [k for batch in loader for k in batch["query_key"] + sum(batch["support_keys"], [])]
    assert loader.skipped_records >= 1 and bad_key not in keys


@pytest.fixture()
def http_shards(coco_shards):
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(coco_shards))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_streams_from_http(toy_cfg, http_shards, coco_shards, tmp_path, monkeypatch):
    monkeypatch.setenv("JC2A_CACHE", str(tmp_path / "cache"))
    n = json.loads((coco_shards / "train-index.json").read_text())["shards"]
    pattern = f"{http_shards}/train-{{000000..{len(n) - 1:06d}}}.tar"
    train = ShardSet(pattern, "train")
    assert train.index_url == f"{http_shards}/train-index.json" and train.urls[0].startswith("http://127.0.0.1")
    batch = next(iter(train_loader(toy_cfg, batch_size=2, shards=train)))
    assert batch["query_img"].shape[0] == 2
    toy_cfg.data.shards = http_shards  # prefix form: the index names the shards
    toy_cfg.data.eval_episodes = 4
    remote = _eval_items(toy_cfg)
    local_cfg = toy_cfg
    local_cfg.data.shards = str(coco_shards)
    for a, b in zip(remote, _eval_items(local_cfg), strict=True):
        _same(a, b)
    assert list((tmp_path / "cache").rglob("val-*.tar"))


def test_pipe_and_brace_locations(coco_shards):
    assert resolve("pipe:aws s3 cp s3://b/coco/train-{000000..000031}.tar -", "train") == (
        "pipe:aws s3 cp s3://b/coco/train-index.json -",
        [f"pipe:aws s3 cp s3://b/coco/train-{i:06d}.tar -" for i in range(32)],
    )
    n = len(json.loads((coco_shards / "val-index.json").read_text())["shards"])
    shards = ShardSet(f"pipe:cat {coco_shards}/val-{{000000..{n - 1:06d}}}.tar", "val")
    assert shards.urls[0] == f"pipe:cat {coco_shards}/val-000000.tar" and len(shards) == 240
    with pytest.raises(ValueError, match="split 'val', not 'train'"):
        ShardSet(f"{coco_shards}/val-{{000000..000001}}.tar", "train")
    with pytest.raises(FileNotFoundError, match="nowhere/train-index.json"):
        ShardSet("/nowhere", "train")


def test_shards_split_by_node_then_worker(toy_cfg, monkeypatch):
    import types

    import jc2a.data.episodes as episodes

    train = ShardSet(toy_cfg.data.shards, "train")
    train.urls = [f"train-{i:06d}.tar" for i in range(9)]
    parts = {}
    for rank in range(2):
        for worker in range(2):
            info = types.SimpleNamespace(num_workers=2, id=worker)
            monkeypatch.setattr(episodes, "get_worker_info", lambda info=info: info)
            parts[rank, worker] = TrainEpisodes(train, [1], 1, 1, None, rank=rank, world=2).shard_urls()
    assert sorted(sum(parts.values(), [])) == train.urls  # every shard in exactly one (rank, worker) slot
    assert parts[0, 0] == train.urls[0::4] and parts[1, 1] == train.urls[3::4]
    train.urls = train.urls[:3]  # fewer shards than slots: every slot resamples them all
    assert TrainEpisodes(train, [1], 1, 1, None, rank=1, world=2).shard_urls() == train.urls


def test_shard_set_closes_its_files(coco_shards):
    with ShardSet(str(coco_shards), "val") as val:
        sample = val.read(3)
        handle = next(iter(val._files.values()))
        assert sample["__key__"] == val.records[3]["key"] and not handle.closed
    assert handle.closed and not val._files
    assert val.read(3)["jpg"] == sample["jpg"]  # reopens on demand
    val.close()
