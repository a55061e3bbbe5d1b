"""One writer per folder: an exclusive lock held for the folder's lifetime (a shards `--out`, a run folder).

The lock is a file in the folder, `.jc2a.lock`, a JSON object naming its owner (host, pid, start time, command, a
random token). It is created under a temporary name, `flock`ed, filled, and linked into place (atomic: a second
creator's link fails), so it is never seen half-written and never without its `flock`. A process holds the `flock`
until it ends, so the kernel says whether an owner is alive, whatever happened to it (SIGKILL, a crash):

    the flock is held                           -> a live owner: `FolderInUse`, one line naming folder and owner
    the flock is free, this host, owner dead    -> stale: taken over, with a warning naming the old owner
    the flock is held, this host, owner dead    -> a process it started (a data-loader worker) outlives it: waited
                                                   for (up to ORPHAN_WAIT_S; workers notice a dead parent in ~5 s),
                                                   then taken over, or `FolderInUse` saying so
    the flock is free, another host             -> refused (that host's process cannot be checked from here);
                                                   the message names the lock file to delete if it is gone

Where `fcntl.flock` does not exist the owner's pid is checked instead (this host only). The lock is released
(the file removed) when the `with` block ends, normally or by an exception; a process killed outright leaves a
stale file, which the next writer takes over.

Several processes of one run share one lock: the main process takes it and the others `join` it with its
`token` (`shared_lock` does both, given a broadcast from the main process); a process started by the owner can
join through `JC2A_LOCK_TOKEN` in its environment (`FolderLock.environment()`). Within one process the lock is
re-entrant: a nested `FolderLock` of a folder this process holds shares it.

Bottom layer: imports only jc2a.errors, so the data layer (the shard writer) can take it.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import socket
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional, Union

from jc2a.errors import UserError

try:
    import fcntl
except ImportError:  # Windows: the owner's pid is checked instead
    fcntl = None

__all__ = ["LOCK_NAME", "TOKEN_ENV", "FolderInUse", "FolderLock", "shared_lock"]

LOCK_NAME = ".jc2a.lock"
ORPHAN_WAIT_S = 30.0  # how long to wait for processes a dead owner started (they share its flock) to exit
TOKEN_ENV = "JC2A_LOCK_TOKEN"  # tokens (joined by ',') of locks that a process may join: started by their owner
log = logging.getLogger("jc2a.lock")
_HELD: dict[str, FolderLock] = {}  # folder (resolved) -> the lock this process holds on it


class FolderInUse(UserError):
    """A folder another live process writes to: one line naming the folder and its owner."""


def _boot_id() -> Optional[str]:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def _proc_start(pid: int) -> Optional[str]:
    """The start time of process `pid` (clock ticks since boot, /proc/<pid>/stat field 22), or None."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[-1].split()
    return fields[19] if len(fields) > 19 else None


def _alive(pid: Any, start: Any) -> bool:
    """Whether the process `pid` (started at `start`, /proc's ticks, when known) still runs on this host."""
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return False
    if Path("/proc/self/stat").exists():
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return False
        fields = stat.rsplit(")", 1)[-1].split()
        if not fields or fields[0] in ("Z", "X"):  # a zombie has exited (its parent has not collected it yet)
            return False
        return start is None or len(fields) <= 19 or fields[19] == str(start)  # else: the pid was reused
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _describe(owner: dict) -> str:
    """`jc2a train (pid 12 on host h since 2026-05-09 07:35:25)` from a lock file's content."""
    since = owner.get("since")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(since)) if isinstance(since, (int, float)) else "?"
    command = str(owner.get("command") or "another process")[:200]
    return f"{command} (pid {owner.get('pid', '?')} on host {str(owner.get('host', '?'))[:100]} since {when})"


def _read(fd: int) -> Optional[dict]:
    """The JSON object of an open lock file, or None when it is not one."""
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        data = os.read(fd, 65536)
        owner = json.loads(data)
    except (OSError, ValueError, RecursionError):
        return None
    return owner if isinstance(owner, dict) else None


def _try_flock(fd: int) -> bool:
    """Take the exclusive flock of `fd` without waiting: True when taken (or flock does not exist here)."""
    if fcntl is None:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError:  # a filesystem without flock: the pid is what can be checked
        return True
    return True


def _tokens() -> set[str]:
    return {t for t in os.environ.get(TOKEN_ENV, "").split(",") if t}


