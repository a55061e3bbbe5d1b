"""The `jc2a` command: one subcommand per job, each implemented by the module that owns it."""

from __future__ import annotations

import argparse
import errno
import importlib
import os
import sys
from typing import Optional, Sequence

from jc2a.errors import Preempted, UserError

# subcommand -> (module, one-line help). Each module defines `add_arguments(parser)` and `run(args) -> int`.
COMMANDS = {
    "config": ("jc2a.runs.config_cmd", "print a resolved config as YAML, or the reference of every key"),
    "toy": ("jc2a.runs.toy_cmd", "write the built-in procedural toy dataset (COCO or VOC layout)"),
    "shards": ("jc2a.runs.shards_cmd", "convert COCO 2014 or VOC 2012 + SBD into webdataset shards"),
    "preview": ("jc2a.runs.commands:Preview", "stream episodes from shards and save them as pictures"),
    "bank": ("jc2a.runs.commands:Bank", "build CKMM's prototype bank over a fold's base-class training images"),
    "train": ("jc2a.runs.commands:Train", "train JC2A (accelerate: CPU, 1 GPU, N GPUs, N nodes, DeepSpeed)"),
    "convert-weights": ("jc2a.runs.commands:ConvertWeights", "convert PFENet's .pth weights for pfenet_resnet50/101"),
    "eval": ("jc2a.runs.commands:Eval", "evaluate a trained model at the paper's protocol: results.json/.md, figures"),
    "predict": ("jc2a.runs.commands:Predict", "segment your own query images from K annotated support images"),
    "pretrain": ("jc2a.runs.pretrain", "pretrain a small backbone on the toy data: the stand-in for ImageNet weights"),
    "demo": ("jc2a.runs.commands:Demo", "the main job on the toy data: pretrain, train, evaluate, show JC2A learning"),
    "summary": ("jc2a.runs.commands:Summary", "parameter counts of the paper's Table 3 rows"),
    "bench": ("jc2a.bench.command", "benchmarks that print ratios measured in one run"),
}


def build_parser(command: Optional[str] = None, every: bool = False) -> argparse.ArgumentParser:
    """The parser. Only `command`'s module is imported (all of them with `every`, none for `jc2a --help`), so
    start-up stays quick."""
    parser = argparse.ArgumentParser(prog="jc2a", description=__doc__)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module)
        if every or command == name:
            load(module).add_arguments(p)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    args = build_parser(command if command in COMMANDS else None).parse_args(argv)
    try:
        return int(load(args._module).run(args) or 0)
    except KeyboardInterrupt:  # Ctrl-C: one line, the shell's status for SIGINT
        print(f"jc2a {args.command}: interrupted", file=sys.stderr)
        return 130
    except Preempted as exc:  # SIGTERM / SIGUSR1 after a checkpoint: a status the SLURM script requeues on
        print(f"jc2a {args.command}: {one_line(exc)}", file=sys.stderr)
        marker = os.environ.get("JC2A_PREEMPTED_FILE")  # launch/slurm.sh's, as a launcher may not pass the status on
        if marker:
            with open(marker, "w") as f:
                f.write(one_line(exc) + "\n")
        return Preempted.exit_status
    except Exception as exc:
        if not is_users(exc):
            raise  # a bug (any other ValueError, RuntimeError, ...): its traceback
        # Bad input or a full disk: one clear line naming the file, record or key; no traceback.
        print(f"jc2a {args.command}: error: {one_line(exc)}", file=sys.stderr)
        return 2


def load(target: str):
    """The object of a COMMANDS entry: a module (`jc2a.runs.shards_cmd`) or one of its attributes
    (`jc2a.runs.commands:Train`), either with `add_arguments(parser)` and `run(args)`."""
    module, _, attr = target.partition(":")
    found = importlib.import_module(module)
    return getattr(found, attr) if attr else found


# An OSError with one of these is the user's too: a full disk, a full quota, a read-only file system.
USER_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS})


def is_users(exc: BaseException) -> bool:
    """Whether `exc` is a problem with what the user gave (one line, exit status 2), not a bug (a traceback):
    a `UserError` (ConfigError, RecordError, StreamError, ...), a missing or forbidden path, a folder where a file
    should be or a file where a folder should be, a full or read-only disk, or a UserError re-raised from a
    DataLoader worker as a RuntimeError naming it."""
    if isinstance(exc, (UserError, FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
        return True
    if isinstance(exc, OSError):
        return exc.errno in USER_ERRNOS
    if isinstance(exc, RuntimeError) and "Original Traceback" in str(exc):
        # torch re-raises a worker's error as its own type when it can, else as a RuntimeError naming it
        last = str(exc).strip().splitlines()[-1]
        return last.split(":", 1)[0].rsplit(".", 1)[-1] in _user_error_names()
    return False


def _user_error_names() -> set[str]:
    """Names of UserError and every subclass of it defined so far."""
    names, todo = set(), [UserError]
    while todo:
        cls = todo.pop()
        names.add(cls.__name__)
        todo += cls.__subclasses__()
    return names


def one_line(exc: BaseException) -> str:
    """The message of an error; for one re-raised from a DataLoader worker, the original message only."""
    text = str(exc).strip()
    if "Original Traceback" in text:  # DataLoader: "Caught X in DataLoader worker ... Traceback ... X: message"
        last = text.splitlines()[-1]
        text = last.split(": ", 1)[1] if ": " in last else last
    return text


if __name__ == "__main__":
    raise SystemExit(main())
