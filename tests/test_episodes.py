"""Episodes: PFENet/HSNet semantics, the seeded eval list, the resampled rank-aware stream, exact resume, bounds."""

from __future__ import annotations

import functools
import http.server
import json
import shutil
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from timm.data import IMAGENET_DEFAULT_MEAN as MEAN

import jc2a.data.episodes as episodes
from jc2a.data.episodes import (
    BankImages,
    StreamError,
    TrainEpisodes,
    eval_episode_list,
    eval_loader,
    label_masks,
    qualifying_images,
    share,
    train_loader,
)
from jc2a.data.locations import ShardSet, resolve
from jc2a.data.transforms import train_transform
from jc2a.folds import base_classes, novel_classes


def _eval_items(cfg, **kw):
    out = []
    for batch in eval_loader(cfg.data, **kw):
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


def _classes(shards, position):
    return {int(k): n for k, n in shards.records[position]["classes"].items()}


# --------------------------------------------------------------------------- evaluation lists


def test_pfenet_eval_list_walks_qualifying_images_in_order(toy_cfg):
    val = ShardSet(toy_cfg.data.shards, "val")
    novel = novel_classes("coco20i", 0)
    qualifying = qualifying_images(val, novel, 200)
    n = len(qualifying)
    eps = eval_episode_list(val, novel, 1, n + 10, seed=0, min_pixels=200)
    queries = [e.query for e in eps]
    walked = [q for q in qualifying if q in set(queries[:n])]
    assert queries[:n] == sorted(queries[:n]) == walked  # index (list) order, each image once per pass
    assert len(set(queries[:n])) == n - (n - len(set(queries[:n])))
    assert queries[n - (n - len(set(queries[:n]))) :][:1] == [queries[0]] or len(set(queries[:n])) == n
    for e in eps:
        present = _classes(val, e.query)
        assert e.class_id in novel and e.class_id in present  # drawn among the novel classes present (any size)
        assert e.query not in e.supports and len(set(e.supports)) == 1
        assert all(_classes(val, s)[e.class_id] >= 200 for s in e.supports)
        assert any(present.get(c, 0) >= 200 for c in novel)  # a qualifying image
    # the class is drawn among the novel classes present, not only the usable ones
    assert any(_classes(val, e.query)[e.class_id] < 200 for e in eps) or all(
        all(n_ >= 200 for c, n_ in _classes(val, q).items() if c in novel) for q in queries
    )


def test_pfenet_eval_list_passes_over_the_list_again():
    shards = _FakeShards(
        [{"1": 5000, "5": 3000}, {"1": 5000, "2": 10}, {"2": 4000}, {"3": 3000, "5": 10}, {"1": 3000, "2": 3000}]
    )
    eps = eval_episode_list(shards, [1, 2, 5], 1, 40, seed=3, min_pixels=2048)
    assert [e.query for e in eps[:9]] == [0, 1, 2, 4, 0, 1, 2, 4, 0]  # image 3 holds no usable fold class
    assert all(e.class_id == 1 for e in eps if e.query == 0)  # class 5 has one usable image: no episode
    assert all(e.class_id == 2 for e in eps if e.query == 2)
    assert {e.class_id for e in eps if e.query == 1} == {1, 2}  # any size: 10 pixels of class 2 can be drawn
    assert {e.class_id for e in eps if e.query == 4} == {1, 2}
    assert all(e.query not in e.supports for e in eps)


class _FakeShards:
    """The index-only part of a ShardSet that episode planning reads."""

    def __init__(self, classes: list[dict]) -> None:
        self.records = [{"key": f"k{i}", "classes": c} for i, c in enumerate(classes)]
        self.index_url, self.split, self.location, self.urls = "fake-index.json", "val", "fake", []

    def usable(self, class_id, min_pixels):
        return np.array([i for i, r in enumerate(self.records) if r["classes"].get(str(class_id), 0) >= min_pixels])