class FolderLock:
    """The exclusive lock of `folder` (made if absent) for `purpose` (named to a second writer, e.g. "jc2a train").

    `with FolderLock(out, "jc2a shards"):` holds it for the block. `acquire()` raises FolderInUse when a live
    process holds it and takes over a stale one with a warning. `token` identifies the lock; `join(token)` shares
    it from another process of the same run.
    """

    def __init__(self, folder: Union[str, os.PathLike], purpose: str = "") -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self.purpose = purpose or " ".join(Path(a).name if i == 0 else a for i, a in enumerate(sys.argv))
        self.token: Optional[str] = None
        self._fd: Optional[int] = None
        self._pid: Optional[int] = None
        self._depth = 0  # nested acquisitions in this process
        self._shared: Optional[FolderLock] = None  # the lock this process already holds on the folder

    # ------------------------------------------------------------------ public

    @property
    def held(self) -> bool:
        return self.token is not None

    def acquire(self) -> FolderLock:
        """Take the lock (or share the one this process, or the owner that started it, holds); FolderInUse when a
        live process holds it."""
        if self.held:
            self._depth += 1
            return self
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UserError(f"{self.folder}: cannot create the folder ({exc.strerror or exc})") from None
        key = str(self.folder.resolve())
        mine = _HELD.get(key)
        if mine is not None and mine._pid == os.getpid() and mine.held:
            self._shared, self.token, self._depth = mine, mine.token, 1
            mine._depth += 1
            return self
        for _ in range(50):  # each turn ends, or sees the lock file change under it and looks again
            if self._create():
                break
            outcome = self._existing()
            if outcome == "taken":
                break
        else:  # pragma: no cover - 50 changes of the lock file while we looked
            raise FolderInUse(f"{self.folder}: its lock file {self.path} keeps changing; is another writer starting?")
        self._depth = 1
        if self._fd is not None:
            _HELD[key] = self
        return self

    def join(self, token: str) -> FolderLock:
        """Share the lock that another process of this run took (its `token`): the lock file, where this process
        can see it (a shared filesystem), must carry that token; where it cannot (another node's local disk) the
        token is trusted. Joining never writes or removes the lock file."""
        if not isinstance(token, str) or not token:
            raise ValueError(f"a lock token is a non-empty string, got {token!r}")
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            fd = None
        except OSError as exc:
            raise UserError(f"{self.path}: cannot read the lock file ({exc.strerror or exc})") from None
        if fd is not None:
            try:
                owner = _read(fd)
            finally:
                os.close(fd)
            if owner is not None and owner.get("token") != token:
                raise FolderInUse(
                    f"{self.folder}: in use by {_describe(owner)}, not by this run; wait for it or use another folder"
                )
        self.token, self._depth = token, 1
        return self

    def release(self) -> None:
        """Give the lock back: the outermost release of the owner removes the lock file. Never in a forked child."""
        if not self.held:
            return
        self._depth -= 1
        if self._depth > 0:
            return
        if self._shared is not None:
            self._shared.release()
            self._shared, self.token = None, None
            return
        fd, self._fd, self.token = self._fd, None, None
        if fd is None or self._pid != os.getpid():  # joined, or a forked child: the owner removes it
            return
        try:
            if os.stat(self.path).st_ino == os.fstat(fd).st_ino:  # still ours (not taken over as stale)
                os.unlink(self.path)
        except OSError:
            pass
        finally:
            os.close(fd)  # the flock goes with the last descriptor
            key = str(self.folder.resolve())
            if _HELD.get(key) is self:
                del _HELD[key]

    def environment(self) -> dict[str, str]:
        """`{JC2A_LOCK_TOKEN: ...}` for the environment of a process this one starts that writes the same folder."""
        if not self.held:
            raise ValueError(f"{self.folder}: the lock is not held")
        return {TOKEN_ENV: ",".join(sorted(_tokens() | {self.token}))}

    def owner(self) -> Optional[dict]:
        """The lock file's content (host, pid, since, command, token), or None when there is none."""
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except OSError:
            return None
        try:
            return _read(fd)
        finally:
            os.close(fd)

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()

    # ------------------------------------------------------------------ taking it

    def _content(self) -> bytes:
        self.token = secrets.token_hex(16)
        return json.dumps(
            {
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "since": time.time(),
                "command": self.purpose,
                "argv": sys.argv[:20],
                "token": self.token,
                "boot": _boot_id(),
                "start": _proc_start(os.getpid()),
            }
        ).encode()

    def _new_file(self) -> tuple[int, Path]:
        """A temporary lock file beside the lock, flocked by us and filled: (descriptor, path)."""
        tmp = self.folder / f"{LOCK_NAME}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
        try:
            fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        except OSError as exc:
            raise UserError(f"{self.path}: cannot create the lock file ({exc.strerror or exc})") from None
        try:
            _try_flock(fd)
            os.write(fd, self._content())
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            tmp.unlink(missing_ok=True)
            self.token = None
            raise
        return fd, tmp

    def _create(self) -> bool:
        """Link a new lock file into place when there is none: True when it is ours."""
        if self.path.exists() or self.path.is_symlink():
            return False
        fd, tmp = self._new_file()
        try:
            os.link(tmp, self.path)  # atomic: fails when another writer's lock appeared meanwhile
        except FileExistsError:
            os.close(fd)
            self.token = None
            return False
        except OSError as exc:
            os.close(fd)
            self.token = None
            raise UserError(f"{self.path}: cannot create the lock file ({exc.strerror or exc})") from None
        finally:
            tmp.unlink(missing_ok=True)
        self._fd, self._pid = fd, os.getpid()
        return True

    def _existing(self) -> str:
        """Look at the lock file that is there: "taken" (it was stale, now ours), "again" (it changed: look again),
        or FolderInUse."""
        try:
            fd = os.open(self.path, os.O_RDWR)
        except FileNotFoundError:
            return "again"
        except OSError as exc:
            raise UserError(f"{self.path}: cannot read the lock file ({exc.strerror or exc})") from None
        try:
            free = _try_flock(fd)
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if not same:  # released or taken over while we looked
                return "again"
            owner = _read(fd)
            if owner is not None and owner.get("token") in _tokens():
                self.token = owner["token"]  # started by the owner to write the same folder: shared
                return "taken"
            if not free and self._orphaned(owner):
                free = self._wait_for_orphans(fd, owner)
            if not free:
                raise FolderInUse(self._busy(owner))
            here = owner is not None and owner.get("host") == socket.gethostname()
            rebooted = here and owner.get("boot") not in (None, _boot_id())
            if owner is not None and not rebooted:
                if not here:
                    raise FolderInUse(
                        f"{self.folder}: in use by {_describe(owner)}, which cannot be checked from this host; "
                        f"wait for it or use another folder (delete {self.path} if it is not running)"
                    )
                if _alive(owner.get("pid"), owner.get("start")):
                    raise FolderInUse(self._busy(owner))
            self._take_over(owner)
            return "taken"
        finally:
            os.close(fd)  # our flock of the old file, if any, goes with it (after the new one is in place)

    @staticmethod
    def _orphaned(owner: Optional[dict]) -> bool:
        """The owner ran on this host and has exited, so whoever holds its flock is a process it started (forked
        children share the flock): a data-loader worker, which exits once it sees its parent gone."""
        return (
            owner is not None
            and owner.get("host") == socket.gethostname()
            and owner.get("boot") in (None, _boot_id())
            and not _alive(owner.get("pid"), owner.get("start"))
        )

    def _wait_for_orphans(self, fd: int, owner: dict) -> bool:
        """Wait (bounded) for the processes a dead owner started to release its flock: True once it is ours."""
        log.warning(
            "%s: %s has exited; waiting up to %.0f s for the processes it started to exit",
            self.folder, _describe(owner), ORPHAN_WAIT_S,
        )  # fmt: skip
        deadline = time.monotonic() + ORPHAN_WAIT_S
        while time.monotonic() < deadline:
            time.sleep(0.2)
            if _try_flock(fd):
                return True
        return False

    def _busy(self, owner: Optional[dict]) -> str:
        if owner is None:
            return f"{self.folder}: in use by another process (its lock file {self.path} is unreadable); " \
                "wait for it or use another folder"  # fmt: skip
        gone = ", which has exited, but a process it started still holds the lock" if self._orphaned(owner) else ""
        return f"{self.folder}: in use by {_describe(owner)}{gone}; wait for it or use another folder"

    def _take_over(self, owner: Optional[dict]) -> None:
        """Replace a stale lock file (whose flock we hold) with ours."""
        fd, tmp = self._new_file()
        try:
            os.replace(tmp, self.path)
        except OSError as exc:
            os.close(fd)
            tmp.unlink(missing_ok=True)
            self.token = None
            raise UserError(f"{self.path}: cannot replace the stale lock file ({exc.strerror or exc})") from None
        self._fd, self._pid = fd, os.getpid()
        old = _describe(owner) if owner is not None else "an unreadable lock file"
        log.warning("%s: taking over the lock of %s, which is no longer running", self.folder, old)


