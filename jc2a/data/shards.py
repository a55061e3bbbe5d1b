"""Write a source dataset as webdataset shards plus an index: atomic, resumable, size-bounded (docs/PROTOCOL.md).

Layout of one split in `out/`:
    <split>-000000.tar, <split>-000001.tar, ...   plain webdataset tars, members <key>.json/.jpg/.png
    <split>-index.json                            shards (bytes, sha256), key, shard, class pixel counts, offsets
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import shutil
import tarfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional

from tqdm import tqdm

from jc2a.atomic import write_text
from jc2a.data.records import (
    MAX_IMAGE_PIXELS,
    RecordError,
    SourceItem,
    class_pixels,
    decode_label,
    encode_label,
    header,
    opened_image,
)
from jc2a.errors import ShardWriteError, UserError
from jc2a.lock import FolderLock

INDEX_FORMAT = "jc2a-shards/2"  # 2: every shard's bytes and sha256
READABLE_FORMATS = ("jc2a-shards/1", INDEX_FORMAT)
MEMBERS = ("json", "jpg", "png")  # order inside a record
_SPLIT = re.compile(r"[A-Za-z0-9_]+")
MAX_SHARD_MB = 2**20  # --max-shard-mb at most 1 TiB: a bound on one shard, not a way to write one shard of all


def check_split(split: str) -> str:
    """`split` if it is a plain name (`[A-Za-z0-9_]+`), else a ValueError: it becomes part of file names."""
    if not isinstance(split, str) or not _SPLIT.fullmatch(split):
        raise UserError(f"split {split!r} must be a plain name of letters, digits and '_'")
    return split


def shard_name(split: str, number: int) -> str:
    return f"{split}-{number:06d}.tar"


def shard_pattern(split: str) -> re.Pattern:
    """The only shard names an index of `split` may hold: `<split>-` six digits `.tar`."""
    return re.compile(rf"{re.escape(check_split(split))}-\d{{6}}\.tar")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(2**20), b""):
            digest.update(block)
    return digest.hexdigest()


def index_name(split: str) -> str:
    return f"{split}-index.json"


@dataclass
class WriteSummary:
    """What one `write_shards` call did."""

    split: str
    images: int = 0  # images the source lists
    records: int = 0  # records in the split's shards now
    shards_written: int = 0
    shards_kept: int = 0  # complete shards found from an earlier run and not rewritten
    skipped: list[dict] = field(default_factory=list)  # {"source", "reason"}: images not written
    dropped: list[dict] = field(default_factory=list)  # {"source", "reason"}: parts left out of written images
    removed: list[str] = field(default_factory=list)  # files of an earlier run deleted before resuming, and why
    seconds: float = 0.0

    def lines(self) -> list[str]:
        reasons = Counter(s["reason"].split(":")[0] for s in self.skipped)
        out = [
            f"{self.split}: {self.images} images -> {self.records} records in "
            f"{self.shards_written + self.shards_kept} shards ({self.shards_written} written, "
            f"{self.shards_kept} kept from an earlier run), {len(self.skipped)} skipped, {self.seconds:.1f} s"
        ]
        out += [f"  removed {r}" for r in self.removed]
        out += [f"  skipped {n}: {reason}" for reason, n in reasons.most_common()]
        out += [f"    {s['source']}: {s['reason']}" for s in self.skipped[:10]]
        if len(self.skipped) > 10:
            out.append(f"    ... and {len(self.skipped) - 10} more (listed in the index under 'skipped')")
        if self.dropped:
            out.append(f"  left out {len(self.dropped)} malformed annotations (their images are written without them)")
            out += [f"    {s['source']}: {s['reason']}" for s in self.dropped[:10]]
            if len(self.dropped) > 10:
                out.append(f"    ... and {len(self.dropped) - 10} more (listed in the index under 'dropped')")
        return out


# --------------------------------------------------------------------------- reading complete shards


def read_shard_entries(path: Path, shard: int) -> list[dict]:
    """Index entries of a complete shard: key, shard number, class pixel counts, member offsets."""
    entries: dict[str, dict] = {}
    with tarfile.open(path, "r:") as tar:
        for info in tar:
            if not info.isfile():
                continue
            key, _, ext = info.name.rpartition(".")
            entry = entries.setdefault(key, {"key": key, "shard": shard, "offsets": {}})
            entry["offsets"][ext] = [info.offset_data, info.size]
            if ext == "json":
                meta = json.loads(tar.extractfile(info).read())
                entry["classes"] = meta["classes"]
                entry["size"] = [meta["height"], meta["width"]]
    for key, entry in entries.items():
        if set(entry["offsets"]) != set(MEMBERS):
            raise UserError(f"{path}: record {key} has members {sorted(entry['offsets'])}, expected {list(MEMBERS)}")
    return list(entries.values())


def _end_problem(path: Path, end: int) -> Optional[str]:
    """Why the tar at `path` does not end like a complete archive after offset `end`, or None."""
    size = path.stat().st_size
    if end > size:
        return f"truncated inside a member ({size} bytes, the last member needs {end})"
    with open(path, "rb") as f:
        f.seek(end)
        tail = f.read()
    if len(tail) < 2 * tarfile.BLOCKSIZE or tail.count(0) != len(tail):
        return "no end-of-archive marker (truncated)"
    return None


def _record_problem(members: dict[str, bytes], entry: dict) -> Optional[str]:
    """Why a record read back from a kept shard is not one this writer wrote, or None."""
    try:
        meta = json.loads(members["json"])
        label = decode_label(members["png"])
        image_size = _check_image(members["jpg"], Path(entry["key"]))
    except (ValueError, OSError, RecursionError) as exc:
        return f"record {entry['key']}: unreadable member ({exc})"
    sizes = {image_size, label.shape, (meta.get("height"), meta.get("width")) if isinstance(meta, dict) else None}
    if len(sizes) != 1:
        return f"record {entry['key']}: image, label and header sizes differ"
    if meta.get("classes") != {str(c): n for c, n in class_pixels(label).items()}:
        return f"record {entry['key']}: the header's class pixel counts differ from the label's"
    return None


def verify_shard(path: Path, shard: int, recorded: Optional[dict] = None) -> list[dict]:
    """Index entries of a shard from an earlier run, after checking that it is whole; ValueError saying why not.

    With `recorded` (its `{"bytes", "sha256"}` in the earlier index) the size and sha256 must match; without,
    the tar must read to its end-of-archive marker and every record must decode (json, png, jpg) and agree
    with its header.
    """
    if recorded is not None and recorded.get("sha256"):
        size = path.stat().st_size
        if size != recorded.get("bytes"):
            raise UserError(f"{size} bytes, the earlier index says {recorded.get('bytes')}")
        if sha256_file(path) != recorded["sha256"]:
            raise UserError("its sha256 differs from the earlier index's")
        return read_shard_entries(path, shard)
    entries = read_complete_shard(path, shard)
    problem = None
    with open(path, "rb") as f:
        for entry in entries:
            members = {}
            for ext, (offset, size) in entry["offsets"].items():
                f.seek(offset)
                members[ext] = f.read(size)
            problem = _record_problem(members, entry)
            if problem:
                raise UserError(problem)
    return entries


def read_complete_shard(path: Path, shard: int) -> list[dict]:
    """`read_shard_entries` of a tar that reads whole to its end-of-archive marker; ValueError saying why not."""
    try:
        entries = read_shard_entries(path, shard)
        with tarfile.open(path, "r:") as tar:
            members = tar.getmembers()
    except (tarfile.TarError, OSError, ValueError, KeyError, TypeError, RecursionError) as exc:
        raise UserError(f"not a readable shard ({'nested too deep' if isinstance(exc, RecursionError) else exc})"
                        ) from None  # fmt: skip
    if not entries:
        raise UserError("no records")
    last = members[-1]
    problem = _end_problem(path, last.offset_data + -(-last.size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE)
    if problem:
        raise UserError(problem)
    return entries


def _earlier_index(out: Path, split: str) -> dict[str, dict]:
    """`{shard name: {"bytes", "sha256"}}` from the split's index of an earlier run ({} when none has them)."""
    try:
        index = json.loads((out / index_name(split)).read_text())
        return {s["name"]: s for s in index["shards"] if isinstance(s, dict) and "sha256" in s}
    except (OSError, ValueError, KeyError, TypeError, RecursionError):  # none usable: every shard is read whole
        return {}


