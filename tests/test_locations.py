"""Shard locations: untrusted indexes, `pipe:` with `{shard}`, remote timeouts and retries, a bounded cache."""

from __future__ import annotations

import hashlib
import http.server
import json
import shutil
import socket
import threading
import time
from pathlib import Path

import pytest

import jc2a.data.locations as locations
from jc2a.data.locations import RemoteError, ShardSet, fetch, resolve


def _copy(coco_shards: Path, dst: Path, split: str = "val") -> Path:
    dst.mkdir(parents=True)
    for path in coco_shards.glob(f"{split}-*"):
        shutil.copy(path, dst / path.name)
    return dst


def _edit_index(folder: Path, split: str, change) -> Path:
    path = folder / f"{split}-index.json"
    index = json.loads(path.read_text())
    change(index)
    path.write_text(json.dumps(index))
    return path


@pytest.fixture(autouse=True)
def _quick_backoff(monkeypatch):
    monkeypatch.setattr(locations, "BACKOFF", 0.01, raising=False)


# --------------------------------------------------------------------------- the index is data


BAD_NAMES = [
    "../../etc/passwd",
    "/tmp/val-000000.tar",
    "val-000000.tar; touch /tmp/jc2a-owned",
    "$(touch /tmp/jc2a-owned)",
    "train-000000.tar",
    "val-0000001.tar",
    "val-000000.tar\n",
    "sub/val-000000.tar",
]


@pytest.mark.parametrize(
    "name", BAD_NAMES, ids=["dotdot", "absolute", "semicolon", "subshell", "other-split", "seven-digits", "newline",
                            "subfolder"]
)  # fmt: skip
def test_index_shard_names_are_validated(coco_shards, tmp_path, name):
    folder = _copy(coco_shards, tmp_path / "shards")
    index = _edit_index(folder, "val", lambda ix: ix["shards"][1].update(name=name))
    for location in (str(folder), f"pipe:cat {folder}/{{shard}}"):
        with pytest.raises(ValueError) as err:
            ShardSet(location, "val", cache_dir=str(tmp_path / "cache"))
        msg = str(err.value)
        assert "\n" not in msg and "shard name" in msg and repr(name)[1:-1][:40] in msg and "refused" in msg
        assert str(folder) in msg and "val-index.json" in msg
    assert not Path("/tmp/jc2a-owned").exists() and index.is_file()


@pytest.mark.parametrize(
    "change,words",
    [
        (lambda ix: ix["records"][3].update(shard=99), "record 3 points to shard 99"),
        (lambda ix: ix["records"][3].update(shard="../x"), "record 3 points to shard '../x'"),
        (lambda ix: ix["records"][3]["offsets"].update(pyd=[0, 10]), "record 3 has members"),
        (lambda ix: ix["records"][3]["offsets"].update(jpg=[-5, 10]), "record 3 has a malformed member offset"),
        (lambda ix: ix["shards"].append(dict(ix["shards"][0])), "a shard is listed twice"),
        (lambda ix: ix["shards"][0].update(sha256="x"), "malformed sha256"),
        (lambda ix: ix.update(format="jc2a-shards/9"), "format 'jc2a-shards/9'"),
        (lambda ix: ix.update(split="train"), "an index of split 'train', not 'val'"),
    ],
    ids=["shard-out-of-range", "shard-not-int", "extra-member", "negative-offset", "shard-twice", "bad-sha256",
         "unknown-format", "other-split"],
)  # fmt: skip
def test_malformed_index_is_refused(coco_shards, tmp_path, change, words):
    folder = _copy(coco_shards, tmp_path / "shards")
    _edit_index(folder, "val", change)
    with pytest.raises(ValueError) as err:
        ShardSet(str(folder), "val")
    assert words in str(err.value) and "val-index.json" in str(err.value) and "\n" not in str(err.value)


def test_split_must_be_a_plain_name(coco_shards):
    for split in ("../val", "val/..", "v al", ""):
        with pytest.raises(ValueError, match="plain name"):
            ShardSet(str(coco_shards), split)