def shared_lock(
    folder: Union[str, os.PathLike],
    purpose: str,
    is_main: bool,
    broadcast: Callable[[Any], Any] = lambda value: value,
) -> FolderLock:
    """The lock of `folder` for a run of several processes: the main process takes it, the others join it.

    `broadcast(value)` is called by every process at once and returns the main process's `value` everywhere
    (accelerate: `lambda v: broadcast_object_list([v])[0]`; the identity for one process). Every process either
    returns the lock (release it, or use it as a context manager, in each) or raises: FolderInUse in all of
    them when the folder is another run's, so none waits for the others in a collective.
    """
    lock = FolderLock(folder, purpose)
    outcome: Any = None
    error: Optional[BaseException] = None
    if is_main:
        try:
            lock.acquire()
            outcome = ("held", lock.token)
        except Exception as exc:  # every process must learn it
            error, outcome = exc, ("refused", str(exc), isinstance(exc, UserError))
    outcome = broadcast(outcome)
    if error is not None:
        raise error
    if not isinstance(outcome, (tuple, list)) or not outcome:
        raise RuntimeError(f"shared_lock: the broadcast gave {outcome!r}")
    if outcome[0] == "refused":
        raise (FolderInUse if outcome[2] else RuntimeError)(f"{outcome[1]} (the main process's lock)")
    if not is_main:
        lock.join(outcome[1])
    return lock