def _complete_prefix(out: Path, split: str) -> tuple[list[Path], list[Path]]:
    """The complete shards numbered 0, 1, 2... without a gap, and any complete shard after a gap."""
    found = sorted(out.glob(f"{split}-[0-9][0-9][0-9][0-9][0-9][0-9].tar"))
    prefix = []
    for number, path in enumerate(found):
        if path.name != shard_name(split, number):
            return prefix, found[number:]
        prefix.append(path)
    return prefix, []


# --------------------------------------------------------------------------- writing


def _tar_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), 0o444, 0  # fixed metadata: reruns write identical bytes
    tar.addfile(info, io.BytesIO(data))


def _check_image(data: bytes, path: Path, max_pixels: int = MAX_IMAGE_PIXELS) -> tuple[int, int]:
    """(height, width) of an image file that decodes completely and has at most `max_pixels` pixels (checked
    from its header, before decoding); ValueError naming the file otherwise."""
    try:
        with opened_image(data, str(path), max_pixels) as im:
            width, height = im.size
            im.draft("RGB", (max(1, width // 8), max(1, height // 8)))  # DCT scaling: reads all, decodes less
            im.load()
    except RecordError as exc:
        raise UserError(f"image too large: {exc}" if "data.max_image_pixels" in str(exc) else f"unreadable image: {exc}"
                        ) from None  # fmt: skip
    except Exception as exc:  # PIL raises many types for broken files
        raise UserError(f"unreadable image: {path} ({exc})") from None
    return height, width


def _size(n: int) -> str:
    """`1234567` -> `1.2 MB (1234567 bytes)`; small counts as bytes only."""
    return f"{n / 1e6:.1f} MB ({n} bytes)" if n >= 100_000 else f"{n} bytes"


class _DiskFull(OSError):
    """A write of a shard that failed (ENOSPC, EDQUOT, EFBIG, EIO ...), its temporary file already removed:
    `path` the file, `need` the bytes that were being written."""

    def __init__(self, path: Path, exc: OSError, need: int) -> None:
        super().__init__(exc.errno, exc.strerror or str(exc))
        self.path, self.need = path, need


def _record_bytes(members: dict[str, bytes]) -> int:
    """The bytes a record takes in a tar: each member's data padded to 512-byte blocks, plus its header block."""
    return sum(tarfile.BLOCKSIZE + -(-len(v) // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE for v in members.values())


class _ShardFile:
    """One shard being written under a temporary name; `close()` renames it into place.

    An OSError while writing (a full disk: ENOSPC from a write, a flush or fsync) removes the temporary file and
    raises _DiskFull naming it and the bytes that were being written.
    """

    def __init__(self, out: Path, split: str, number: int) -> None:
        self.number = number
        self.path = out / shard_name(split, number)
        self.tmp = self.path.with_name(self.path.name + ".tmp")
        self.tar: Optional[tarfile.TarFile] = None
        self.records = 0
        with self._writing(tarfile.RECORDSIZE):
            self.tar = tarfile.open(self.tmp, "w", format=tarfile.USTAR_FORMAT)

    @property
    def bytes(self) -> int:
        return self.tar.offset

    def add(self, key: str, members: dict[str, bytes]) -> None:
        with self._writing(_record_bytes(members)):
            for ext in MEMBERS:
                _tar_member(self.tar, f"{key}.{ext}", members[ext])
        self.records += 1

    def close(self) -> tuple[list[dict], dict]:
        """(index entries of its records, `{"name", "records", "bytes", "sha256"}`) of the shard, now in place."""
        with self._writing(tarfile.RECORDSIZE):  # the end-of-archive blocks, padded to a tar record
            self.tar.close()
            with open(self.tmp, "rb") as f:
                os.fsync(f.fileno())
            entries = read_shard_entries(self.tmp, self.number)
            info = _shard_info(self.tmp, self.path.name, len(entries))
            os.replace(self.tmp, self.path)
        return entries, info

    def discard(self) -> None:
        """Close and remove the temporary file (each step on its own: closing a file whose buffer cannot be
        flushed to a full disk raises again, and the file must go all the same)."""
        if self.tar is not None:
            with contextlib.suppress(OSError, ValueError):
                self.tar.fileobj.close()  # flushes (fails again on a full disk), then closes the descriptor
            self.tar.closed = True  # nothing more to write
        with contextlib.suppress(OSError):
            self.tmp.unlink(missing_ok=True)

    @contextlib.contextmanager
    def _writing(self, need: int):
        try:
            yield
        except OSError as exc:
            self.discard()
            raise _DiskFull(self.tmp, exc, need) from None


def _shard_info(path: Path, name: str, records: int) -> dict:
    return {"name": name, "records": records, "bytes": path.stat().st_size, "sha256": sha256_file(path)}


def output_folder(out: Path) -> Path:
    """`out`, created if absent; ValueError naming it when it is a file or cannot be written."""
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: the output folder is a file")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"{out}: cannot create the output folder ({exc.strerror or exc})") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise UserError(f"{out}: the output folder is not writable")
    return out


def write_shards(
    source: Iterable[SourceItem],
    out: Path,
    split: str,
    dataset: str,
    class_names: dict[int, str],
    max_shard_bytes: int = 256 * 2**20,
    progress: bool = True,
    max_pixels: int = MAX_IMAGE_PIXELS,
) -> WriteSummary:
    """Write every item of `source` as one record, resuming after the complete shards of an earlier run.

    The output folder is locked for the whole write (`jc2a.lock.FolderLock`): a second writer of the same folder,
    in another process, is refused with one line naming this one; a nested call in this process shares the lock.
    A shard kept from an earlier run must match the size and sha256 that run's index recorded, or (with no
    index) read whole to its end-of-archive marker with every record intact; a damaged one and every shard
    after it are removed, named in `summary.removed`, and written again.

    Args:
        source: items in a fixed order (a rerun must list them in the same order). It may carry `problems`,
            `{"source", "reason"}` of its own input left out, reported with the dropped annotations.
        out: the folder of the shards; created if absent.
        split: shard name prefix, a plain name (`[A-Za-z0-9_]+`), e.g. "train".
        dataset: "coco" or "pascal", stored in the index.
        class_names: contiguous id -> name, stored in the index.
        max_shard_bytes: a shard is closed before it would grow past this (a single larger record gets
            a shard of its own); at least 1 MiB / 1024.
        max_pixels: the largest image or label (width x height) a record may hold; larger ones are skipped,
            measured from the header before they are decoded.

    Raises:
        ValueError: a bad split, an output folder that is a file or unwritable, shards of another source, a
            source that lists no image, or one whose every image is skipped.
        FolderInUse: another live process writes to `out`.
        ShardWriteError: writing failed (e.g. disk full); it names the file and the space that was needed, and
            the complete shards stay (no temporary file is left).
    """
    start = time.time()
    check_split(split)
    if not isinstance(max_shard_bytes, int) or isinstance(max_shard_bytes, bool) or max_shard_bytes < 1024:
        raise UserError(f"max_shard_bytes must be an integer >= 1024, got {max_shard_bytes!r}")
    out = output_folder(Path(out))
    with FolderLock(out, f"write_shards {split}"):
        return _write_locked(source, out, split, dataset, class_names, max_shard_bytes, progress, max_pixels, start)


def _write_locked(
    source: Iterable[SourceItem],
    out: Path,
    split: str,
    dataset: str,
    class_names: dict[int, str],
    max_shard_bytes: int,
    progress: bool,
    max_pixels: int,
    start: float,
) -> WriteSummary:
    """`write_shards` with the folder locked."""
    summary = WriteSummary(split=split)
    items = list(source)  # items are cheap: images and labels are read one at a time below
    summary.images = len(items)
    if not items:
        raise UserError(f"{split}: the source lists no image; nothing to write to {out}")
    kept, after_gap = _complete_prefix(out, split)
    earlier = _earlier_index(out, split)
    entries: list[dict] = []
    infos: dict[int, dict] = {}
    damaged: list[tuple[Path, str]] = []
    for number, path in enumerate(kept):
        try:
            shard_entries = verify_shard(path, number, earlier.get(path.name))
        except ValueError as exc:
            damaged = [(path, f"damaged: {exc}")] + [(p, "follows a damaged shard") for p in kept[number + 1 :]]
            kept = kept[:number]
            break
        entries += shard_entries
        recorded = earlier.get(path.name)
        infos[number] = recorded if recorded else _shard_info(path, path.name, len(shard_entries))
        infos[number]["records"] = len(shard_entries)
    summary.shards_kept = len(kept)
    done = {e["key"] for e in entries}

    foreign = done - {item.key for item in items}
    if foreign:  # refused before anything of the earlier run is removed
        raise UserError(
            f"{out}: the existing {split} shards hold {len(foreign)} records this source does not list "
            f"(e.g. {sorted(foreign)[0]}); write to a fresh --out folder"
        )
    removals = [(p, "an interrupted shard") for p in sorted(out.glob(f"{split}-*.tar.tmp"))]
    removals += damaged + [(p, "follows a missing shard") for p in after_gap]
    for path, why in removals:  # rewriting from the first gap would duplicate what follows it
        path.unlink()
        summary.removed.append(f"{path.name} ({why}; its records are written again)")
    summary.dropped += list(getattr(source, "problems", []))
    shard: Optional[_ShardFile] = None
    next_number = len(kept)
    bar = tqdm(items, desc=f"shards {split}", unit="img", disable=not progress, total=summary.images)
    position = 0
    try:
        for position, item in enumerate(bar):  # noqa: B007 - `position` names the items left on a full disk
            if item.error is not None:
                summary.skipped.append({"source": item.source, "reason": item.error})
                continue
            if item.key not in done:
                try:
                    members = _record_members(item, max_pixels)
                except (OSError, ValueError) as exc:
                    reason = str(exc) if isinstance(exc, ValueError) else f"unreadable image: {item.image_path} ({exc})"
                    summary.skipped.append({"source": item.source, "reason": reason})
                    continue
                size = sum(len(v) + 1024 for v in members.values())  # a little over its tar size
                if shard is not None and shard.records and shard.bytes + size > max_shard_bytes:
                    shard_entries, infos[shard.number] = shard.close()
                    entries += shard_entries
                    summary.shards_written += 1
                    shard = None
                if shard is None:
                    shard = _ShardFile(out, split, next_number)
                    next_number += 1
                shard.add(item.key, members)
            summary.dropped += [{"source": item.source, "reason": p} for p in item.problems]
        if shard is not None:
            shard_entries, infos[shard.number] = shard.close()
            entries += shard_entries
            summary.shards_written += 1
            shard = None
    except _DiskFull as exc:
        raise ShardWriteError(_disk_full_message(exc, out, items[position + 1 :], done)) from None
    finally:
        bar.close()  # a shard cut short by another exception stays as .tmp, as a kill leaves it: a rerun removes it
    summary.records = len(entries)
    summary.seconds = time.time() - start
    if not entries:
        first = summary.skipped[0] if summary.skipped else {"source": "?", "reason": "?"}
        raise UserError(
            f"{split}: no record written, all {summary.images} images were skipped "
            f"(first: {first['source']}: {first['reason']})"
        )
    _write_index(out, split, dataset, class_names, entries, [infos[n] for n in sorted(infos)], summary)
    return summary


def _disk_full_message(exc: _DiskFull, out: Path, rest: list[SourceItem], done: set[str]) -> str:
    """`<file>: cannot write (No space left on device): <n> bytes were to be written, <m> free on <out>; the k
    images left need about <s> more (their image files); complete shards stay`."""
    try:
        free = f"{_size(shutil.disk_usage(out).free)} free"
    except OSError:
        free = "free space unknown"
    left = [item for item in rest if item.error is None and item.key not in done]
    image_bytes = 0
    for item in left:
        with contextlib.suppress(OSError):
            image_bytes += item.image_path.stat().st_size
    more = f"; the {len(left)} images after it need about {_size(image_bytes)} more (their image files)" if left else ""
    return (
        f"{exc.path}: cannot write ({exc.strerror}): {_size(exc.need)} were to be written, {free} on {out}"
        f"{more}; complete shards stay, a rerun with more space continues from them"
    )


def _record_members(item: SourceItem, max_pixels: int = MAX_IMAGE_PIXELS) -> dict[str, bytes]:
    """The jpg (original bytes), png and json members of one item; ValueError naming the file if bad."""
    if not item.image_path.is_file():
        raise UserError(f"image not found: {item.image_path}")
    data = item.image_path.read_bytes()
    height, width = _check_image(data, item.image_path, max_pixels)
    if item.size is not None and tuple(item.size) != (height, width):
        raise UserError(
            f"size mismatch: {item.image_path} is {width}x{height} but the annotations say "
            f"{item.size[1]}x{item.size[0]}"
        )
    label = item.label()
    if label.shape != (height, width):
        raise UserError(
            f"size mismatch: label of {item.source} is {label.shape[1]}x{label.shape[0]} but image {width}x{height}"
        )
    meta = header(label, item.source)
    return {"json": json.dumps(meta, sort_keys=True).encode(), "jpg": data, "png": encode_label(label)}


def _write_index(
    out: Path,
    split: str,
    dataset: str,
    class_names: dict[int, str],
    entries: list[dict],
    shards: list[dict],
    summary: WriteSummary,
) -> Path:
    index = {
        "format": INDEX_FORMAT,
        "dataset": dataset,
        "split": split,
        "classes": {str(k): v for k, v in sorted(class_names.items())},
        "shards": [{k: s[k] for k in ("name", "records", "bytes", "sha256")} for s in shards],
        "records": entries,
        "skipped": summary.skipped,
        "dropped": summary.dropped,
    }
    path = out / index_name(split)
    text = json.dumps(index, separators=(",", ":"))
    try:
        write_text(path, text)
    except OSError as exc:
        try:
            free = f"{_size(shutil.disk_usage(out).free)} free"
        except OSError:
            free = "free space unknown"
        raise ShardWriteError(
            f"{path}: cannot write the index ({exc.strerror or exc}): {_size(len(text.encode()))} were to be "
            f"written, {free} on {out}; the shards are complete, a rerun writes it"
        ) from None
    return path