def test_dataset_and_checksum(coco_shards, tmp_path):
    shards = ShardSet(str(coco_shards), "val", dataset="coco20i")
    assert shards.dataset == "coco20i"  # the index stores the writer's "coco"
    assert shards.checksum == hashlib.sha256((coco_shards / "val-index.json").read_bytes()).hexdigest()
    assert ShardSet(str(coco_shards), "val", dataset="coco").dataset == "coco20i"
    with pytest.raises(ValueError) as err:
        ShardSet(str(coco_shards), "val", dataset="pascal5i")
    assert str(err.value) == (
        f"{coco_shards}/val-index.json: the shards hold dataset 'coco', the config says 'pascal5i'"
    )
    folder = _copy(coco_shards, tmp_path / "shards")
    _edit_index(folder, "val", lambda ix: ix["records"][0]["classes"].update({"1": 5}))
    assert ShardSet(str(folder), "val").checksum != shards.checksum


def test_first_format_indexes_stay_readable(coco_shards, tmp_path):
    folder = _copy(coco_shards, tmp_path / "shards")

    def to_first_format(ix):
        ix["format"] = "jc2a-shards/1"
        ix["shards"] = [{"name": s["name"], "records": s["records"]} for s in ix["shards"]]
        ix.pop("dropped", None)

    _edit_index(folder, "val", to_first_format)
    shards = ShardSet(str(folder), "val")
    assert shards.read(5)["jpg"] == ShardSet(str(coco_shards), "val").read(5)["jpg"]


def test_local_shard_changed_after_its_index_is_named(coco_shards, tmp_path):
    folder = _copy(coco_shards, tmp_path / "shards")
    with open(folder / "val-000000.tar", "ab") as f:
        f.write(b"\0" * 512)
    with pytest.raises(ValueError, match=r"val-000000\.tar: \d+ bytes, .*val-index\.json says \d+"):
        ShardSet(str(folder), "val").read(0)


# --------------------------------------------------------------------------- pipe: with {shard}


def test_pipe_shard_slot(coco_shards, tmp_path, monkeypatch):
    monkeypatch.setenv("JC2A_CACHE", str(tmp_path / "cache"))
    location = f"pipe:cat {coco_shards}/{{shard}}"
    assert resolve(location, "val") == (f"pipe:cat {coco_shards}/val-index.json", [])
    assert (
        resolve("pipe:aws s3 cp s3://b/coco/{shard} -", "train")[0] == "pipe:aws s3 cp s3://b/coco/train-index.json -"
    )
    shards = ShardSet(location, "val")
    local = ShardSet(str(coco_shards), "val")
    assert shards.urls == [f"pipe:cat {coco_shards}/{s['name']}" for s in local.index["shards"]]
    assert shards.read(7) == {**local.read(7), "__url__": shards.urls[local.records[7]["shard"]]}
    cached = list((tmp_path / "cache").rglob("*"))
    assert all(p.resolve().is_relative_to((tmp_path / "cache").resolve()) for p in cached)
    assert [p.name for p in cached if p.is_file()] == [local.index["shards"][local.records[7]["shard"]]["name"]]


def test_pipe_prefix_without_slot_is_refused(coco_shards):
    with pytest.raises(ValueError, match=r"needs \{shard\} where the file name goes"):
        ShardSet(f"pipe:cat {coco_shards}", "val")


def test_names_reach_a_pipe_command_as_quoted_arguments(tmp_path):
    marker = tmp_path / "owned"
    hostile = f"x; touch {marker}"
    command = locations._fill(f"pipe:cat {tmp_path}/{{shard}}", hostile)
    assert command == f"pipe:cat {tmp_path}/'x; touch {marker}'"
    with pytest.raises(RemoteError, match="command exited with status 1"):
        fetch(command, __import__("io").BytesIO(), timeout=5, retries=0)
    assert not marker.exists()


# --------------------------------------------------------------------------- remote reads: timeout, bounded retries


