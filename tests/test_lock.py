"""One writer per folder (jc2a/lock.py): real processes racing for a shards folder, a stale lock taken over, ranks
sharing one lock, release on exceptions."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from jc2a.lock import LOCK_NAME, FolderInUse, FolderLock, shared_lock

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
ENV.pop("JC2A_LOCK_TOKEN", None)


def _shards(toy_coco: Path, out: Path, split: str = "val", images: str = "val", *extra: str) -> list[str]:
    """`python -m jc2a shards coco` of one toy image folder into `out` as `split`."""
    return [
        sys.executable, "-m", "jc2a", "shards", "coco", "--images", str(toy_coco / f"{images}2014"),
        "--annotations", str(toy_coco / f"annotations/instances_{images}2014.json"), "--split", split,
        "--out", str(out), "--no-progress", "--max-shard-mb", "0.2", *extra,
    ]  # fmt: skip


def _wait_for(path: Path, proc: subprocess.Popen, seconds: float = 60) -> None:
    end = time.monotonic() + seconds
    while not path.exists():
        assert proc.poll() is None, f"exited with {proc.returncode} before {path} appeared: {proc.communicate()}"
        assert time.monotonic() < end, f"{path} did not appear"
        time.sleep(0.005)


def _verify(out: Path, split: str, expected_records: int) -> None:
    from jc2a.data.shards import verify_shard

    index = json.loads((out / f"{split}-index.json").read_text())
    assert len(index["records"]) == expected_records
    for number, shard in enumerate(index["shards"]):
        assert verify_shard(out / shard["name"], number, shard)


def test_a_second_jc2a_shards_is_refused_while_the_first_runs(toy_coco, tmp_path):
    """The first `jc2a shards` is stopped (SIGSTOP) while it holds the lock; a second one into the same --out with
    other inputs is refused in one line naming the folder and the first; the first then finishes intact."""
    out = tmp_path / "out"
    first = subprocess.Popen(_shards(toy_coco, out), env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        _wait_for(out / LOCK_NAME, first)
        first.send_signal(signal.SIGSTOP)
        assert (out / LOCK_NAME).exists(), "the first run ended before it could be stopped"
        second = subprocess.run(_shards(toy_coco, out, "val", "train"), env=ENV, capture_output=True, text=True)
        lines = second.stderr.strip().splitlines()
        assert second.returncode == 2 and len(lines) == 1, second.stderr
        assert lines[0].startswith(f"jc2a shards: error: {out}: in use by jc2a shards coco (--out {out}) ")
        assert f"(pid {first.pid} on host {socket.gethostname()} since " in lines[0]
        assert lines[0].endswith("; wait for it or use another folder")
    finally:
        first.send_signal(signal.SIGCONT)
    stdout, stderr = first.communicate(timeout=120)
    assert first.returncode == 0, stderr
    from jc2a.data.coco import CocoSource

    source = CocoSource(toy_coco / "val2014", toy_coco / "annotations/instances_val2014.json")
    _verify(out, "val", len(source))  # the first's shards, whole: nothing of the second was written or removed
    assert not (out / LOCK_NAME).exists() and not list(out.glob("*.tmp"))


def test_two_jc2a_shards_racing_into_one_folder(toy_coco, tmp_path):
    """Started together, same split, different inputs: one writes its shards, the other exits 2 in one line
    (refused by the lock, or, if it starts after the first ended, by the first's records); no ReadError, no
    shard of one mixed with the other's."""
    out = tmp_path / "out"
    procs = [
        subprocess.Popen(_shards(toy_coco, out, "val", images), env=ENV, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)  # fmt: skip
        for images in ("val", "train")
    ]
    results = [(p.wait(timeout=180), *p.communicate()) for p in procs]
    codes = sorted(code for code, _, _ in results)
    assert codes == [0, 2], results
    loser = next(err for code, _, err in results if code == 2)
    assert len(loser.strip().splitlines()) == 1 and "Traceback" not in loser, loser
    assert "in use by" in loser or "records this source does not list" in loser, loser
    winner = ("val", "train")[next(i for i, (code, _, _) in enumerate(results) if code == 0)]
    from jc2a.data.coco import CocoSource

    source = CocoSource(toy_coco / f"{winner}2014", toy_coco / f"annotations/instances_{winner}2014.json")
    _verify(out, "val", len(source))
    assert not (out / LOCK_NAME).exists() and not list(out.glob("*.tmp"))


def test_the_lock_of_a_killed_writer_is_taken_over_with_a_warning(toy_coco, tmp_path):
    """A writer SIGKILLed while it holds the lock leaves the lock file; the next `jc2a shards` sees that its owner
    is gone (the kernel dropped its flock; the pid is a zombie, not yet collected) and takes it over, naming it."""
    out = tmp_path / "out"
    holder = subprocess.Popen(
        [sys.executable, "-c", f"from jc2a.lock import FolderLock; import time\n"
         f"with FolderLock({str(out)!r}, 'a writer that will be killed'):\n    time.sleep(600)"],
        env=ENV,
    )  # fmt: skip
    _wait_for(out / LOCK_NAME, holder)
    holder.kill()
    time.sleep(0.2)  # not collected: a zombie
    result = subprocess.run(_shards(toy_coco, out), env=ENV, capture_output=True, text=True)
    holder.wait()
    assert result.returncode == 0, result.stderr
    assert f"{out}: taking over the lock of a writer that will be killed (pid {holder.pid} on host" in result.stderr
    assert "which is no longer running" in result.stderr
    assert not (out / LOCK_NAME).exists()


_ORPHAN_HOLDER = """
import os, sys, time
from jc2a.lock import FolderLock
lock = FolderLock(sys.argv[1], 'a run whose worker outlives it').acquire()
if os.fork() == 0:  # a data-loader worker: it shares the flock and outlives its parent by sys.argv[2] seconds
    open(sys.argv[1] + '/forked', 'w').close()
    time.sleep(float(sys.argv[2]))
    os._exit(0)
while not os.path.exists(sys.argv[1] + '/forked'):
    time.sleep(0.01)
os._exit(0)  # the owner dies without releasing (as under SIGKILL); its child still holds the flock
"""


@pytest.mark.parametrize("child_lives", [1.5, 60.0], ids=["worker-exits", "worker-stays"])
def test_a_dead_owner_whose_worker_still_holds_the_lock(tmp_path, caplog, monkeypatch, child_lives):
    """The main process of a run is SIGKILLed; a data-loader worker it forked shares its flock until it notices
    (within ~5 s). The next writer waits for it (bounded) and takes over, or names the situation once the bound
    has passed."""
    import jc2a.lock as lock_module

    out = tmp_path / "out"
    out.mkdir()
    holder = subprocess.run([sys.executable, "-c", _ORPHAN_HOLDER, str(out), str(child_lives)], env=ENV, timeout=60)
    assert holder.returncode == 0 and (out / "forked").exists() and (out / LOCK_NAME).exists()
    monkeypatch.setattr(lock_module, "ORPHAN_WAIT_S", 6.0)
    caplog.set_level("WARNING", logger="jc2a.lock")
    start = time.monotonic()
    if child_lives < lock_module.ORPHAN_WAIT_S:
        with FolderLock(out, "the resumed run"):
            assert json.loads((out / LOCK_NAME).read_text())["command"] == "the resumed run"
        assert "waiting up to 6 s for the processes it started to exit" in caplog.text
        assert "taking over the lock of a run whose worker outlives it" in caplog.text
        assert time.monotonic() - start < 6.0
    else:
        with pytest.raises(FolderInUse, match="which has exited, but a process it started still holds the lock"):
            FolderLock(out, "the resumed run").acquire()
        assert time.monotonic() - start >= 6.0
        subprocess.run(["pkill", "-f", "a run whose worker outlives it"], check=False)


def _write_lock(folder: Path, **owner) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    content = {"host": socket.gethostname(), "pid": 0, "since": time.time() - 60, "command": "jc2a train",
               "token": "f" * 32, **owner}  # fmt: skip
    path = folder / LOCK_NAME
    path.write_text(json.dumps(content))
    return path


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


@pytest.mark.parametrize(
    "owner,outcome",
    [
        (lambda: {"pid": _dead_pid()}, "stale"),
        (lambda: {"pid": os.getppid()}, "live"),  # a live process of this host: no flock to go by (a file by hand)
        (lambda: {"pid": 1, "host": "elsewhere.example"}, "elsewhere"),
        (lambda: {"pid": _dead_pid(), "boot": "an-earlier-boot"}, "stale"),  # this host rebooted since
        (lambda: None, "stale"),  # an unreadable lock file that nobody flocks
    ],
    ids=["dead-pid", "live-pid", "other-host", "rebooted", "unreadable"],
)
def test_lock_files_without_a_live_flock(tmp_path, caplog, owner, outcome):
    folder = tmp_path / "run"
    info = owner()
    if info is None:
        folder.mkdir()
        (folder / LOCK_NAME).write_text("{not json")
    else:
        _write_lock(folder, **info)
    lock = FolderLock(folder, "jc2a shards")
    if outcome == "stale":
        with caplog.at_level("WARNING", logger="jc2a.lock"), lock:
            assert json.loads((folder / LOCK_NAME).read_text())["pid"] == os.getpid()
        assert "taking over the lock of" in caplog.text and not (folder / LOCK_NAME).exists()
        return
    with pytest.raises(FolderInUse) as err:
        lock.acquire()
    msg = str(err.value)
    host = info.get("host", socket.gethostname())
    assert msg.startswith(f"{folder}: in use by jc2a train (pid {info['pid']} on host {host} since"), msg
    if outcome == "elsewhere":
        assert "cannot be checked from this host" in msg and f"delete {folder / LOCK_NAME}" in msg
    else:
        assert msg.endswith("; wait for it or use another folder")
    assert (folder / LOCK_NAME).exists() and not lock.held  # left as it was


def test_released_on_exceptions_and_reentrant_in_a_process(tmp_path):
    folder = tmp_path / "run"
    with pytest.raises(RuntimeError, match="boom"):
        with FolderLock(folder, "jc2a train") as outer:
            with FolderLock(folder, "write_shards") as inner:  # this process holds it: shared, not refused
                assert inner.token == outer.token
            assert (folder / LOCK_NAME).exists()  # the inner release leaves the outer's lock
            raise RuntimeError("boom")
    assert not (folder / LOCK_NAME).exists() and not list(folder.iterdir())
    with FolderLock(folder):  # free again
        pass


def test_a_process_started_by_the_owner_joins_through_its_environment(toy_coco, tmp_path):
    out = tmp_path / "out"
    with FolderLock(out, "a driver") as lock:
        refused = subprocess.run(_shards(toy_coco, out), env=ENV, capture_output=True, text=True)
        assert refused.returncode == 2 and f"in use by a driver (pid {os.getpid()}" in refused.stderr
        joined = subprocess.run(_shards(toy_coco, out), env={**ENV, **lock.environment()}, capture_output=True,
                                text=True)  # fmt: skip
        assert joined.returncode == 0, joined.stderr
        assert json.loads((out / LOCK_NAME).read_text())["token"] == lock.token  # still ours: a joiner never removes it
    assert not (out / LOCK_NAME).exists()


def _rank(folder: str, rank: int, conns, results) -> None:
    """Rank `rank` of a 2-process run whose broadcast goes through pipes from rank 0."""

    def broadcast(value):
        if rank == 0:
            for conn in conns:
                conn.send(value)
            return value
        return conns[rank - 1].recv()

    try:
        lock = shared_lock(folder, "jc2a train", rank == 0, broadcast)
        results.put((rank, "held", lock.token, (Path(folder) / LOCK_NAME).exists()))
        time.sleep(0.5)  # both hold it
        lock.release()
    except FolderInUse as exc:
        results.put((rank, "refused", str(exc), None))


def _run_ranks(folder: Path) -> list[tuple]:
    ctx = multiprocessing.get_context("spawn")
    pipes = [ctx.Pipe()]
    results = ctx.Queue()
    procs = [
        ctx.Process(target=_rank, args=(str(folder), 0, [pipes[0][0]], results)),
        ctx.Process(target=_rank, args=(str(folder), 1, [pipes[0][1]], results)),
    ]
    for p in procs:
        p.start()
    out = sorted(results.get(timeout=60) for _ in procs)
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    return out


def test_ranks_of_one_run_share_the_lock_and_are_refused_together(tmp_path):
    folder = tmp_path / "run"
    (r0, r1) = _run_ranks(folder)
    assert r0[:2] == (0, "held") and r1[:2] == (1, "held") and r0[2] == r1[2] and r0[3] and r1[3]
    assert not (folder / LOCK_NAME).exists()  # released by the main rank
    with FolderLock(folder, "another run"):  # the folder is another run's: every rank is refused, none waits
        (r0, r1) = _run_ranks(folder)
    assert r0[:2] == (0, "refused") and r1[:2] == (1, "refused")
    assert f"in use by another run (pid {os.getpid()}" in r0[2] and "(the main process's lock)" in r1[2]


def test_a_second_jc2a_train_into_a_held_run_folder_is_refused(coco_shards, tmp_path):
    """Two `jc2a train` runs into one train.output_dir both exited 0, the second overwriting the first's model
    and appending to its metrics.jsonl. The folder held by a writer (this test process, as the first run), the
    second is refused in one line naming it, before it writes anything."""
    run = tmp_path / "run"
    tiny = ["data.image_size=65", "model.feat_dim=32", "data.min_pixels=200", "data.eval_episodes=4",
            "train.batch_size=2", "train.tracking=none", "train.val_every=0", "train.val_episodes=2",
            "train.max_steps=1", "data.num_workers=0", "model.backbone.frozen=true"]  # fmt: skip
    with FolderLock(run, "jc2a train (the first run)"):
        done = subprocess.run(
            [sys.executable, "-m", "jc2a", "train", "--no-progress", "--config", str(ROOT / "configs/toy.yaml"),
             f"data.shards={coco_shards}", f"train.output_dir={run}", *tiny],
            env=ENV, capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        lines = done.stderr.strip().splitlines()
        assert done.returncode == 2 and lines[-1].startswith(f"jc2a train: error: {run}: in use by jc2a train "
                                                              "(the first run)"), done.stderr[-2000:]  # fmt: skip
        assert sorted(p.name for p in run.iterdir()) == [LOCK_NAME]