def test_eval_list_depends_on_seed_only_and_shares_queries_across_shots(toy_cfg):
    val = ShardSet(toy_cfg.data.shards, "val")
    classes = novel_classes("coco20i", 0)
    for protocol in ("pfenet", "hsnet"):
        a = eval_episode_list(val, classes, 1, 200, seed=0, min_pixels=200, protocol=protocol)
        assert a == eval_episode_list(val, classes, 1, 200, seed=0, min_pixels=200, protocol=protocol)
        assert a != eval_episode_list(val, classes, 1, 200, seed=1, min_pixels=200, protocol=protocol)
        assert eval_episode_list(val, classes, 1, 50, seed=0, min_pixels=200, protocol=protocol) == a[:50]
        one = eval_episode_list(val, classes, 1, 50, seed=0, min_pixels=20, protocol=protocol)
        five = eval_episode_list(val, classes, 5, 50, seed=0, min_pixels=20, protocol=protocol)
        assert [(e.class_id, e.query) for e in one] == [(e.class_id, e.query) for e in five]  # same queries
        assert all(len(set(e.supports)) == 5 and e.query not in e.supports for e in five)


def test_hsnet_eval_list_is_class_uniform(toy_cfg):
    val = ShardSet(toy_cfg.data.shards, "val")
    classes = novel_classes("coco20i", 0)
    eps = eval_episode_list(val, classes, 1, 600, seed=0, min_pixels=200, protocol="hsnet")
    counts = Counter(e.class_id for e in eps)
    kept = [c for c in classes if len(val.usable(c, 200)) >= 2]
    assert set(counts) == set(kept)
    assert max(counts.values()) < 2.0 * 600 / len(kept)  # uniform over classes, not over images
    for e in eps:
        assert _classes(val, e.query)[e.class_id] >= 200  # hsnet: the query is a usable image of the class


def test_support_draws_have_their_own_seed_streams():
    # SeedSequence([s]) == SeedSequence([s, 0]): mixing the episode number into the entropy made episode 0's
    # support generator the list generator. Spawn keys keep every purpose apart.
    assert (
        np.random.SeedSequence([7]).generate_state(4).tolist()
        == np.random.SeedSequence([7, 0]).generate_state(4).tolist()
    )
    states = {
        tuple(episodes._seeds([7], *key).generate_state(4).tolist())
        for key in [
            (episodes._KEY_CLASS,),
            (episodes._KEY_EPISODE, 0),
            (episodes._KEY_EPISODE, 1),
            (episodes._KEY_SHARDS,),
        ]
    }
    assert len(states) == 4


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


def test_eval_episode_dict_is_uint8(toy_cfg):
    e = _eval_items(toy_cfg)[0]
    s = toy_cfg.data.image_size
    assert e["query_img"].shape == (3, s, s) and e["query_img"].dtype == torch.uint8
    assert e["query_mask"].shape == (s, s) and e["query_mask"].dtype == torch.uint8
    assert e["support_imgs"].shape == (1, 3, s, s) and e["support_imgs"].dtype == torch.uint8
    assert e["support_masks"].shape == (1, s, s) and e["support_masks"].dtype == torch.uint8
    assert set(e["query_mask"].unique().tolist()) <= {0, 1, 255}
    val = ShardSet(toy_cfg.data.shards, "val")
    rec = next(r for r in val.records if r["key"] == e["query_key"])
    assert tuple(e["query_label"].shape) == tuple(rec["size"]) and e["query_label"].dtype == torch.uint8
    assert int((e["query_label"] == 1).sum()) == rec["classes"][str(int(e["class_id"]))]


def test_share_is_a_partition():
    parts = [share(10, r, 3) for r in range(3)]
    assert sorted(sum(parts, [])) == list(range(10))
    with pytest.raises(ValueError):
        share(10, 3, 3)


# --------------------------------------------------------------------------- training stream