@pytest.fixture()
def stalled_server():
    """A server on 127.0.0.1 that accepts connections and never answers; counts the connections."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    accepted, held, stop = [], [], threading.Event()

    def serve():
        server.settimeout(0.05)
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except OSError:
                continue
            accepted.append(time.monotonic())
            held.append(conn)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.getsockname()[1]}", accepted
    stop.set()
    thread.join()
    for conn in held:
        conn.close()
    server.close()


def test_stalled_server_fails_cleanly_naming_the_url(stalled_server):
    url, accepted = stalled_server
    start = time.monotonic()
    with pytest.raises(FileNotFoundError) as err:
        ShardSet(f"{url}/coco", "val", timeout=0.3, retries=2)
    elapsed = time.monotonic() - start
    assert str(err.value) == (
        f"shard index not found or unreadable: {url}/coco/val-index.json: no complete answer within 0.3 s (3 tries)"
    )
    assert len(accepted) == 3 and 0.9 <= elapsed < 5  # three tries of 0.3 s, bounded


def test_stalled_pipe_is_killed_at_the_timeout(tmp_path):
    start = time.monotonic()
    with pytest.raises(FileNotFoundError, match=r"sleep 30; cat .*val-index\.json: no complete answer within 0\.3 s"):
        ShardSet(f"pipe:sleep 30; cat {tmp_path}/{{shard}}", "val", timeout=0.3, retries=1)
    assert time.monotonic() - start < 5


class _Flaky(http.server.SimpleHTTPRequestHandler):
    """Serves a folder; `fail_first` requests answer 500, paths in `html` answer an HTML error page with 200."""

    fail_first = 0
    html: tuple = ()
    requests: list = []

    def do_GET(self):  # noqa: N802 - http.server's name
        type(self).requests.append(self.path)
        if len(type(self).requests) <= type(self).fail_first:
            self.send_error(500, "try again")
        elif any(self.path.endswith(name) for name in type(self).html):
            body = b"<html><body>Service unavailable</body></html>"
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        else:
            super().do_GET()

    def log_message(self, *args):
        pass


@pytest.fixture()
def flaky_server(coco_shards):
    def start(folder: Path, fail_first: int = 0, html: tuple = ()):
        handler = type("Handler", (_Flaky,), {"fail_first": fail_first, "html": html, "requests": []})
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), lambda *a: handler(*a, directory=str(folder)))
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}", handler.requests

    servers: list = []
    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def test_failed_reads_are_retried_then_succeed(coco_shards, flaky_server, tmp_path):
    url, requests = flaky_server(coco_shards, fail_first=2)
    shards = ShardSet(url, "val", cache_dir=str(tmp_path / "cache"), timeout=5, retries=2)
    assert len(shards) == 240 and requests == ["/val-index.json"] * 3


def test_not_found_is_not_retried(coco_shards, flaky_server):
    url, requests = flaky_server(coco_shards)
    with pytest.raises(FileNotFoundError, match=r"nope-index\.json: HTTP 404"):
        ShardSet(url, "nope", timeout=5, retries=3)
    assert requests == ["/nope-index.json"]


@pytest.mark.parametrize("index_format", ["2", "1"])
def test_an_html_error_page_is_never_cached_as_a_shard(coco_shards, flaky_server, tmp_path, index_format):
    folder = _copy(coco_shards, tmp_path / "shards")
    if index_format == "1":  # no sha256: the download must read as a tar holding the listed records
        _edit_index(folder, "val", lambda ix: ix.update(format="jc2a-shards/1", shards=[
            {"name": s["name"], "records": s["records"]} for s in ix["shards"]]))  # fmt: skip
    url, requests = flaky_server(folder, html=("val-000000.tar",))
    cache = tmp_path / "cache"
    shards = ShardSet(url, "val", cache_dir=str(cache), timeout=5, retries=1)
    with pytest.raises(RemoteError) as err:
        shards.read(0)
    msg = str(err.value)
    assert msg.startswith(f"{url}/val-000000.tar: ") and msg.endswith("(2 tries)") and "\n" not in msg
    assert requests.count("/val-000000.tar") == 2
    assert not [p for p in cache.rglob("*") if p.is_file()]  # neither the page nor a temporary file
    position = next(i for i, r in enumerate(shards.records) if r["shard"] == 1)
    assert shards.read(position)["jpg"]  # a good shard is cached
    assert [p.name for p in cache.rglob("*.tar")] == ["val-000001.tar"]


# --------------------------------------------------------------------------- the cache's size bound


def test_cache_is_bounded_and_evicts_least_recently_used(coco_shards, flaky_server, tmp_path, monkeypatch):
    url, _ = flaky_server(coco_shards)
    cache = tmp_path / "cache"
    shards = ShardSet(url, "val", cache_dir=str(cache))
    sizes = [s["bytes"] for s in shards.index["shards"]]
    assert len(sizes) >= 4
    bound = sum(sorted(sizes[:4])[1:]) + 1000  # any three of the first four shards fit, not all four
    monkeypatch.setenv("JC2A_CACHE_MAX_GB", str(bound / 2**30))
    first = {s: next(i for i, r in enumerate(shards.records) if r["shard"] == s) for s in range(4)}

    def cached():
        return sorted(int(p.name[4:10]) for p in cache.rglob("*.tar"))

    holder = ShardSet(url, "val", cache_dir=str(cache))
    holder.read(first[0])  # open: in use until holder.close()
    for s in (1, 2):
        time.sleep(0.02)
        shards.read(first[s])
        shards.close()
    assert cached() == [0, 1, 2]
    time.sleep(0.02)
    shards.local_path(1)  # used again: now more recent than 2
    shards.read(first[3])  # 0 is the oldest but open; 2 is the least recently used among the rest
    assert cached() == [0, 1, 3]
    total = sum(p.stat().st_size for p in cache.rglob("*.tar"))
    assert total <= bound
    holder.close()
    shards.close()
    shards.read(first[2])  # nothing open now: the least recently used (0) goes
    assert cached() == [1, 2, 3]
    shards.close()


def test_cache_bound_must_be_a_number(coco_shards, flaky_server, tmp_path, monkeypatch):
    url, _ = flaky_server(coco_shards)
    monkeypatch.setenv("JC2A_CACHE_MAX_GB", "lots")
    with pytest.raises(ValueError, match="JC2A_CACHE_MAX_GB='lots'"):
        ShardSet(url, "val", cache_dir=str(tmp_path / "cache")).read(0)


# --------------------------------------------------------------------------- object stores through fsspec


class _Store:
    """A stand-in object store for `s3://`: an fsspec AsyncFileSystem over a local folder (the bucket is the first
    path part), whose answers can be made to stall."""

    @staticmethod
    def make(root: Path, stall: bool = False):
        import asyncio

        from fsspec.asyn import AsyncFileSystem

        class Store(AsyncFileSystem):
            protocol = ("s3",)
            cachable = False

            async def _cat_file(self, path, start=None, end=None, **kwargs):
                if stall:
                    await asyncio.sleep(30)
                file = root / path.split("/", 1)[1]
                if not file.is_file():
                    raise FileNotFoundError(path)
                return file.read_bytes()

            async def _get_file(self, rpath, lpath, **kwargs):
                Path(lpath).write_bytes(await self._cat_file(rpath))

        return Store


def _registry():
    import importlib

    return importlib.import_module("fsspec.registry")  # the module (`fsspec.registry` is also a mapping's name)


def test_object_store_reads_through_fsspec(coco_shards, tmp_path, monkeypatch):
    monkeypatch.setitem(_registry()._registry, "s3", _Store.make(coco_shards.parent))
    shards = ShardSet(f"s3://bucket/{coco_shards.name}", "val", cache_dir=str(tmp_path / "cache"))
    local = ShardSet(str(coco_shards), "val")
    assert shards.urls[0] == f"s3://bucket/{coco_shards.name}/val-000000.tar" and len(shards) == len(local)
    assert shards.read(7) == {**local.read(7), "__url__": shards.urls[local.records[7]["shard"]]}
    cached = [p.name for p in (tmp_path / "cache").rglob("*.tar")]
    assert cached == [local.index["shards"][local.records[7]["shard"]]["name"]]  # checked, then kept
    with pytest.raises(FileNotFoundError, match=r"s3://bucket/nowhere/val-index\.json: no such file$"):
        ShardSet("s3://bucket/nowhere", "val", retries=3)  # not retried


def test_a_stalled_object_store_is_abandoned_at_the_timeout(coco_shards, tmp_path, monkeypatch):
    monkeypatch.setitem(_registry()._registry, "s3", _Store.make(coco_shards.parent, stall=True))
    start = time.monotonic()
    with pytest.raises(FileNotFoundError) as err:
        ShardSet(f"s3://bucket/{coco_shards.name}", "val", timeout=0.3, retries=1)
    assert str(err.value) == (
        f"shard index not found or unreadable: s3://bucket/{coco_shards.name}/val-index.json: "
        "no complete answer within 0.3 s (2 tries)"
    )
    assert time.monotonic() - start < 5


@pytest.mark.parametrize("protocol,package", [("s3", "s3fs"), ("gs", "gcsfs")])
def test_an_object_store_without_its_package_is_one_line(monkeypatch, protocol, package):
    monkeypatch.delitem(_registry()._registry, protocol, raising=False)
    monkeypatch.setitem(_registry().known_implementations, protocol, {"class": "jc2a_absent.FS", "err": "absent"})
    start = time.monotonic()
    with pytest.raises(locations.MissingPackage) as err:
        ShardSet(f"{protocol}://bucket/coco", "val", retries=3)
    assert str(err.value) == (
        f"{protocol}://bucket/coco/val-index.json: {protocol}:// needs the {package} package (pip install {package})"
    )
    assert time.monotonic() - start < 1  # not retried


# ------------------------------------------------------------------ sizes and depths from an index (issue 16.5)


@pytest.mark.parametrize(
    "size,words",
    [
        (10**12, "declares a jpg member of 1000000000000 bytes, more than a member may be (1073741824)"),
        (10**10, "declares a jpg member of 10000000000 bytes, more than a member may be"),
        (2**29, "declares a jpg member of 536870912 bytes at offset"),  # under the bound, past the shard's end
    ],
    ids=["1e12", "10GB", "past-the-end"],
)
def test_a_huge_declared_member_is_refused_with_the_index(coco_shards, tmp_path, size, words):
    folder = _copy(coco_shards, tmp_path / "shards")
    _edit_index(folder, "val", lambda ix: ix["records"][3]["offsets"]["jpg"].__setitem__(1, size))
    start = time.monotonic()
    with pytest.raises(ValueError) as err:
        ShardSet(str(folder), "val")
    msg = str(err.value)
    assert msg.startswith(f"{folder}/val-index.json: record 3 {words}") and msg.endswith("; refused"), msg
    assert time.monotonic() - start < 5


@pytest.mark.parametrize("change", ["size-1e9", "size-off-by-one", "offset-of-another-member"])
def test_a_record_is_read_only_as_its_tar_header_says(coco_shards, tmp_path, change):
    """An index without shard sizes (format 1) cannot be checked when it is loaded: each member is checked against
    the shard's own tar header (name and size) and the file's size before a byte of it is read."""
    folder = _copy(coco_shards, tmp_path / "shards")

    def edit(ix):
        ix["format"] = "jc2a-shards/1"
        ix["shards"] = [{"name": s["name"], "records": s["records"]} for s in ix["shards"]]
        offsets = ix["records"][3]["offsets"]
        if change == "size-1e9":
            offsets["jpg"][1] = 10**9
        elif change == "size-off-by-one":
            offsets["jpg"][1] -= 1
        else:
            offsets["jpg"] = list(offsets["png"])

    _edit_index(folder, "val", edit)
    shards = ShardSet(str(folder), "val")
    start = time.monotonic()
    with pytest.raises(locations.RecordError) as err:
        shards.read(3)
    msg = str(err.value)
    key = shards.records[3]["key"]
    assert msg.startswith(f"record {key} of {folder}/val-") and "val-index.json" in msg and "\n" not in msg, msg
    if change == "size-1e9":
        assert "outside the shard's" in msg
    else:
        assert f"the index says {key}.jpg has" in msg and "the shard holds" in msg
    assert time.monotonic() - start < 1
    assert shards.read(4)["jpg"] == ShardSet(str(coco_shards), "val").read(4)["jpg"]  # the others still read


def test_an_index_nested_200000_deep_is_one_line(coco_shards, tmp_path):
    folder = tmp_path / "shards"
    folder.mkdir()
    (folder / "val-index.json").write_text('{"format": "jc2a-shards/2", "records": ' + "[" * 200_000 + "]" * 200_000
                                           + "}")  # fmt: skip
    start = time.monotonic()
    with pytest.raises(ValueError) as err:
        ShardSet(str(folder), "val")
    assert str(err.value) == (
        f"{folder}/val-index.json: JSON nested too deep to be a shard index (an index has 5 levels)"
    )
    assert time.monotonic() - start < 5
    # nested less deep than the parser's limit: parsed, refused by its shape, the value shown short
    folder2 = _copy(coco_shards, tmp_path / "shards2")
    deep = json.loads("[" * 900 + "]" * 900)
    _edit_index(folder2, "val", lambda ix: ix["shards"][0].update(name=deep))
    with pytest.raises(ValueError) as err:
        ShardSet(str(folder2), "val")
    assert "shard name [[[...]]] is not of the form val-NNNNNN.tar" in str(err.value) and len(str(err.value)) < 400


def test_an_index_over_the_size_bound_is_refused_before_it_is_read(coco_shards, tmp_path, monkeypatch):
    folder = _copy(coco_shards, tmp_path / "shards")
    with open(folder / "val-index.json", "r+b") as f:  # 600 MB, sparse: nothing is written or read
        f.truncate(600 * 2**20)
    start = time.monotonic()
    with pytest.raises(ValueError) as err:
        ShardSet(str(folder), "val")
    assert str(err.value) == (
        f"{folder}/val-index.json: {600 * 2**20} bytes, more than a shard index may be ({512 * 2**20} bytes)"
    )
    assert time.monotonic() - start < 2
    # a remote index: the command is stopped once it has written more than the bound, and not retried
    monkeypatch.setattr(locations, "MAX_INDEX_BYTES", 10_000)
    start = time.monotonic()
    with pytest.raises(FileNotFoundError) as err:
        ShardSet("pipe:yes {shard}", "val", retries=3)
    assert str(err.value) == (
        "shard index not found or unreadable: pipe:yes val-index.json: more than 10000 bytes, the most this file may be"
    )
    assert time.monotonic() - start < 5


@pytest.mark.parametrize("text", ["inf", "-inf", "nan", "-1", "1e300"])
def test_cache_bound_must_be_a_finite_number(coco_shards, flaky_server, tmp_path, monkeypatch, text):
    """`JC2A_CACHE_MAX_GB=inf` was an OverflowError."""
    url, _ = flaky_server(coco_shards)
    monkeypatch.setenv("JC2A_CACHE_MAX_GB", text)
    with pytest.raises(ValueError) as err:
        ShardSet(url, "val", cache_dir=str(tmp_path / "cache")).read(0)
    assert str(err.value) == f"JC2A_CACHE_MAX_GB={text!r}: expected a number of GB >= 0 and <= {2**30}"


# --------------------------------------------------------------------------- pipe: locations from config files (16.9)


def _pipe_config(tmp_path: Path, coco_shards: Path, marker: Path, extra: str = "") -> Path:
    path = tmp_path / "shared.yaml"
    path.write_text(f"data:\n  shards: 'pipe:touch {marker}; cat {coco_shards}/{{shard}}'\n{extra}")
    return path


@pytest.mark.parametrize("how", ["file", "base-file", "allowed-in-the-file"])
def test_a_pipe_location_from_a_config_file_does_not_run(coco_shards, tmp_path, how):
    from jc2a.config import load_config
    from jc2a.data.episodes import open_shards

    marker = tmp_path / "ran"
    config = _pipe_config(tmp_path, coco_shards, marker, "  allow_pipe: true\n" if how == "allowed-in-the-file" else "")
    if how == "base-file":
        child = tmp_path / "child.yaml"
        child.write_text("_base_: shared.yaml\ndata: {fold: 1}\n")
        cfg = load_config(child)
    else:
        cfg = load_config(config)
    with pytest.raises(ValueError) as err:
        open_shards(cfg.data, "val")
    msg = str(err.value)
    assert msg.startswith(f"{config}: key 'data.shards' is a pipe: location, which runs the shell command 'touch ")
    assert "runs only with data.allow_pipe=true on the command line" in msg and "\n" not in msg
    if how == "allowed-in-the-file":
        assert f"(data.allow_pipe: true in {config} does not count" in msg
    assert not marker.exists()


@pytest.mark.parametrize("how", ["location-on-the-command-line", "allowed-on-the-command-line", "in-code"])
def test_a_pipe_location_runs_when_the_user_gives_or_allows_it_and_is_logged(coco_shards, tmp_path, caplog, how):
    from jc2a.config import load_config
    from jc2a.data.episodes import open_shards

    marker = tmp_path / "ran"
    config = _pipe_config(tmp_path, coco_shards, marker)
    location = f"pipe:touch {marker}; cat {coco_shards}/{{shard}}"
    if how == "location-on-the-command-line":
        cfg = load_config(None, [f"data.shards={location}"])
    elif how == "allowed-on-the-command-line":
        cfg = load_config(config, ["data.allow_pipe=true"])
    else:
        cfg = load_config(config)
        cfg.data.shards = location  # a program's own assignment
    with caplog.at_level("INFO", logger="jc2a.data"):
        shards = open_shards(cfg.data, "val")
    assert marker.exists() and len(shards) == 240
    assert f"running pipe command: touch {marker}; cat {coco_shards}/val-index.json" in caplog.text


def test_the_command_line_refuses_a_pipe_from_a_config_file_in_one_line(coco_shards, tmp_path, capsys):
    from jc2a.cli import main

    marker = tmp_path / "ran"
    config = _pipe_config(tmp_path, coco_shards, marker)
    assert main(["preview", "--config", str(config), "--out", str(tmp_path / "preview")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"jc2a preview: error: {config}: key 'data.shards' is a pipe:"), err
    assert not marker.exists()


def test_a_full_cache_disk_is_one_line_and_not_retried(coco_shards, tmp_path):
    """A remote shard's download into a cache on a full disk (a real ENOSPC: a tmpfs of 64 KB, as root) is one
    line naming the cached file, the URL and the bytes needed; not retried, no temporary file left."""
    import os
    import subprocess

    cache = tmp_path / "cache"
    cache.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(cache)],
                                           capture_output=True).returncode:  # fmt: skip
        pytest.skip("no tmpfs here (needs root): a real ENOSPC cannot be made")
    try:
        calls = tmp_path / "calls"
        shards = ShardSet(f"pipe:echo >> {calls}; cat {coco_shards}/{{shard}}", "val", cache_dir=str(cache), retries=3)
        with pytest.raises(OSError) as err:
            shards.read(0)
        msg = str(err.value)
        name, size = shards.index["shards"][0]["name"], shards.index["shards"][0]["bytes"]
        assert msg.startswith(f"{cache}/") and f"/{name}: cannot cache pipe:echo" in msg, msg
        assert f"(No space left on device): {size} bytes were to be written, " in msg and "JC2A_CACHE" in msg
        assert "\n" not in msg and len(calls.read_text().splitlines()) == 2  # the index, then one try of the shard
        assert not [p for p in cache.rglob("*") if p.is_file()]
    finally:
        subprocess.run(["umount", "-l", str(cache)], check=False)
