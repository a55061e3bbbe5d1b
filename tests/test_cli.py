"""`jc2a`'s error handling: what the user gave wrong is one line and exit status 2; a bug keeps its traceback."""

from __future__ import annotations

import errno
import subprocess
import sys
import types

import pytest

from jc2a import cli
from jc2a.config import ConfigError
from jc2a.errors import MissingPackage, RecordError, RemoteError, ShardWriteError, StreamError, UserError, WriteError

FAKE = "jc2a_test_fake_command"

# what the fake command raises, by name
ERRORS = {
    "value": lambda: ValueError("a bug: an internal check"),
    "runtime": lambda: RuntimeError("a bug: an internal state"),
    "type": lambda: TypeError("a bug: a wrong call"),
    "oserror": lambda: OSError("something the OS said, no errno"),
    "eio": lambda: OSError(errno.EIO, "Input/output error"),
    "user": lambda: UserError("x.json: not a COCO instances file"),
    "config": lambda: ConfigError("t.yaml: unknown key 'data.foldd'"),
    "record": lambda: RecordError("record k of s.tar: unreadable image"),
    "stream": lambda: StreamError("split 'train' at /s: 5 consecutive unreadable shards"),
    "shardwrite": lambda: ShardWriteError("/s/train-000000.tar.tmp: cannot write (No space left on device)"),
    "write": lambda: WriteError("/out/q_mask.png: could not be written"),
    "remote": lambda: RemoteError("http://h/s.tar: HTTP 500 (3 tries)"),
    "package": lambda: MissingPackage("s3://b/x: install s3fs"),
    "missing": lambda: FileNotFoundError("m.safetensors: model file not found"),
    "denied": lambda: PermissionError(errno.EACCES, "Permission denied", "/root/x"),
    "folder": lambda: IsADirectoryError(errno.EISDIR, "Is a directory", "/tmp"),
    "notfolder": lambda: NotADirectoryError(errno.ENOTDIR, "Not a directory", "/tmp/file/run"),
    "full": lambda: OSError(errno.ENOSPC, "No space left on device"),
    "quota": lambda: OSError(errno.EDQUOT, "Disk quota exceeded"),
    "readonly": lambda: OSError(errno.EROFS, "Read-only file system"),
    # torch re-raises a DataLoader worker's error as a RuntimeError naming it when it cannot rebuild its type
    "worker_stream": lambda: RuntimeError(
        "Caught StreamError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
        "  File \"x.py\", line 1, in f\njc2a.errors.StreamError: split 'val' at /s: no episode for 60 s"
    ),
    "worker_bug": lambda: RuntimeError(
        "Caught ValueError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
        '  File "x.py", line 1, in f\nValueError: a bug in a worker'
    ),
}
USERS = ["user", "config", "record", "stream", "shardwrite", "write", "remote", "package", "missing", "denied",
         "folder", "notfolder", "full", "quota", "readonly", "worker_stream"]  # fmt: skip
BUGS = ["value", "runtime", "type", "oserror", "eio", "worker_bug"]


@pytest.fixture
def fake_command(monkeypatch):
    """`jc2a fake WHAT`: a command that raises `ERRORS[WHAT]`."""
    module = types.ModuleType(FAKE)

    def add_arguments(parser):
        parser.add_argument("what", choices=sorted(ERRORS))

    def run(args):
        raise ERRORS[args.what]()

    module.add_arguments, module.run = add_arguments, run
    monkeypatch.setitem(sys.modules, FAKE, module)
    monkeypatch.setitem(cli.COMMANDS, "fake", (FAKE, "raises what it is told"))


def test_every_error_is_sorted_into_users_or_bugs():
    assert sorted(USERS + BUGS) == sorted(ERRORS)


@pytest.mark.parametrize("what", USERS)
def test_a_users_error_is_one_line_and_exit_status_2(fake_command, capsys, what):
    assert cli.main(["fake", what]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("jc2a fake: error: "), err
    assert "Traceback" not in captured.err and captured.out == ""
    expected = cli.one_line(ERRORS[what]())
    assert err == f"jc2a fake: error: {expected}"


def test_a_worker_error_is_its_original_message_only(fake_command, capsys):
    assert cli.main(["fake", "worker_stream"]) == 2
    assert capsys.readouterr().err.strip() == "jc2a fake: error: split 'val' at /s: no episode for 60 s"


@pytest.mark.parametrize("what", BUGS)
def test_a_bug_propagates(fake_command, what):
    """A plain ValueError (or RuntimeError, TypeError, an OSError that is not a full disk) is a bug: it is raised
    on, to print its traceback, instead of one line and exit status 2."""
    expected = type(ERRORS[what]())
    with pytest.raises(expected) as info:
        cli.main(["fake", what])
    assert type(info.value) is expected and not isinstance(info.value, UserError)


def test_a_plain_value_error_prints_its_traceback():
    """The whole command as a user runs it: a ValueError inside a command ends in a traceback, status 1, not 2."""
    code = (
        "import sys, types\n"
        "from jc2a import cli\n"
        "m = types.ModuleType('fake')\n"
        "m.add_arguments = lambda p: None\n"
        "def run(args):\n"
        "    raise ValueError('a bug: an internal check')\n"
        "m.run = run\n"
        "sys.modules['fake'] = m\n"
        "cli.COMMANDS['fake'] = ('fake', 'raises')\n"
        "raise SystemExit(cli.main(['fake']))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr
    assert "Traceback (most recent call last)" in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == "ValueError: a bug: an internal check"
    assert "error:" not in proc.stderr.split("Traceback")[0]


def test_stream_error_is_a_runtime_error_and_a_users_error():
    assert issubclass(StreamError, RuntimeError) and issubclass(StreamError, UserError)
    assert issubclass(UserError, ValueError) and issubclass(ConfigError, UserError)
    assert issubclass(ShardWriteError, OSError) and issubclass(RemoteError, OSError)
    from jc2a.data import episodes, locations, records, shards

    assert episodes.StreamError is StreamError and records.RecordError is RecordError  # the old names still work
    assert locations.RemoteError is RemoteError and locations.MissingPackage is MissingPackage
    assert shards.ShardWriteError is ShardWriteError


@pytest.mark.parametrize(
    "argv, message",
    [
        (["bench", "hpam", "--repeats", "0"], "--repeats must be >= 1, got 0"),
        (["toy", "--out", "{tmp}/t", "--size", "8"], "--size must be at least 32 pixels, got 8"),
        (["shards", "coco", "--out", "{tmp}/s"], "coco needs --root, or both --images and --annotations"),
    ],
)
def test_real_commands_refuse_bad_arguments_in_one_line(tmp_path, capsys, argv, message):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"jc2a {argv[0]}: error: {message}", err
