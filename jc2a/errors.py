"""Errors that cross layers: problems with what the user gave, which `jc2a` reports in one line.

Bottom layer: no jc2a imports. `jc2a.cli` turns a `UserError` (and a missing, unreadable or full file) into one
line, `jc2a COMMAND: error: MESSAGE`, and exit status 2; any other ValueError or RuntimeError is a bug and keeps
its traceback. Raise a `UserError` (or one of the classes below) where the input is at fault: a file, a record,
a key, a command-line argument, a weights file, a mask, a checkpoint. An argument check of a class or function
that only a program can get wrong stays a ValueError.
"""

from __future__ import annotations

__all__ = [
    "MissingPackage",
    "Preempted",
    "RecordError",
    "RemoteError",
    "ShardWriteError",
    "StreamError",
    "UserError",
    "WriteError",
]


class UserError(ValueError):
    """A problem with what the user gave (a file, a record, a key, an argument); its message is one line naming it."""


class RecordError(UserError):
    """A record that cannot be read: its message names the key (and shard where known)."""


class StreamError(UserError, RuntimeError):
    """A stream that cannot go on (nothing readable, no episode can be formed); one line naming split and place.

    A RuntimeError, as it always was (the stream stopped), and a UserError (the shards or the config are at fault).
    """


class WriteError(UserError, OSError):
    """An output that could not be written (a full disk, an unwritable folder, a format the writer refuses): one
    line naming the path. An OSError too, for callers that catch those."""


class ShardWriteError(WriteError):
    """Writing shards failed (disk full, unwritable): one line naming the path; the complete shards stay."""


class RemoteError(UserError, OSError):
    """A remote read that failed every try (or answered with something that is not the file): names the URL."""


class MissingPackage(RemoteError):
    """A location whose fsspec filesystem is not installed (`s3://` without s3fs, say): names the package."""


class Preempted(Exception):
    """A training run stopped on SIGTERM or SIGUSR1 (what SLURM sends before it preempts a job) after writing a
    checkpoint: `jc2a train` exits with `PREEMPTED_EXIT` and `launch/slurm.sh` requeues the job, which resumes."""

    exit_status = 75  # EX_TEMPFAIL: try again later
