"""The configs shipped with jc2a: the presets a name like `coco20i.yaml` or `fold/0.yaml` resolves to.

They are package data (`jc2a/configs/`), so a non-editable install has them; the repository's top-level `configs/`
is a view of the same folder (a link), for editing and for the paths the README shows.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Union

__all__ = ["FOLDER", "preset", "resolve"]

FOLDER = Path(__file__).resolve().parent / "configs"


def preset(name: Union[str, os.PathLike]) -> Path:
    """The shipped config `name` (e.g. `demo.yaml`, `ablation/table3_p2p.yaml`, `accelerate/cpu_2proc.yaml`).

    Raises:
        FileNotFoundError: no such preset (the message lists where presets live).
    """
    path = FOLDER / name
    if not path.is_file():
        raise FileNotFoundError(f"{name}: no such preset in {FOLDER}")
    return path


def resolve(path: Union[str, os.PathLike]) -> Path:
    """`path` itself when such a file exists; else the shipped preset of that name (a leading `configs/` is the
    repository's view of the presets: `configs/coco20i.yaml` is `coco20i.yaml`); else `path` unchanged, for the
    caller to report as not found."""
    path = Path(path)
    if path.exists() or path.is_absolute():
        return path
    parts = path.parts[1:] if path.parts[:1] == ("configs",) else path.parts
    candidate = FOLDER.joinpath(*parts) if parts else FOLDER
    return candidate if candidate.is_file() else path
