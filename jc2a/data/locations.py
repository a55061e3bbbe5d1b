"""Where shards live (folders, brace patterns, http(s)/s3/gs URLs, `pipe:` commands) and how their index is trusted.

A location is a folder/URL prefix whose `<split>-index.json` names the shards, an explicit shard pattern whose
index is read from the same place, or a `pipe:` command with `{shard}` where a file name goes:
    shards/coco, http://host/coco                   -> <location>/train-index.json, then the names it lists
    /data/coco/train-{000000..000031}.tar          -> /data/coco/train-index.json
    http://host/coco/train-{000000..000031}.tar    -> http://host/coco/train-index.json
    pipe:aws s3 cp s3://b/coco/train-{000000..000031}.tar -   -> pipe:aws s3 cp s3://b/coco/train-index.json -
    pipe:aws s3 cp s3://b/coco/{shard} -            -> pipe:aws s3 cp s3://b/coco/train-index.json -, then one
                                                       command per listed shard, the name shlex-quoted
    s3://b/coco, gs://b/coco                        -> as http(s): read through fsspec (with s3fs, gcsfs)

Trust: the location is the user's own when the user gave it: on the command line or in code. A `pipe:` location
runs a shell command, and config files travel between people, so one read from a config file runs only when
`data.allow_pipe=true` was given on the command line (`open_shards` decides; `ShardSet(..., allow_pipe=False)`
refuses it), and the first run of each command is logged at INFO (`running pipe command: ...`). An index is
data: every shard name must be `<split>-NNNNNN.tar` and every record must point into a listed shard, inside it
(format 2: within the shard's bytes), or the index is refused; it is at most MAX_INDEX_BYTES and a JSON nested
too deep is refused in one line; a record is read only after the tar header before each member confirms its
name and size. No string of an index ever reaches a shell except as a quoted `{shard}` argument, and cached
copies of remote shards are named only by validated names inside the cache folder.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import logging
import math
import os
import re
import reprlib
import selectors
import shlex
import shutil
import signal
import subprocess
import tarfile
import time
import urllib.parse
from collections import Counter
from pathlib import Path
from typing import BinaryIO, Optional

import braceexpand
import numpy as np

from jc2a.atomic import replacing
from jc2a.data.shards import MEMBERS, READABLE_FORMATS, check_split, index_name, read_complete_shard, shard_pattern
from jc2a.errors import MissingPackage, RecordError, RemoteError, UserError, WriteError

log = logging.getLogger("jc2a.data")

_SHARD = re.compile(r"([A-Za-z0-9_]+)-(\{[^}]*\}|\d{6})\.tar")
_REMOTE = ("http://", "https://", "pipe:", "gs://", "s3://")
SHARD_SLOT = "{shard}"  # where a file name goes in a location (a `pipe:` command above all)
# An index stores the writer's dataset name; configs name the benchmark built from it.
DATASETS = {"coco": "coco20i", "pascal": "pascal5i", "coco20i": "coco20i", "pascal5i": "pascal5i"}
_PACKAGES = {"s3": "s3fs", "gs": "gcsfs", "http": "aiohttp", "https": "aiohttp"}  # fsspec's, per protocol
BACKOFF = 0.5  # seconds before the first retry of a remote read; doubled for each further retry
CACHE_MAX_GB = 50.0  # default bound on the cache of remote shards (`JC2A_CACHE_MAX_GB`)
MAX_INDEX_BYTES = 512 * 2**20  # an index at most this large (COCO's train index: about 25 MB)
MAX_MEMBER_BYTES = 2**30  # a record member at most this large (a label or image within the pixel limit is far less)
_MEMBER_SET = frozenset(MEMBERS)
_IN_USE: Counter = Counter()  # cached shard files open in this process: never evicted
_RAN: set[str] = set()  # pipe commands this process has logged
_SHOW = reprlib.Repr()
_SHOW.maxlevel, _SHOW.maxlist, _SHOW.maxdict, _SHOW.maxstring, _SHOW.maxother = 2, 8, 4, 80, 80


def _show(value: object) -> str:
    """A short repr of a value from an index (it may be nested deep or huge)."""
    return _SHOW.repr(value)[:200]


def is_remote(url: str) -> bool:
    return url.startswith(_REMOTE)


def shard_basename(url: str) -> Optional[str]:
    """`train-000003.tar` for any URL, path or pipe command naming that shard."""
    found = re.findall(r"[A-Za-z0-9_]+-\d{6}\.tar", url)
    return found[-1] if found else None


def _fill(location: str, name: str) -> str:
    """`location` with its `{shard}` slot replaced by `name`: a shlex-quoted argument in a `pipe:` command."""
    if location.startswith("pipe:"):
        return location.replace(SHARD_SLOT, shlex.quote(name))
    if location.startswith(("http://", "https://")):
        return location.replace(SHARD_SLOT, urllib.parse.quote(name))
    return location.replace(SHARD_SLOT, name)


def resolve(location: str, split: str) -> tuple[str, list[str]]:
    """(index URL, explicit shard URLs or [] when the index names them) of `split` at `location`."""
    check_split(split)
    if SHARD_SLOT in location:
        return _fill(location, index_name(split)), []
    match = _SHARD.search(location)
    if match:
        if match.group(1) != split:
            raise UserError(f"shard pattern {location!r} is for split {match.group(1)!r}, not {split!r}")
        index = location[: match.start()] + index_name(split) + location[match.end() :]
        return index, list(braceexpand.braceexpand(location))
    if location.startswith("pipe:"):
        raise UserError(
            f"{location!r}: a pipe: location needs {SHARD_SLOT} where the file name goes "
            f"(pipe:aws s3 cp s3://bucket/coco/{SHARD_SLOT} -) or an explicit shard pattern"
        )
    sep = "" if location.endswith("/") else "/"
    return f"{location}{sep}{index_name(split)}", []


# --------------------------------------------------------------------------- remote reads


class _Permanent(OSError):
    """A failure that a retry would not change (an HTTP 404, say)."""


class NoSpace(OSError):
    """The local side of a fetch ran out of space (ENOSPC, EDQUOT) while writing: a retry would not help."""


def _too_large(limit: int) -> _Permanent:
    return _Permanent(f"more than {limit} bytes, the most this file may be")


def _run(url: str, dst: BinaryIO, timeout: float, limit: Optional[int] = None) -> None:
    """One try of a `pipe:` location: the user's command, as written, in a shell, its stdout into `dst`, killed
    (with its children) at `timeout` or once it has written more than `limit` bytes. Its first run in this process
    is logged at INFO."""
    command = url[len("pipe:") :]
    if command not in _RAN:
        _RAN.add(command)
        log.info("running pipe command: %s", command)
    proc = subprocess.Popen(
        command,
        shell=True,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    end, total, err = time.monotonic() + timeout, 0, bytearray()
    selector = selectors.DefaultSelector()
    try:
        selector.register(proc.stdout, selectors.EVENT_READ)
        selector.register(proc.stderr, selectors.EVENT_READ)
        while selector.get_map():
            left = end - time.monotonic()
            if left <= 0:
                raise TimeoutError
            for key, _ in selector.select(left):
                block = os.read(key.fd, 1 << 20)
                if not block:
                    selector.unregister(key.fileobj)
                elif key.fileobj is proc.stdout:
                    total += len(block)
                    if limit is not None and total > limit:
                        raise _too_large(limit)
                    dst.write(block)
                else:
                    err += block
                    del err[:-65536]
        proc.wait(timeout=max(0.0, end - time.monotonic()))
    except (Exception, KeyboardInterrupt) as exc:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
        if isinstance(exc, (TimeoutError, subprocess.TimeoutExpired)):
            raise TimeoutError(f"no complete answer within {timeout:g} s") from None
        raise
    finally:
        selector.close()
        proc.stdout.close()
        proc.stderr.close()
    if proc.returncode != 0:
        lines = [line for line in err.decode(errors="replace").splitlines() if line.strip()]
        raise OSError(f"command exited with status {proc.returncode}" + (f": {lines[-1][:200]}" if lines else ""))


def _filesystem(url: str) -> tuple[object, str]:
    """(fsspec filesystem, path) of an http(s), `s3://` or `gs://` URL; MissingPackage when fsspec cannot reach
    its protocol here (s3fs, gcsfs or aiohttp not installed)."""
    import fsspec

    try:
        return fsspec.core.url_to_fs(url)
    except ImportError:
        protocol = url.split("://", 1)[0]
        package = _PACKAGES.get(protocol, f"fsspec's package for {protocol}://")
        raise MissingPackage(f"{url}: {protocol}:// needs the {package} package (pip install {package})") from None


def _fsspec(url: str, dst: BinaryIO, timeout: float, limit: Optional[int] = None) -> None:
    """One try through fsspec, ending by `timeout` (fsspec's deadline on its event loop: a stalled server is
    abandoned). A file on disk (a download into the cache) is streamed into by name, anything else (an index)
    gets the bytes; more than `limit` bytes is a failure (read first: fsspec gives the whole object)."""
    fs, path = _filesystem(url)
    name = getattr(dst, "name", None)
    try:
        if isinstance(name, str) and os.path.isfile(name):
            fs.get_file(path, name, timeout=timeout)
            if limit is not None and os.path.getsize(name) > limit:
                raise _too_large(limit)
        else:
            data = fs.cat_file(path, timeout=timeout)
            if limit is not None and len(data) > limit:
                raise _too_large(limit)
            dst.write(data)
    except FileNotFoundError:
        raise _Permanent("HTTP 404 Not Found" if url.startswith("http") else "no such file") from None
    except OSError:  # fsspec's FSTimeoutError (a TimeoutError), a refused connection: `fetch` names them
        raise
    except Exception as exc:  # aiohttp's HTTP status errors, other libraries' own types: one line
        status = getattr(exc, "status", None)
        if not isinstance(status, int):
            raise OSError(f"{type(exc).__name__}: {exc}") from None
        error = OSError if status >= 500 or status in (408, 429) else _Permanent
        raise error(f"HTTP {status} {getattr(exc, 'message', '')}".strip()) from None


def fetch(
    url: str,
    dst: BinaryIO,
    timeout: float = 60.0,
    retries: int = 3,
    check=None,
    deadline: Optional[float] = None,
    limit: Optional[int] = None,
) -> None:
    """Write the file behind a remote `url` into `dst`, retrying a failed try with exponential back-off.

    http(s), `s3://` and `gs://` are read through fsspec (aiohttp, s3fs, gcsfs), a `pipe:` location by its
    command in a shell.

    Args:
        timeout: seconds one try may take in all (a stalled server or command is abandoned).
        retries: tries after the first; waits BACKOFF, 2 x BACKOFF, ... between them.
        check: called with `dst` after a try; a ValueError it raises makes the try a failure (e.g. an HTML
            error page where a shard was expected).
        deadline: a `time.monotonic()` time the whole fetch ends by, its tries and waits included (the training
            stream's own bound): each try gets what is left, up to `timeout`, and none starts after it.
        limit: the most bytes the file may have; more is a failure that is not retried.

    Raises RemoteError naming the URL and the last failure.
    """
    why = "not tried"
    tries = 0
    for attempt in range(retries + 1):
        budget = timeout
        if deadline is not None:
            left = deadline - time.monotonic()
            wait = BACKOFF * 2 ** (attempt - 1) if attempt else 0.0
            if left - wait <= 0:
                if not tries:
                    raise RemoteError(f"{url}: not read: the stream's deadline had passed")
                raise RemoteError(f"{url}: {why} ({_tries(tries)}; stopped at the stream's deadline)")
            budget = min(timeout, left - wait)
        if attempt:
            time.sleep(BACKOFF * 2 ** (attempt - 1))
        dst.seek(0)
        dst.truncate()
        tries += 1
        try:
            (_run if url.startswith("pipe:") else _fsspec)(url, dst, budget, limit)
            dst.flush()
            if check is not None:
                check(dst)
            return
        except MissingPackage:
            raise
        except _Permanent as exc:
            raise RemoteError(f"{url}: {' '.join(str(exc).split())}") from None
        except TimeoutError:
            why = f"no complete answer within {budget:g} s"
        except (OSError, ValueError) as exc:
            if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise NoSpace(exc.errno, exc.strerror or str(exc)) from None
            why = " ".join(str(exc).split()) or type(exc).__name__  # one line
    raise RemoteError(f"{url}: {why} ({_tries(tries)})")


def _tries(n: int) -> str:
    return "1 try" if n == 1 else f"{n} tries"


def _read_url(url: str, timeout: float, retries: int, limit: Optional[int] = None) -> bytes:
    """All bytes behind a local path, or a remote URL (`fetch`), at most `limit` (default MAX_INDEX_BYTES)."""
    limit = MAX_INDEX_BYTES if limit is None else limit
    if not is_remote(url):
        with open(url, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size > limit:
                raise UserError(f"{url}: {size} bytes, more than a shard index may be ({limit} bytes)")
            data = f.read(limit + 1)
        if len(data) > limit:
            raise UserError(f"{url}: more than a shard index may be ({limit} bytes)")
        return data
    buf = io.BytesIO()
    fetch(url, buf, timeout, retries, limit=limit)
    return buf.getvalue()


# --------------------------------------------------------------------------- the index


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_index(index: object, url: str, split: str) -> None:
    """Refuse an index that is not a well-formed index of `split`: ValueError, one line naming `url`.

    Every shard name must be `<split>-NNNNNN.tar` (names become file names and command arguments), every record
    must point into a listed shard with members json/jpg/png at non-negative offsets, each at most
    MAX_MEMBER_BYTES and (format 2, where the shard's bytes are listed) inside the shard.
    """
    if not isinstance(index, dict):
        raise UserError(f"{url}: not a shard index (a JSON {type(index).__name__})")
    if index.get("format") not in READABLE_FORMATS:
        raise UserError(f"{url}: format {index.get('format')!r}, expected one of {list(READABLE_FORMATS)}")
    if index.get("split", split) != split:
        raise UserError(f"{url}: an index of split {index.get('split')!r}, not {split!r}")
    if not isinstance(index.get("dataset"), str) or not isinstance(index.get("classes"), dict):
        raise UserError(f"{url}: no 'dataset' name or 'classes' table")
    names = shard_pattern(split)
    shards, records = index.get("shards"), index.get("records")
    if not isinstance(shards, list) or not isinstance(records, list):
        raise UserError(f"{url}: no 'shards' and 'records' lists")
    for shard in shards:
        name = shard.get("name") if isinstance(shard, dict) else None
        if not isinstance(name, str) or not names.fullmatch(name):
            shown = repr(name[:80]) if isinstance(name, str) else _show(name)
            raise UserError(f"{url}: shard name {shown} is not of the form {split}-NNNNNN.tar; refused")
        sha = shard.get("sha256")
        if sha is not None and not (isinstance(sha, str) and re.fullmatch(r"[0-9a-f]{64}", sha)):
            raise UserError(f"{url}: shard {name} has a malformed sha256")
        if shard.get("bytes") is not None and not (_is_int(shard["bytes"]) and shard["bytes"] >= 0):
            raise UserError(f"{url}: shard {name} has a malformed byte size")
    if len({s["name"] for s in shards}) != len(shards):
        raise UserError(f"{url}: a shard is listed twice")
    sizes = [s.get("bytes") if _is_int(s.get("bytes")) else None for s in shards]
    for i, record in enumerate(records):
        problem = _index_record_problem(record, sizes)
        if problem:
            raise UserError(f"{url}: record {i} {problem}; refused")
    for key, name in index["classes"].items():
        if not key.isdigit() or not isinstance(name, str):
            raise UserError(f"{url}: class {key[:40]!r} -> {_show(name)} is not an id -> name pair")


def _index_record_ok(record: object, sizes: list[Optional[int]]) -> bool:
    """The common case of `_index_record_problem`, fast (an index lists ~10^5 records)."""
    if type(record) is not dict:
        return False
    shard, offsets, classes = record.get("shard"), record.get("offsets"), record.get("classes")
    if type(record.get("key")) is not str or type(shard) is not int or not 0 <= shard < len(sizes):
        return False
    if type(offsets) is not dict or offsets.keys() != _MEMBER_SET or type(classes) is not dict:
        return False
    end = sizes[shard] if sizes[shard] is not None else math.inf
    for span in offsets.values():
        if type(span) is not list or len(span) != 2 or type(span[0]) is not int or type(span[1]) is not int:
            return False
        if span[0] < tarfile.BLOCKSIZE or not 0 <= span[1] <= MAX_MEMBER_BYTES or span[0] + span[1] > end:
            return False
    return all(type(v) is int for v in classes.values()) and all(k.isdigit() for k in classes)


def _index_record_problem(record: object, sizes: list[Optional[int]]) -> Optional[str]:
    """Why a record of an index cannot be trusted, or None. `sizes`: each listed shard's bytes, where known."""
    if _index_record_ok(record, sizes):
        return None
    if not isinstance(record, dict) or not isinstance(record.get("key"), str):
        return "has no key"
    if not _is_int(record.get("shard")) or not 0 <= record["shard"] < len(sizes):
        return f"points to shard {_show(record.get('shard'))}, which the index does not list"
    offsets, classes = record.get("offsets"), record.get("classes")
    if not isinstance(offsets, dict) or set(offsets) != set(MEMBERS):
        members = _show(sorted(offsets)) if isinstance(offsets, dict) else _show(offsets)
        return f"has members {members}, expected {list(MEMBERS)}"
    for ext, span in offsets.items():
        if not (isinstance(span, list) and len(span) == 2 and all(_is_int(v) and v >= 0 for v in span)):
            return f"has a malformed member offset {_show(span)}"
        if span[0] < tarfile.BLOCKSIZE:
            return f"has its {ext} member at offset {span[0]}, before the first tar header ends"
        if span[1] > MAX_MEMBER_BYTES:
            return f"declares a {ext} member of {span[1]} bytes, more than a member may be ({MAX_MEMBER_BYTES})"
        end = sizes[record["shard"]]
        if end is not None and span[0] + span[1] > end:
            return (
                f"declares a {ext} member of {span[1]} bytes at offset {span[0]}, past the end of its shard "
                f"({end} bytes)"
            )
    if not isinstance(classes, dict) or not all(k.isdigit() and _is_int(v) for k, v in classes.items()):
        return "has malformed class pixel counts"
    return None


# --------------------------------------------------------------------------- the cache of remote shards


def cache_limit() -> int:
    """The cache's size bound in bytes: `JC2A_CACHE_MAX_GB` (default 50)."""
    text = os.environ.get("JC2A_CACHE_MAX_GB", "")
    try:
        gb = float(text) if text else CACHE_MAX_GB
    except ValueError:
        gb = -1.0
    if not (math.isfinite(gb) and 0 <= gb <= 2**30):
        raise UserError(f"JC2A_CACHE_MAX_GB={text!r}: expected a number of GB >= 0 and <= {2**30}")
    return int(gb * 2**30)


def evict(cache_dir: Path, need: int, keep: tuple[Path, ...] = ()) -> list[Path]:
    """Delete least-recently-used complete shards under `cache_dir` until `need` more bytes fit the bound.

    Never a file open in this process or listed in `keep`; temporary files of downloads a day old are removed.
    Returns the deleted files.
    """
    limit, now = cache_limit(), time.time()
    for tmp in cache_dir.glob("*/.*.tmp"):
        try:
            if now - tmp.stat().st_mtime > 86400:
                tmp.unlink()
        except OSError:
            pass
    files = []
    for path in cache_dir.glob("*/*.tar"):
        try:
            stat = path.stat()
        except OSError:
            continue
        files.append((stat.st_mtime, stat.st_size, path))
    total = sum(size for _, size, _ in files)
    protected = {p.resolve() for p in keep} | {p for p, n in _IN_USE.items() if n > 0}
    deleted = []
    for _, size, path in sorted(files):
        if total + need <= limit:
            break
        if path.resolve() in protected:
            continue
        try:
            path.unlink()
        except OSError:
            continue
        total -= size
        deleted.append(path)
    return deleted


class ShardSet:
    """One split's index and shard URLs, with random access to records by their index position.

    Args:
        location: folder, URL prefix, shard pattern or `pipe:` command with `{shard}` (module docstring).
        split: "train", "val", ... (a plain name).
        cache_dir: where remote shards are copied for random access (evaluation); default
            `$JC2A_CACHE` or `~/.cache/jc2a/shards`, bounded by `$JC2A_CACHE_MAX_GB` (default 50), LRU.
        timeout: seconds one remote read (index or shard, http(s) or pipe:) may take before it is retried.
        retries: retries of a failed remote read, with exponential back-off.
        dataset: "coco20i" or "pascal5i" (the config's `data.dataset`): an index of another dataset is refused.
        allow_pipe: False refuses a `pipe:` location before anything runs (`open_shards` passes False for one
            read from a config file without `data.allow_pipe=true` on the command line); `refusal` is then the
            one-line message.

    Attributes:
        dataset: the index's dataset as a config names it ("coco20i", "pascal5i").
        checksum: sha256 hex of the index bytes.
    """

    def __init__(
        self,
        location: str,
        split: str,
        cache_dir: Optional[str] = None,
        timeout: float = 60.0,
        retries: int = 3,
        dataset: Optional[str] = None,
        allow_pipe: bool = True,
        refusal: Optional[str] = None,
    ) -> None:
        if not timeout > 0 or not _is_int(retries) or retries < 0:
            raise ValueError(f"remote reads need a timeout > 0 and retries >= 0, got {timeout!r}, {retries!r}")
        self.location, self.split = str(location), split
        self.timeout, self.retries = float(timeout), retries
        if self.location.startswith("pipe:") and not allow_pipe:
            raise UserError(refusal or f"{_show(self.location)}: a pipe: location, which is not allowed here")
        self.index_url, explicit = resolve(self.location, split)
        try:
            raw = _read_url(self.index_url, self.timeout, self.retries)
        except MissingPackage:
            raise
        except RemoteError as exc:
            raise FileNotFoundError(f"shard index not found or unreadable: {exc}") from None
        except UserError:  # read, and refused (too large)
            raise
        except (OSError, ValueError) as exc:
            raise FileNotFoundError(f"shard index not found or unreadable: {self.index_url} ({exc})") from None
        self.checksum = hashlib.sha256(raw).hexdigest()
        try:
            self.index = json.loads(raw)
        except ValueError:
            raise UserError(f"{self.index_url}: not a JSON shard index") from None
        except RecursionError:  # json's parser stops at Python's recursion limit (about 1000 levels)
            raise UserError(f"{self.index_url}: JSON nested too deep to be a shard index (an index has 5 levels)"
                            ) from None  # fmt: skip
        check_index(self.index, self.index_url, split)
        self.dataset = DATASETS.get(self.index["dataset"], self.index["dataset"])
        if dataset is not None and self.dataset != DATASETS.get(dataset, dataset):
            raise UserError(
                f"{self.index_url}: the shards hold dataset {self.index['dataset']!r}, the config says {dataset!r}"
            )
        names = [s["name"] for s in self.index["shards"]]
        if explicit:
            by_name = {shard_basename(u): u for u in explicit}
            missing = [n for n in names if n not in by_name]
            if missing:
                raise UserError(
                    f"{self.location}: pattern does not cover shard {missing[0]} listed in {self.index_url}"
                )
            self.urls = [by_name[n] for n in names]
        elif SHARD_SLOT in self.location:
            self.urls = [_fill(self.location, n) for n in names]
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

    def local_path(self, shard: int, deadline: Optional[float] = None) -> Path:
        """A local file of shard `shard`: the shard itself, or its copy in the cache for a remote one.

        A remote shard is downloaded to a temporary name and renamed into the cache only when it is whole: the
        size and sha256 the index records, or (older indexes) a tar that reads to its end with this shard's
        records. Least-recently-used copies are evicted to keep the cache under its bound. `deadline` (a
        `time.monotonic()` time) ends the download, its retries included, by then (`fetch`).
        """
        url, info = self.urls[shard], self.index["shards"][shard]
        if not is_remote(url):
            path = Path(url)
            if path.exists() and not path.is_file():  # a FIFO or a device would block or never end
                raise UserError(f"{path}: not a regular file, so not a shard")
            if _is_int(info.get("bytes")) and path.is_file() and path.stat().st_size != info["bytes"]:
                raise UserError(
                    f"{path}: {path.stat().st_size} bytes, {self.index_url} says {info['bytes']}: "
                    "the shard changed after its index was written"
                )
            return path
        folder = self.cache_dir / hashlib.sha1(self.index_url.encode()).hexdigest()[:16]
        path = folder / info["name"]  # a validated name: never '..' or absolute
        if path.is_file() and path.stat().st_size == info.get("bytes", path.stat().st_size):
            os.utime(path)  # recency for the LRU bound
            return path
        folder.mkdir(parents=True, exist_ok=True)
        evict(self.cache_dir, info.get("bytes", 0))
        limit = info["bytes"] if _is_int(info.get("bytes")) else None
        try:
            with replacing(path) as tmp, open(tmp, "w+b") as dst:
                check = lambda f: self._check_download(f, shard)  # noqa: E731
                fetch(url, dst, self.timeout, self.retries, check=check, deadline=deadline, limit=limit)
        except OSError as exc:  # NoSpace, or the same from closing the file (its buffer cannot be flushed)
            if exc.errno not in (errno.ENOSPC, errno.EDQUOT) or isinstance(exc, UserError):
                raise
            try:  # the temporary file is gone (`replacing`)
                free = f"{shutil.disk_usage(folder).free} bytes free"
            except OSError:
                free = "free space unknown"
            need = f"{limit} bytes" if limit is not None else "the shard (its size is not in the index)"
            raise WriteError(
                f"{path}: cannot cache {url} ({exc.strerror}): {need} were to be written, {free} on {folder}; "
                "free some space, or point JC2A_CACHE elsewhere (JC2A_CACHE_MAX_GB bounds the cache)"
            ) from None
        return path

    def _check_download(self, f: BinaryIO, shard: int) -> None:
        """ValueError unless the downloaded file `f` is shard `shard` as the index describes it."""
        info = self.index["shards"][shard]
        size = f.seek(0, os.SEEK_END)
        if "sha256" in info:
            if size != info["bytes"]:
                raise UserError(f"got {size} bytes, the index says {info['bytes']}")
            f.seek(0)
            digest = hashlib.sha256()
            for block in iter(lambda: f.read(2**20), b""):
                digest.update(block)
            if digest.hexdigest() != info["sha256"]:
                raise UserError("the download's sha256 differs from the index's")
            return
        try:
            keys = {e["key"] for e in read_complete_shard(Path(f.name), shard)}
        except ValueError as exc:
            raise UserError(f"the download is not a complete shard ({exc})") from None
        if keys != {r["key"] for r in self.records if r["shard"] == shard}:
            raise UserError("the download's records differ from the ones the index lists")

    def read(self, position: int) -> dict:
        """The raw sample of record `position`: `__key__`, `__url__`, `jpg`, `png`, `json` bytes."""
        if self._pid != os.getpid():  # forked: handles of the parent are not ours
            self._files, self._pid = {}, os.getpid()
        record = self.records[position]
        shard = record["shard"]
        if shard not in self._files:
            path = self.local_path(shard)
            self._files[shard] = open(path, "rb")
            _IN_USE[path.resolve()] += 1
        f = self._files[shard]
        sample = {"__key__": record["key"], "__url__": self.urls[shard]}
        end = os.fstat(f.fileno()).st_size
        for ext, (offset, size) in record["offsets"].items():
            self._check_member(f, end, record["key"], ext, offset, size, shard)
            sample[ext] = f.read(size)
        return sample

    def _check_member(self, f: BinaryIO, end: int, key: str, ext: str, offset: int, size: int, shard: int) -> None:
        """Leave `f` at `offset` once the tar header before it names `<key>.<ext>` with `size` bytes that fit the
        file; RecordError naming the record, the shard and the index otherwise (nothing of the size is read)."""
        where = f"record {key} of {self.urls[shard]} ({self.index_url})"
        if offset < tarfile.BLOCKSIZE or offset + size > end:
            raise RecordError(f"{where}: the index puts its {ext} member ({size} bytes at {offset}) outside the "
                              f"shard's {end} bytes")  # fmt: skip
        f.seek(offset - tarfile.BLOCKSIZE)
        block = f.read(tarfile.BLOCKSIZE)
        try:
            info = tarfile.TarInfo.frombuf(block, tarfile.ENCODING, "surrogateescape")
        except tarfile.TarError:
            raise RecordError(f"{where}: no tar header before its {ext} member at {offset}") from None
        if info.name != f"{key}.{ext}" or info.size != size:
            raise RecordError(
                f"{where}: the index says {key}.{ext} has {size} bytes at {offset}; the shard holds "
                f"{_show(info.name)} of {info.size} bytes there"
            )

    def close(self) -> None:
        """Close the shard files opened by `read` in this process (they reopen on the next `read`)."""
        if self._pid == os.getpid():
            for f in self._files.values():
                path = Path(f.name).resolve()
                f.close()
                _IN_USE[path] -= 1
                if _IN_USE[path] <= 0:
                    del _IN_USE[path]
        self._files = {}

    def __enter__(self) -> ShardSet:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        if getattr(self, "_files", None):
            self.close()
