"""Where shards live: local folders, brace patterns, http(s) URLs and `pipe:` commands, index beside them.

A location is either a folder/URL prefix (`shards/coco`, `http://host/coco`) whose `<split>-index.json`
names the shards, or an explicit shard pattern whose index is read from the same place:
    /data/coco/train-{000000..000031}.tar          -> /data/coco/train-index.json
    http://host/coco/train-{000000..000031}.tar    -> http://host/coco/train-index.json
    pipe:aws s3 cp s3://b/coco/train-{000000..000031}.tar -   -> pipe:aws s3 cp s3://b/coco/train-index.json -
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Optional

import braceexpand
import numpy as np
import webdataset as wds

from jc2a.data.shards import INDEX_FORMAT, index_name

_SHARD = re.compile(r"([A-Za-z0-9_.]+)-(\{[^}]*\}|\d{6})\.tar")
_REMOTE = ("http://", "https://", "pipe:", "gs://", "s3://")


def is_remote(url: str) -> bool:
    return url.startswith(_REMOTE)


def shard_basename(url: str) -> Optional[str]:
    """`train-000003.tar` for any URL, path or pipe command naming that shard."""
    found = re.findall(r"[A-Za-z0-9_.]+-\d{6}\.tar", url)
    return found[-1] if found else None


def _read_url(url: str) -> bytes:
    """All bytes behind a local path, http(s) URL or `pipe:` command (webdataset's gopen)."""
    if not is_remote(url):
        return Path(url).read_bytes()
    with wds.gopen(url, "rb") as stream:
        return stream.read()


def resolve(location: str, split: str) -> tuple[str, list[str]]:
    """(index URL, explicit shard URLs or [] when the index names them) of `split` at `location`."""
    match = _SHARD.search(location)
    if match:
        if match.group(1) != split:
            raise ValueError(f"shard pattern {location!r} is for split {match.group(1)!r}, not {split!r}")
        index = location[: match.start()] + index_name(split) + location[match.end() :]
        return index, list(braceexpand.braceexpand(location))
    sep = "" if location.endswith("/") else "/"
    return f"{location}{sep}{index_name(split)}", []


class ShardSet:
    """One split's index and shard URLs, with random access to records by their index position.

    Args:
        location: folder, URL prefix or shard pattern (see the module docstring).
        split: "train", "val", ...
        cache_dir: where remote shards are copied for random access (evaluation); default
            `$JC2A_CACHE` or `~/.cache/jc2a/shards`.
    """

    def __init__(self, location: str, split: str, cache_dir: Optional[str] = None) -> None:
        self.location, self.split = str(location), split
        self.index_url, explicit = resolve(self.location, split)
        try:
            raw = _read_url(self.index_url)
        except (OSError, ValueError) as exc:
            raise FileNotFoundError(f"shard index not found or unreadable: {self.index_url} ({exc})") from None
        try:
            self.index = json.loads(raw)
        except ValueError:
            raise ValueError(f"{self.index_url}: not a JSON shard index") from None
        if self.index.get("format") != INDEX_FORMAT:
            raise ValueError(f"{self.index_url}: format {self.index.get('format')!r}, expected {INDEX_FORMAT!r}")
        names = [s["name"] for s in self.index["shards"]]
        if explicit:
            by_name = {shard_basename(u): u for u in explicit}
            missing = [n for n in names if n not in by_name]
            if missing:
                raise ValueError(
                    f"{self.location}: pattern does not cover shard {missing[0]} listed in {self.index_url}"
                )
            self.urls = [by_name[n] for n in names]
        else:
            prefix = self.index_url[: -len(index_name(split))]
            self.urls = [prefix + n for n in names]
        self.records: list[dict] = self.index["records"]
        self.class_names = {int(k): v for k, v in self.index["classes"].items()}
        self.cache_dir = Path(cache_dir or os.environ.get("JC2A_CACHE", Path.home() / ".cache/jc2a/shards"))
        self._files: dict[int, object] = {}
        self._pid = os.getpid()
        self._by_class: Optional[dict[int, np.ndarray]] = None

    def __len__(self) -> int:
        return len(self.records)

    def __getstate__(self) -> dict:  # file handles do not cross process boundaries (loader workers)
        state = dict(self.__dict__)
        state["_files"] = {}
        return state

    def usable(self, class_id: int, min_pixels: int) -> np.ndarray:
        """Positions of the records where `class_id` covers at least `min_pixels` pixels, ascending."""
        if self._by_class is None:  # one pass over the index serves every class
            by_class: dict[int, list[tuple[int, int]]] = {}
            for i, r in enumerate(self.records):
                for key, pixels in r["classes"].items():
                    by_class.setdefault(int(key), []).append((i, pixels))
            self._by_class = {c: np.array(v, dtype=np.int64).reshape(-1, 2) for c, v in by_class.items()}
        pairs = self._by_class.get(int(class_id), np.zeros((0, 2), np.int64))
        return pairs[pairs[:, 1] >= min_pixels, 0]

    def local_path(self, shard: int) -> Path:
        """A local file of shard `shard`: the shard itself, or its copy in the cache for a remote one."""
        url = self.urls[shard]
        if not is_remote(url):
            return Path(url)
        digest = hashlib.sha1(self.index_url.encode()).hexdigest()[:16]
        path = self.cache_dir / digest / self.index["shards"][shard]["name"]
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
            with wds.gopen(url, "rb") as src, open(tmp, "wb") as dst:
                shutil.copyfileobj(src, dst)
            os.replace(tmp, path)
        return path

    def read(self, position: int) -> dict:
        """The raw sample of record `position`: `__key__`, `__url__`, `jpg`, `png`, `json` bytes."""
        if self._pid != os.getpid():  # forked: handles of the parent are not ours
            self._files, self._pid = {}, os.getpid()
        record = self.records[position]
        shard = record["shard"]
        if shard not in self._files:
            self._files[shard] = open(self.local_path(shard), "rb")
        f = self._files[shard]
        sample = {"__key__": record["key"], "__url__": self.urls[shard]}
        for ext, (offset, size) in record["offsets"].items():
            f.seek(offset)
            sample[ext] = f.read(size)
        return sample

    def close(self) -> None:
        """Close the shard files opened by `read` in this process (they reopen on the next `read`)."""
        if self._pid == os.getpid():
            for f in self._files.values():
                f.close()
        self._files = {}

    def __enter__(self) -> ShardSet:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        if getattr(self, "_files", None):
            self.close()
