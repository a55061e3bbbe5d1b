"""Files the runs write and read as data: safetensors only (nothing is ever unpickled), written atomically.

The CKMM prototype bank file lives here: the model's `PrototypeBank` holds the tensors (Eqs. 11-12) and knows
no files; a bank file adds a format tag, the feature dim and a fingerprint of what the bank was built from.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Mapping, Optional, Union

import torch

__all__ = ["BANK_FORMAT", "load_bank", "save_bank", "write_safetensors"]

BANK_FORMAT = "jc2a-prototype-bank/2"  # safetensors; /1 was a torch.save pickle, no longer read


def write_safetensors(
    path: Union[str, os.PathLike], tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]
) -> Path:
    """`tensors` and string `metadata` to `path` as safetensors, atomically: a temporary name in the same folder,
    then `os.replace`, so that a crash or a full disk leaves the previous file (or none), never half of one."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        save_file(dict(tensors), os.fspath(tmp), metadata=dict(metadata))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def save_bank(bank, path: Union[str, os.PathLike], fingerprint: Mapping[str, str]) -> Path:
    """Write a `PrototypeBank` to `path` (safetensors, atomically).

    Tensors `class_ids` (int64), `sums` (float64), `counts` (int64); string metadata `format` (`BANK_FORMAT`),
    `dim`, and `fingerprint` (JSON of a str -> str dict: what the bank was built from).
    """
    bad = {k: v for k, v in fingerprint.items() if not isinstance(k, str) or not isinstance(v, str)}
    if bad:
        raise TypeError(f"a bank fingerprint maps str to str; not so: {bad!r}")
    metadata = {"format": BANK_FORMAT, "dim": str(bank.dim), "fingerprint": json.dumps(dict(fingerprint))}
    return write_safetensors(path, bank.state_tensors(), metadata)


def load_bank(bank, path: Union[str, os.PathLike], fingerprint: Optional[Mapping[str, str]] = None) -> None:
    """Read a bank file written by `save_bank` into `bank`, refusing anything else with one line that starts with
    the path; on refusal the bank is left as it was.

    Only safetensors is read: nothing in the file is ever unpickled or executed.

    Args:
        bank: the model's `PrototypeBank`.
        path: the bank file.
        fingerprint: when given, the file's fingerprint must equal it, key for key.

    Raises:
        FileNotFoundError: no such file.
        ValueError: a directory, an empty file, not a safetensors bank of `BANK_FORMAT`, other class ids or dim,
            wrong tensors (names, dtypes, shapes), non-finite sums or negative counts, or a fingerprint that
            differs (the first differing key is named, with both values).
    """
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: prototype bank file not found")
    if path.is_dir():
        raise ValueError(f"{path}: is a directory, not a prototype bank file")
    if path.stat().st_size == 0:
        raise ValueError(f"{path}: empty file, not a prototype bank")
    tensors = {}
    try:
        with safe_open(os.fspath(path), framework="pt", device="cpu") as f:
            metadata, keys = f.metadata() or {}, list(f.keys())
            if metadata.get("format") == BANK_FORMAT:
                tensors = {name: f.get_tensor(name) for name in keys}
    except SafetensorError as exc:  # a pickle, random bytes, a truncated file: refused before anything is read
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ValueError(f"{path}: not a safetensors prototype bank ({reason})") from None
    if metadata.get("format") != BANK_FORMAT:
        raise ValueError(f"{path}: not a prototype bank (no safetensors metadata format={BANK_FORMAT!r})")
    if set(keys) == {"class_ids", "sums", "counts"} and metadata.get("dim") != str(bank.dim):
        raise ValueError(
            f"{path}: prototype bank was built with dim={metadata.get('dim')}, this model needs dim={bank.dim}; "
            f"rebuild it with `jc2a bank` or delete the file"
        )
    if fingerprint is not None:
        _check_fingerprint(path, metadata.get("fingerprint"), fingerprint)
    bank.load_state_tensors(tensors, source=str(path))


def _check_fingerprint(path: Path, stored: Optional[str], expected: Mapping[str, str]) -> None:
    """Refuse a bank whose fingerprint differs from `expected`, naming the first differing key and both values."""
    try:
        theirs = json.loads(stored) if stored is not None else None
    except json.JSONDecodeError:
        theirs = None
    if not isinstance(theirs, dict):
        raise ValueError(
            f"{path}: prototype bank has no readable fingerprint; rebuild it with `jc2a bank` or delete the file"
        )
    for key in [*expected, *sorted(k for k in theirs if k not in expected)]:
        if theirs.get(key) != expected.get(key):
            raise ValueError(
                f"{path}: prototype bank fingerprint differs at {key!r}: the file has {theirs.get(key)!r}, "
                f"expected {expected.get(key)!r}; rebuild it with `jc2a bank` or delete the file"
            )
