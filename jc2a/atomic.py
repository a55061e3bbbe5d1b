"""Writing a file so that a crash or a full disk leaves the previous file (or none), never half of one."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator, Union

__all__ = ["replacing", "write_text"]


@contextlib.contextmanager
def replacing(path: Union[str, os.PathLike]) -> Iterator[Path]:
    """A temporary name beside `path` (same folder, so the rename is atomic; the folder is made) for the block to
    write; renamed onto `path` when the block ends, removed when it raises (the error goes on)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: Union[str, os.PathLike], text: str) -> Path:
    """`text` (UTF-8) to `path`, atomically (`replacing`)."""
    with replacing(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)
