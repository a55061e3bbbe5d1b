"""Files the runs write and read as data: model, bank and backbone weights files, run-folder names. Safetensors
(nothing is ever unpickled; torch weights files only weights-only), written atomically.

The CKMM prototype bank file lives here: the model's `PrototypeBank` holds the tensors (Eqs. 11-12) and knows
no files; a bank file adds a format tag, the feature dim and a fingerprint of what the bank was built from.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import torch
import yaml
from torch import nn

from jc2a.atomic import replacing
from jc2a.config import Config, to_dict
from jc2a.errors import UserError

__all__ = [
    "BANK_FILE",
    "BANK_FORMAT",
    "CONFIG_FILE",
    "MODEL_FILE",
    "WEIGHTS",
    "file_sha256",
    "load_bank",
    "read_model_file",
    "read_torch_weights",
    "read_weights",
    "resolve_checkpoint",
    "save_bank",
    "save_model_file",
    "write_safetensors",
]

BANK_FORMAT = "jc2a-prototype-bank/2"  # safetensors; /1 was a torch.save pickle, no longer read
MODEL_FORMAT = "jc2a-model/1"
MODEL_FILE = "model.safetensors"
BANK_FILE = "bank.safetensors"
CONFIG_FILE = "config.yaml"


def write_safetensors(
    path: Union[str, os.PathLike], tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]
) -> Path:
    """`tensors` and string `metadata` to `path` as safetensors, atomically: a temporary name in the same folder,
    then `os.replace`, so that a crash or a full disk leaves the previous file (or none), never half of one."""
    from safetensors.torch import save_file

    with replacing(path) as tmp:
        save_file(dict(tensors), os.fspath(tmp), metadata=dict(metadata))
    return Path(path)


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
        raise UserError(f"{path}: is a directory, not a prototype bank file")
    if path.stat().st_size == 0:
        raise UserError(f"{path}: empty file, not a prototype bank")
    tensors = {}
    try:
        with safe_open(os.fspath(path), framework="pt", device="cpu") as f:
            metadata, keys = f.metadata() or {}, list(f.keys())
            if metadata.get("format") == BANK_FORMAT:
                tensors = {name: f.get_tensor(name) for name in keys}
    except SafetensorError as exc:  # a pickle, random bytes, a truncated file: refused before anything is read
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserError(f"{path}: not a safetensors prototype bank ({reason})") from None
    if metadata.get("format") != BANK_FORMAT:
        raise UserError(f"{path}: not a prototype bank (no safetensors metadata format={BANK_FORMAT!r})")
    if set(keys) == {"class_ids", "sums", "counts"} and metadata.get("dim") != str(bank.dim):
        raise UserError(
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
    except (json.JSONDecodeError, RecursionError):  # not JSON, or nested deeper than the parser goes
        theirs = None
    if not isinstance(theirs, dict):
        raise UserError(
            f"{path}: prototype bank has no readable fingerprint; rebuild it with `jc2a bank` or delete the file"
        )
    for key in [*expected, *sorted(k for k in theirs if k not in expected)]:
        if theirs.get(key) != expected.get(key):
            raise UserError(
                f"{path}: prototype bank fingerprint differs at {key!r}: the file has {theirs.get(key)!r}, "
                f"expected {expected.get(key)!r}; rebuild it with `jc2a bank` or delete the file"
            )


# --------------------------------------------------------------------------- backbone weights


def file_sha256(path: Union[str, os.PathLike]) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_torch_weights(path: Union[str, os.PathLike]) -> dict[str, torch.Tensor]:
    """The tensors of a torch weights file, read weights-only on the CPU.

    Accepts a plain state dict, or a dict holding one under `state_dict` (a training checkpoint); a `module.`
    prefix (DataParallel) is stripped.

    Args:
        path: the .pth file.

    Raises:
        FileNotFoundError: no such file.
        ValueError: a directory, not a torch file, pickled objects that are not plain data (refused without being
            run), or no state dict of tensors in it (the first non-tensor entry is named).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: weights file not found")
    if path.is_dir():
        raise UserError(f"{path}: is a directory, not a weights file")
    try:
        data = torch.load(path, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as exc:
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        blocked = [line for line in lines if "GLOBAL" in line]
        if blocked:
            raise UserError(
                f"{path}: holds pickled objects that are not plain weights data, refused without running them "
                f"({blocked[0]})"
            ) from None
        fallback = lines[-1] if lines else type(exc).__name__
        reason = next((line for line in lines if "Unsupported" in line or "error" in line.lower()), fallback)
        raise UserError(f"{path}: not a torch weights file ({reason})") from None
    except Exception as exc:  # EOFError (empty), KeyError / RuntimeError (text, random bytes, truncated zip)
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"{path}: not a torch weights file ({type(exc).__name__}: {reason})") from None
    if isinstance(data, Mapping) and isinstance(data.get("state_dict"), Mapping):
        data = data["state_dict"]
    if not isinstance(data, Mapping):
        raise UserError(f"{path}: holds a {type(data).__name__}, not a state dict (a dict of tensors)")
    out: dict[str, torch.Tensor] = {}
    for key, value in data.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise UserError(f"{path}: entry {key!r} is of type {type(value).__name__}, not a tensor: not a state dict")
        out[key.removeprefix("module.")] = value
    return out


