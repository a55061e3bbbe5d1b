"""Class-agnostic Knowledge Mining Module (CKMM, Eqs. 11-13): the base-class prototype bank and its probability map."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Mapping, Optional, Sequence, Union

import torch
import torch.distributed as dist
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from jc2a.model.prior import COSINE_EPS, minmax_normalize, resize_mask

__all__ = ["BANK_FORMAT", "EMPTY_BANK", "REDUCTIONS", "PrototypeBank", "class_agnostic_map", "weighted_gap"]

BANK_FORMAT = "jc2a-prototype-bank/2"  # safetensors; /1 was a torch.save pickle, no longer read
REDUCTIONS = ("mean", "max")
EMPTY_BANK = (
    "CKMM is on but the prototype bank is empty: build it with `jc2a bank` (or `jc2a train`, which builds it) "
    "or set model.ckmm.bank_file"
)


def weighted_gap(feat: Tensor, mask: Tensor, eps: float = 5e-4) -> Tensor:
    """Masked (weighted) global average pooling, Eq. 11: `sum(f * M) / (sum(M) + eps)`, in fp32.

    Args:
        feat: features `[B, C, h, w]`.
        mask: float mask `[B, 1, H, W]` in [0, 1], any size (resized bilinearly to `h x w` as PFENet's
            `Weighted_GAP`).
        eps: PFENet's 0.0005, which keeps an empty mask finite (its prototype is then zero).

    Returns:
        `[B, C]`.
    """
    with torch.autocast(device_type=feat.device.type, enabled=False):
        mask = resize_mask(mask, tuple(feat.shape[-2:]))
        area = mask.sum(dim=(2, 3))  # [B, 1]
        return (feat.float() * mask).sum(dim=(2, 3)) / (area + eps)


def class_agnostic_map(feat_q: Tensor, prototypes: Tensor, seen: Tensor, reduce: str = "mean") -> Tensor:
    """The class-agnostic probability map, Eq. 13, in fp32.

    Cosine similarity of every query position with every base-class prototype, reduced over the classes
    (`mean`: Eq. 13's average; `max`: the best class), then min-max normalised per image to [0, 1]. Classes
    never seen while building the bank (`seen` False) are left out of both reductions; with no class seen
    the map is zeros.

    Args:
        feat_q: query high-level feature (layer4) `[B, D, h, w]`.
        prototypes: `FP_base` `[N, D]` (Eq. 12).
        seen: `[N]` bool, classes with at least one instance.
        reduce: `mean` or `max`.

    Returns:
        `P_ag` `[B, 1, h, w]` in [0, 1].
    """
    if reduce not in REDUCTIONS:
        raise ValueError(f"unknown CKMM reduction {reduce!r}: expected one of {', '.join(REDUCTIONS)}")
    b, _, h, w = feat_q.shape
    if not bool(seen.any()):
        return feat_q.new_zeros(b, 1, h, w, dtype=torch.float32)
    with torch.autocast(device_type=feat_q.device.type, enabled=False):
        q = nn.functional.normalize(feat_q.float().flatten(2), dim=1, eps=COSINE_EPS)  # [B, D, hw]
        p = nn.functional.normalize(prototypes[seen].float(), dim=1, eps=COSINE_EPS)  # [N_seen, D]
        cos = torch.matmul(p, q)  # [B, N_seen, hw]
        prob = cos.mean(dim=1) if reduce == "mean" else cos.max(dim=1).values  # Eq. 13
        return minmax_normalize(prob.view(b, 1, h, w))


class PrototypeBank(nn.Module):
    """Per-class running sums of wGAP prototypes of the base classes (Eqs. 11-12), saved in the state_dict.

    Buffers: `class_ids [N]` (the fold's base classes, contiguous ids), `sums [N, D]` (float64) and
    `counts [N]` (int64). Built in one pass over the base training data, each rank on its share, then
    `all_reduce()`: the sums and counts add up exactly, so the prototypes do not depend on the number of
    ranks. The sums stay float64 when the network is cast to half precision. A bank file is safetensors
    (never a pickle) and carries a fingerprint of what the bank was built from (backbone weights, data...).
    """

    def __init__(self, class_ids: Sequence[int], dim: int) -> None:
        """Args:
        class_ids: the base classes of the fold, contiguous ids; row i of the bank is `class_ids[i]`.
        dim: channels D of the feature the prototypes are taken from (the backbone's layer4).
        """
        super().__init__()
        if len(set(class_ids)) != len(class_ids):
            raise ValueError(f"prototype bank class ids must be distinct, got {list(class_ids)}")
        self.dim = int(dim)
        self.register_buffer("class_ids", torch.tensor(list(class_ids), dtype=torch.long))
        self.register_buffer("sums", torch.zeros(len(class_ids), dim, dtype=torch.float64))
        self.register_buffer("counts", torch.zeros(len(class_ids), dtype=torch.long))

    def _apply(self, fn, recurse=True):  # nn.Module's signature
        # `.half()` / `.to(dtype)` / DeepSpeed's fp16 cast must not round the statistics: follow device moves only.
        sums = self.sums
        out = super()._apply(fn, recurse)
        if self.sums.dtype != sums.dtype:
            self.sums = sums.to(device=self.sums.device)
        return out

    def extra_repr(self) -> str:
        return f"classes={len(self.class_ids)}, dim={self.dim}, seen={int(self.seen.sum())}"

    @property
    def seen(self) -> Tensor:
        """`[N]` bool: classes with at least one instance."""
        return self.counts > 0

    def reset(self) -> None:
        """Forget every instance."""
        self.sums.zero_()
        self.counts.zero_()

    @torch.no_grad()
    def update(self, feats: Tensor, masks: Tensor, class_ids: Tensor) -> int:
        """Add the wGAP (Eq. 11) of every (image, class) instance of a batch.

        Args:
            feats: high-level features `[B, D, h, w]`.
            masks: binary targets `[B, H, W]` (uint8 or int64): 1 target, 0 background, 255 ignore (not target).
            class_ids: `[B]` class of each target (tensor or list); classes not in the bank are skipped.

        Returns:
            How many instances were added. Instances with no target pixel (at image or feature resolution)
            are skipped.
        """
        if feats.shape[1] != self.dim:
            raise ValueError(f"prototype bank expects {self.dim}-channel features, got {tuple(feats.shape)}")
        target = (masks == 1).unsqueeze(1).float()  # [B, 1, H, W]
        mask = resize_mask(target, tuple(feats.shape[-2:]))
        area = mask.sum(dim=(1, 2, 3))  # [B]
        pooled = (feats.double() * mask.double()).sum(dim=(2, 3)) / area.double().clamp_min(1e-12)[:, None]
        class_ids = torch.as_tensor(class_ids, device=self.class_ids.device)
        onehot = class_ids.view(-1, 1) == self.class_ids.view(1, -1)  # [B, N]
        valid = (target.flatten(1).sum(dim=1) > 0) & (area > 0)
        onehot = onehot & valid.to(onehot.device)[:, None]
        self.sums += onehot.double().t() @ pooled.to(self.sums.device)  # sum_i f_wGAP^{c,i} (Eq. 12)
        self.counts += onehot.long().sum(dim=0)  # I_c
        return int(onehot.any(dim=1).sum())

    def all_reduce(self) -> None:
        """Sum `sums` (float64) and `counts` (int64) over all ranks (a no-op without torch.distributed)."""
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(self.sums, op=dist.ReduceOp.SUM)
            dist.all_reduce(self.counts, op=dist.ReduceOp.SUM)

    def prototypes(self) -> Tensor:
        """`FP_base` `[N, D]` fp32 (Eq. 12): the mean wGAP of each class; zero rows for unseen classes."""
        return (self.sums / self.counts.clamp_min(1).to(self.sums.dtype)[:, None]).float()

    def probability_map(self, feat_q: Tensor, reduce: str = "mean") -> Tensor:
        """`P_ag` `[B, 1, h, w]` in [0, 1] for a query layer4 feature `[B, D, h, w]` (Eq. 13).

        Raises:
            RuntimeError: the bank is empty (no class seen): CKMM would feed the decoder nothing but zeros.
        """
        if not bool(self.seen.any()):
            raise RuntimeError(EMPTY_BANK)
        return class_agnostic_map(feat_q, self.prototypes(), self.seen, reduce)

    # ------------------------------------------------------------------ files

    def save(self, path: Union[str, os.PathLike], fingerprint: Mapping[str, str]) -> Path:
        """Write the bank to `path` as safetensors, atomically (a temporary name, then `os.replace`).

        Tensors `class_ids` (int64), `sums` (float64), `counts` (int64); string metadata `format`
        (`BANK_FORMAT`), `dim`, and `fingerprint` (JSON of a str -> str dict: what the bank was built from).
        """
        bad = {k: v for k, v in fingerprint.items() if not isinstance(k, str) or not isinstance(v, str)}
        if bad:
            raise TypeError(f"a bank fingerprint maps str to str; not so: {bad!r}")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {
            "class_ids": self.class_ids.detach().cpu().contiguous(),
            "sums": self.sums.detach().cpu().double().contiguous(),
            "counts": self.counts.detach().cpu().contiguous(),
        }
        metadata = {"format": BANK_FORMAT, "dim": str(self.dim), "fingerprint": json.dumps(dict(fingerprint))}
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        try:
            save_file(tensors, os.fspath(tmp), metadata=metadata)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        return path

    def load(self, path: Union[str, os.PathLike], fingerprint: Optional[Mapping[str, str]] = None) -> None:
        """Read a bank written by `save` into this one, refusing anything else with one line starting with the path.

        Only safetensors is read: nothing in the file is ever unpickled or executed.

        Args:
            path: the bank file.
            fingerprint: when given, the file's fingerprint must equal it, key for key.

        Raises:
            FileNotFoundError: no such file.
            ValueError: a directory, an empty file, not a safetensors bank of `BANK_FORMAT`, other class ids or
                dim, wrong tensors (names, dtypes, shapes), non-finite sums or negative counts, or a fingerprint
                that differs (the first differing key is named, with both values).
        """
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"{path}: prototype bank file not found")
        if path.is_dir():
            raise ValueError(f"{path}: is a directory, not a prototype bank file")
        if path.stat().st_size == 0:
            raise ValueError(f"{path}: empty file, not a prototype bank")
        names = ("class_ids", "sums", "counts")
        try:
            with safe_open(os.fspath(path), framework="pt", device="cpu") as f:
                metadata, keys = f.metadata() or {}, set(f.keys())
                if metadata.get("format") == BANK_FORMAT and keys == set(names):
                    tensors = {name: f.get_tensor(name) for name in names}
        except SafetensorError as exc:  # a pickle, random bytes, a truncated file: refused before anything is read
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise ValueError(f"{path}: not a safetensors prototype bank ({reason})") from None
        if metadata.get("format") != BANK_FORMAT:
            raise ValueError(f"{path}: not a prototype bank (no safetensors metadata format={BANK_FORMAT!r})")
        if keys != set(names):
            raise ValueError(f"{path}: prototype bank tensors are {sorted(keys)}, expected {sorted(names)}")
        self._check(path, metadata, tensors)
        if fingerprint is not None:
            _check_fingerprint(path, metadata.get("fingerprint"), fingerprint)
        self.sums.copy_(tensors["sums"].to(self.sums))
        self.counts.copy_(tensors["counts"].to(self.counts))

    def _check(self, path: Path, metadata: Mapping[str, str], tensors: Mapping[str, Tensor]) -> None:
        """Refuse a bank file whose tensors or metadata do not fit this bank (see `load`)."""
        expected = {"class_ids": torch.int64, "sums": torch.float64, "counts": torch.int64}
        for name, dtype in expected.items():
            if tensors[name].dtype != dtype:
                raise ValueError(f"{path}: prototype bank tensor {name} is {tensors[name].dtype}, expected {dtype}")
        if metadata.get("dim") != str(self.dim):
            raise ValueError(
                f"{path}: prototype bank was built with dim={metadata.get('dim')}, this model needs dim={self.dim}; "
                f"rebuild it with `jc2a bank` or delete the file"
            )
        n = len(self.class_ids)
        ids, sums, counts = tensors["class_ids"], tensors["sums"], tensors["counts"]
        if ids.tolist() != self.class_ids.tolist():
            raise ValueError(
                f"{path}: prototype bank was built with class_ids={ids.tolist()}, this model needs "
                f"class_ids={self.class_ids.tolist()}; rebuild it with `jc2a bank` or delete the file"
            )
        if tuple(sums.shape) != (n, self.dim) or tuple(counts.shape) != (n,):
            raise ValueError(
                f"{path}: prototype bank sums {tuple(sums.shape)} and counts {tuple(counts.shape)} do not fit "
                f"{n} classes of dim {self.dim}"
            )
        if not bool(torch.isfinite(sums).all()):
            raise ValueError(f"{path}: prototype bank sums are not all finite")
        if bool((counts < 0).any()):
            raise ValueError(f"{path}: prototype bank has negative counts")


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