def _keys(batch, i):
    return [batch["query_key"][i], *batch["support_keys"][i]]


def test_pfenet_training_one_episode_per_qualifying_image(toy_cfg):
    toy_cfg.data.shot = 2
    train = ShardSet(toy_cfg.data.shards, "train")
    base = set(base_classes("coco20i", toy_cfg.data.fold))
    qualifying = qualifying_images(train, sorted(base), 200)
    loader = train_loader(toy_cfg.data, seed=toy_cfg.train.seed, batch_size=2, mean=MEAN, shards=train, rank=0, world=1)
    assert len(loader) == -(-len(qualifying) // 2)  # an epoch: qualifying images / (world x batch)
    batches = list(loader)
    assert len(batches) == len(loader)
    by_key = {r["key"]: i for i, r in enumerate(train.records)}
    repeated = 0
    for batch in batches:
        assert batch["support_imgs"].shape[1:3] == (2, 3) and batch["query_img"].dtype == torch.uint8
        repeated += len(set(batch["query_key"])) < len(batch["query_key"])
        for i, c in enumerate(batch["class_id"].tolist()):
            keys = _keys(batch, i)
            assert c in base and len(set(keys)) == 3
            assert by_key[keys[0]] in set(qualifying) and c in _classes(train, by_key[keys[0]])
            assert all(_classes(train, by_key[k]).get(c, 0) >= 200 for k in keys[1:])
    assert repeated <= 0.1 * len(batches)  # was: every class of an image back to back (233 of 262 batches)


def test_hsnet_training_epoch_counts_pairs(toy_cfg):
    train = ShardSet(toy_cfg.data.shards, "train")
    base = base_classes("coco20i", toy_cfg.data.fold)
    pairs = sum(len(train.usable(c, 200)) for c in base)
    toy_cfg.data.protocol = "hsnet"
    loader = train_loader(toy_cfg.data, seed=toy_cfg.train.seed, batch_size=2, mean=MEAN, shards=train, rank=0, world=1)
    assert len(loader) == -(-pairs // 2)
    by_key = {r["key"]: i for i, r in enumerate(train.records)}
    for batch in list(loader)[:10]:
        for i, c in enumerate(batch["class_id"].tolist()):
            assert _classes(train, by_key[batch["query_key"][i]])[c] >= 200  # every query is a usable pair


def test_filter_novel_drops_images_with_novel_pixels(toy_cfg):
    train = ShardSet(toy_cfg.data.shards, "train")
    novel = {str(c) for c in novel_classes("coco20i", 0)}
    toy_cfg.data.filter_novel = True
    loader = train_loader(toy_cfg.data, seed=toy_cfg.train.seed, batch_size=2, mean=MEAN, shards=train, rank=0, world=1)
    kept = qualifying_images(train, base_classes("coco20i", 0), 200, novel_classes("coco20i", 0))
    assert len(loader) == -(-len(kept) // 2) < -(-len(qualifying_images(train, base_classes("coco20i", 0), 200)) // 2)
    by_key = {r["key"]: r for r in train.records}
    for batch in loader:
        for i in range(len(batch["query_key"])):
            assert not novel & set(by_key[batch["query_key"][i]]["classes"])


def test_every_worker_of_every_rank_samples_every_shard_evenly(toy_cfg):
    train = ShardSet(toy_cfg.data.shards, "train")
    urls = train.urls[:3]
    counts: Counter = Counter()
    for rank in range(2):
        for role in range(2):
            shards = iter(episodes.ResampledShards(urls, lambda rank=rank, role=role: [rank, 0, rank, role]))
            counts.update(next(shards)["url"] for _ in range(3000))
    assert set(counts) == set(urls)
    assert max(counts.values()) / min(counts.values()) < 1.15  # was 2.3x with 3 shards over 2 workers


def test_the_stream_is_a_webdataset_pipeline(toy_cfg):
    """Resampled shards (webdataset's, seeded as jc2a seeds), webdataset's tar stages and shuffle, and the
    loader's epoch through webdataset's with_epoch; a bare DataConfig is all a loader needs."""
    import webdataset as wds

    from jc2a.config import DataConfig

    data = DataConfig(shards=toy_cfg.data.shards, min_pixels=200, image_size=65, support_pool=8, shuffle_buffer=32)
    data.num_workers = 0
    loader = train_loader(data, seed=5, batch_size=2, mean=MEAN, rank=0, world=1)
    assert isinstance(loader, wds.WebLoader) and isinstance(loader.stream, wds.DataPipeline)
    assert isinstance(loader.stream.pipeline[0], wds.ResampledShards)
    loader.set_epoch(0, start=len(loader) - 3)
    assert loader.nsamples == 3 and len(list(loader)) == 3 and loader.nsamples == len(loader)
    stream = train_loader(data, seed=5, batch_size=2, mean=MEAN, rank=0, world=1).stream
    same = TrainEpisodes(
        ShardSet(data.shards, "train"), base_classes("coco20i", 0), 1, 200, train_transform(data.augment, 65, MEAN),
        seed=5, pool_size=8, shuffle_buffer=32,
    )  # fmt: skip
    for a, b in zip(stream, same):
        assert a["query_key"] == b["query_key"] and torch.equal(a["query_img"], b["query_img"])
        break


def test_rank_and_world_default_to_torch_distributed(toy_cfg, monkeypatch):
    import torch.distributed as dist

    train = ShardSet(toy_cfg.data.shards, "train")
    assert TrainEpisodes(train, base_classes("coco20i", 0), 1, 200, None).rank == 0
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_rank", lambda: 1)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    stream = TrainEpisodes(train, base_classes("coco20i", 0), 1, 200, None)
    assert (stream.rank, stream.world) == (1, 2)
    loader = train_loader(toy_cfg.data, seed=toy_cfg.train.seed, batch_size=2, mean=MEAN, shards=train)
    assert (loader.stream.rank, loader.stream.world) == (1, 2)
    assert len(loader) == -(-len(qualifying_images(train, base_classes("coco20i", 0), 200)) // 4)


def test_training_stream_is_seeded_per_epoch_and_rank(toy_cfg):
    a = next(iter(train_loader(toy_cfg.data, seed=toy_cfg.train.seed, batch_size=2, mean=MEAN, rank=0, world=1)))
    b = next(iter(train_loader(toy_cfg.data, seed=toy_cfg.train.seed, batch_size=2, mean=MEAN, rank=0, world=1)))
    assert a["query_key"] == b["query_key"] and torch.equal(a["query_img"], b["query_img"])
    loader = train_loader(toy_cfg.data, seed=toy_cfg.train.seed, batch_size=2, mean=MEAN, rank=0, world=1)
    loader.set_epoch(1)  # another epoch, another draw
    c = next(iter(loader))
    assert c["query_key"] != a["query_key"] or not torch.equal(c["query_img"], a["query_img"])
    d = next(iter(train_loader(toy_cfg.data, seed=toy_cfg.train.seed, batch_size=2, mean=MEAN, rank=1, world=2)))
    assert d["query_key"] != a["query_key"]  # ranks draw different queries


@pytest.mark.parametrize("workers", [0, 2])
def test_resumed_epoch_continues_exactly(toy_cfg, workers):
    toy_cfg.data.num_workers = workers
    loader = train_loader(toy_cfg.data, seed=toy_cfg.train.seed, batch_size=2, mean=MEAN, rank=0, world=1)
    loader.set_epoch(3)
    full = list(loader)
    for start in (1, 5):
        resumed = train_loader(toy_cfg.data, seed=toy_cfg.train.seed, batch_size=2, mean=MEAN, rank=0, world=1)
        resumed.set_epoch(3, start=start)
        tail = list(resumed)
        assert len(tail) == len(full) - start
        for a, b in zip(full[start:], tail, strict=True):
            assert a["query_key"] == b["query_key"] and a["support_keys"] == b["support_keys"]
            assert torch.equal(a["query_img"], b["query_img"]) and torch.equal(a["support_masks"], b["support_masks"])
    loader.set_epoch(4)
    assert len(list(loader)) == len(full)  # the next epoch is whole again


# --------------------------------------------------------------------------- every stream ends


def test_unreadable_shards_end_the_stream_with_one_error(toy_cfg, coco_shards, tmp_path):
    shutil.copytree(coco_shards, tmp_path / "shards")
    for tar in (tmp_path / "shards").glob("train-*.tar"):
        tar.write_bytes(b"not a tar at all")
    train = ShardSet(str(tmp_path / "shards"), "train")
    stream = TrainEpisodes(train, base_classes("coco20i", 0), 1, 200, None, max_failures=5)
    start = time.monotonic()
    with pytest.raises(StreamError, match=r"split 'train' at .*shards: 5 consecutive unreadable shards"):
        next(iter(stream))
    assert time.monotonic() - start < 30


def test_no_episode_possible_is_refused_at_once(toy_cfg):
    train = ShardSet(toy_cfg.data.shards, "train")
    with pytest.raises(StreamError, match="no episode can be formed: no class of .* has 1001 images"):
        TrainEpisodes(train, base_classes("coco20i", 0), 1000, 200, None, pool_size=1000)


def test_a_stream_without_episodes_times_out(toy_cfg):
    train = ShardSet(toy_cfg.data.shards, "train")
    every = list(range(1, 81))
    stream = TrainEpisodes(train, base_classes("coco20i", 0), 1, 200, None, exclude=every, timeout=1.0)
    start = time.monotonic()
    with pytest.raises(StreamError, match=r"no episode for 1 s \(data.stream_timeout\)"):
        next(iter(stream))
    assert time.monotonic() - start < 30


def test_a_stalled_shard_server_ends_the_stream(coco_shards, tmp_path, monkeypatch):
    """The index is served, every shard request hangs: the remote timeout and the failure bound end the stream."""
    monkeypatch.setenv("JC2A_CACHE", str(tmp_path / "cache"))
    index = (coco_shards / "train-index.json").read_bytes()

    class Stall(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path.endswith("train-index.json"):
                self.send_response(200)
                self.send_header("Content-Length", str(len(index)))
                self.end_headers()
                self.wfile.write(index)
            else:
                time.sleep(30)  # accept, never answer

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Stall)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        train = ShardSet(url, "train", timeout=0.5, retries=0)
        stream = TrainEpisodes(train, base_classes("coco20i", 0), 1, 200, None, max_failures=3)
        start = time.monotonic()
        with pytest.raises(StreamError, match=r"split 'train' at http://127.0.0.1:\d+: 3 consecutive unreadable"):
            next(iter(stream))
        assert time.monotonic() - start < 20
    finally:
        server.shutdown()
        server.server_close()


def test_a_slow_consumer_is_not_a_stalled_stream(toy_cfg):
    """The bound counts the stream's own time: a training step slower than data.stream_timeout is no failure."""
    train = ShardSet(toy_cfg.data.shards, "train")
    transform = train_transform(toy_cfg.data.augment, 65, MEAN)
    stream = iter(TrainEpisodes(train, base_classes("coco20i", 0), 1, 200, transform, timeout=1.0, shuffle_buffer=8))
    for _ in range(3):
        next(stream)
        time.sleep(1.5)  # the consumer is busy longer than the timeout
    assert next(stream)["query_img"].dtype == torch.uint8


def test_stream_error_crosses_loader_workers(toy_cfg, coco_shards, tmp_path):
    shutil.copytree(coco_shards, tmp_path / "shards")
    for tar in (tmp_path / "shards").glob("train-*.tar"):
        tar.unlink()
    toy_cfg.data.shards, toy_cfg.data.num_workers, toy_cfg.data.stream_failures = str(tmp_path / "shards"), 2, 3
    with pytest.raises(StreamError, match="3 consecutive unreadable shards"):
        next(iter(train_loader(toy_cfg.data, seed=toy_cfg.train.seed, batch_size=2, mean=MEAN, rank=0, world=1)))


# --------------------------------------------------------------------------- the bank pass


def test_bank_images_cover_every_usable_instance_once(toy_cfg):
    train = ShardSet(toy_cfg.data.shards, "train")
    base = base_classes("coco20i", 0)
    parts = [BankImages(train, base, 200, 129, rank=r, world=2) for r in range(2)]
    seen = Counter()
    for part in parts:
        for i in range(len(part)):
            item = part[i]
            assert item["image"].dtype == torch.uint8 and item["label"].shape == (129, 129)
            for c in item["classes"]:
                seen[item["key"], c] += 1
    expected = {(train.records[p]["key"], c) for c in base for p in train.usable(c, 200).tolist()}
    assert set(seen) == expected and set(seen.values()) == {1}
    assert parts[0].instances() == len(expected)


def test_label_masks():
    label = torch.tensor([[0, 3, 5], [255, 3, 0]], dtype=torch.uint8)
    masks = label_masks(label, [3, 5])
    assert masks.tolist() == [[[0, 1, 0], [255, 1, 0]], [[0, 0, 1], [255, 0, 0]]]


# --------------------------------------------------------------------------- records and locations


def _corrupt_copy(src: Path, dst: Path, min_pixels: int) -> str:
    """Copy the shards; the first record of shard 0 with a usable base-class pair gets its JPEG bytes zeroed in
    place (the shard keeps its size: damage inside a member, as a bad disk or a bad upload leaves it)."""
    shutil.copytree(src, dst)
    base = {str(c) for c in base_classes("coco20i", 0)}
    index = json.loads((dst / "train-index.json").read_text())
    bad = next(
        r for r in index["records"]
        if r["shard"] == 0 and any(k in base and n >= min_pixels for k, n in r["classes"].items())
    )  # fmt: skip
    offset, size = bad["offsets"]["jpg"]
    with open(dst / "train-000000.tar", "r+b") as f:
        f.seek(offset)
        f.write(bytes(size))
    return bad["key"]


def test_corrupt_jpeg_is_skipped_and_counted(toy_cfg, coco_shards, tmp_path, caplog):
    bad_key = _corrupt_copy(coco_shards, tmp_path / "shards", 200)
    train = ShardSet(str(tmp_path / "shards"), "train")
    train.urls = train.urls[:1]  # stream the corrupted shard only
    stream = TrainEpisodes(
        train,
        base_classes("coco20i", 0),
        1,
        200,
        train_transform(toy_cfg.data.augment, 65, MEAN),
        pool_size=4,
        shuffle_buffer=1,
        max_failures=1000,
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
    loader = train_loader(toy_cfg.data, seed=toy_cfg.train.seed, batch_size=2, mean=MEAN, rank=0, world=1)
    keys = []
    for epoch in range(4):  # shards are resampled: the broken one comes up sooner or later
        loader.set_epoch(epoch)
        keys += [k for batch in loader for k in batch["query_key"] + sum(batch["support_keys"], [])]
        if loader.skipped_records:
            break
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
    batch = next(iter(train_loader(toy_cfg.data, seed=toy_cfg.train.seed, batch_size=2, mean=MEAN, shards=train)))
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


def test_shard_set_closes_its_files(coco_shards):
    with ShardSet(str(coco_shards), "val") as val:
        sample = val.read(3)
        handle = next(iter(val._files.values()))
        assert sample["__key__"] == val.records[3]["key"] and not handle.closed
    assert handle.closed and not val._files
    assert val.read(3)["jpg"] == sample["jpg"]  # reopens on demand
    val.close()


# --------------------------------------------------------------------------- the stream's own bound holds (issue 16.7)


@pytest.fixture()
def stalling_server(coco_shards):
    """A raw socket server on 127.0.0.1: it answers the training index, and accepts every other request and never
    answers it (the connection is held open)."""
    import socket

    index = (coco_shards / "train-index.json").read_bytes()
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(64)
    server.settimeout(0.05)
    held, stop = [], threading.Event()

    def answer(conn):
        request = b""
        while b"\r\n\r\n" not in request:
            chunk = conn.recv(4096)
            if not chunk:
                return
            request += chunk
        if b"train-index.json" in request.split(b"\r\n", 1)[0]:
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(index) + index)
        held.append(conn)  # a shard: never answered

    def serve():
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except OSError:
                continue
            threading.Thread(target=answer, args=(conn,), daemon=True).start()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.getsockname()[1]}"
    stop.set()
    thread.join()
    for conn in held:
        conn.close()
    server.close()


@pytest.mark.parametrize("kind", ["http", "pipe"])
def test_a_stall_inside_the_retries_ends_at_the_stream_timeout(coco_shards, stalling_server, tmp_path, monkeypatch,
                                                               kind):  # fmt: skip
    """Each shard read stalls for its whole remote timeout (1.5 s), is retried 3 times with back-off (0.5, 1, 2 s):
    9.5 s a shard, and 1000 failures allowed. `data.stream_timeout` (2 s) ends the stream at about 2 s: the
    fetch's tries and waits stop at the stream's deadline (before: 20 shards x retries, 364 s in the report)."""
    monkeypatch.setenv("JC2A_CACHE", str(tmp_path / "cache"))
    if kind == "http":
        train = ShardSet(stalling_server, "train", timeout=1.5, retries=3)
    else:  # the index is read, every shard's command stalls
        command = f"case {{shard}} in *index*) cat {coco_shards}/{{shard}};; *) sleep 30;; esac"
        train = ShardSet(f"pipe:{command}", "train", timeout=1.5, retries=3)
    stream = TrainEpisodes(train, base_classes("coco20i", 0), 1, 200, None, timeout=2.0, max_failures=1000)
    start = time.monotonic()
    with pytest.raises(StreamError) as err:
        next(iter(stream))
    elapsed = time.monotonic() - start
    msg = str(err.value)
    assert msg.startswith(f"split 'train' at {train.location}: no episode for 2 s (data.stream_timeout); last "), msg
    assert "stopped at the stream's deadline" in msg or "no complete answer within" in msg, msg
    # the bound plus what one try needs to notice its deadline and the stream to look at its clock: a second and
    # a half is generous on a shared 2-core machine (a try ends at the deadline itself, to a few milliseconds)
    assert 2.0 <= elapsed < 3.5, elapsed


def test_a_stuck_loader_worker_ends_the_stream(toy_cfg, monkeypatch):
    """A worker stuck where the stream cannot look at its clock (here: opening a shard sleeps, as a hung file
    system would) is ended by the loader's own timeout: batch_size x data.stream_timeout + a margin."""
    import jc2a.data.locations as locations

    def stuck(self, shard, deadline=None):
        time.sleep(120)

    monkeypatch.setattr(locations.ShardSet, "local_path", stuck)  # inherited by the forked workers
    monkeypatch.setattr(episodes, "LOADER_MARGIN", 1.0)
    toy_cfg.data.num_workers, toy_cfg.data.stream_timeout = 1, 1.0
    loader = train_loader(toy_cfg.data, seed=0, batch_size=1, mean=MEAN, rank=0, world=1)
    start = time.monotonic()
    with pytest.raises(StreamError, match=r"no batch from a loader worker for 2 s \(1 episodes x data.stream_timeout"):
        next(iter(loader))
    assert time.monotonic() - start < 20  # 2 s, and a worker's start-up