def read_weights(path: Union[str, os.PathLike]) -> tuple[dict[str, torch.Tensor], str]:
    """A local backbone weights file: `(tensors, source)`, `source` = `file:<basename> sha256:<hex>`.

    safetensors (any name) is read as such; anything else as a torch file, weights-only (`read_torch_weights`):
    nothing in it is unpickled beyond tensors and plain containers. The model layer loads the tensors strictly
    (`jc2a.model.backbone.load_features_state`).

    Raises:
        FileNotFoundError: no such file.
        ValueError: neither safetensors nor a weights-only torch state dict (one line naming the file).
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"backbone weights file not found: {path}")
    with open(path, "rb") as f:
        head = f.read(8)
    source = f"file:{path.name} sha256:{file_sha256(path)}"
    zip_or_pickle = head[:2] == b"PK" or head[:1] == b"\x80"
    if not zip_or_pickle:
        try:
            return load_file(os.fspath(path)), source
        except SafetensorError as exc:
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise UserError(f"{path}: neither a safetensors nor a torch weights file ({reason})") from None
    return read_torch_weights(path), source


# --------------------------------------------------------------------------- model files


def save_model_file(path: Union[str, os.PathLike], model: nn.Module, cfg: Config, **meta: Any) -> Path:
    """Every tensor the evaluator needs (trainable weights, frozen backbone, buffers, CKMM bank) as safetensors,
    written atomically; the resolved config and `meta` go into the file's metadata."""
    from jc2a.runs.files import write_safetensors

    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    metadata = {"format": MODEL_FORMAT, "config": yaml.safe_dump(to_dict(cfg), sort_keys=False)}
    backbone = getattr(model, "backbone", None)
    if backbone is not None and "backbone_weights" not in meta:  # what the backbone started from, for reports
        meta["backbone_weights"] = backbone.weights_source
    metadata.update({k: json.dumps(v) for k, v in meta.items()})
    return write_safetensors(path, tensors, metadata)


def read_model_file(path: Union[str, os.PathLike]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a model file; only safetensors is read, nothing is unpickled.

    Raises FileNotFoundError or ValueError naming the file when it is missing or not a jc2a model file.
    """
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: model file not found")
    try:
        with safe_open(os.fspath(path), framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            if metadata.get("format") != MODEL_FORMAT:
                raise UserError(f"{path}: not a jc2a model file (no safetensors metadata format={MODEL_FORMAT!r})")
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except SafetensorError as exc:
        raise UserError(f"{path}: not a safetensors jc2a model file ({str(exc).splitlines()[0]})") from None
    return tensors, metadata


WEIGHTS = ("final", "best")  # a run's model.safetensors, or best/model.safetensors (the best validation mIoU)


def resolve_checkpoint(path: Union[str, os.PathLike], weights: str = "final") -> tuple[Path, Optional[Path]]:
    """(model file, config file or None) of `path`: a model file, or a run folder holding model.safetensors
    (`weights="final"`) or best/model.safetensors (`weights="best"`); the config is the run's config.yaml."""
    if weights not in WEIGHTS:
        raise UserError(f"weights {weights!r}: expected one of {', '.join(WEIGHTS)}")
    path = Path(path)
    if path.is_dir():
        model = path / "best" / MODEL_FILE if weights == "best" else path / MODEL_FILE
        if not model.is_file():
            why = "was it ever validated?" if weights == "best" else "has the training finished?"
            raise FileNotFoundError(f"{path}: no {model.relative_to(path)} in this run folder ({why})")
        config = path / CONFIG_FILE
        return model, config if config.is_file() else None
    if not path.exists():
        raise FileNotFoundError(f"{path}: checkpoint not found")
    if weights == "best":
        raise UserError(f"{path}: the best weights are a run folder's best/{MODEL_FILE}; give the run folder")
    config = path.parent / CONFIG_FILE
    return path, config if config.is_file() else None
