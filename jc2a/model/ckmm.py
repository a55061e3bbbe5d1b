"""Class-agnostic Knowledge Mining Module (CKMM, Eqs. 11-13): the base-class prototype bank and its probability map."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import torch
import torch.distributed as dist
from torch import Tensor, nn

from jc2a.model.prior import COSINE_EPS, minmax_normalize, resize_mask

__all__ = ["BANK_FORMAT", "REDUCTIONS", "PrototypeBank", "class_agnostic_map", "weighted_gap"]

BANK_FORMAT = "jc2a-prototype-bank/1"
REDUCTIONS = ("mean", "max")


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
    ranks. The sums stay float64 when the network is cast to half precision.
    """

    def __init__(self, class_ids: Sequence[int], dim: int, *, meta: Optional[Mapping[str, Any]] = None) -> None:
        """Args:
        class_ids: the base classes of the fold, contiguous ids; row i of the bank is `class_ids[i]`.
        dim: channels D of the feature the prototypes are taken from (the backbone's layer4).
        meta: what the bank depends on besides the classes (e.g. backbone, dataset, fold); a bank file is
            only loaded when its meta agrees on every key given here.
        """
        super().__init__()
        if len(set(class_ids)) != len(class_ids):
            raise ValueError(f"prototype bank class ids must be distinct, got {list(class_ids)}")
        self.dim = int(dim)
        self.meta: dict[str, Any] = dict(meta or {})
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
            masks: binary targets `[B, H, W]`: 1 target, 0 background, 255 ignore (counted as not target).
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
        """Sum `sums` and `counts` over all ranks (a no-op unless torch.distributed is initialised)."""
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(self.sums, op=dist.ReduceOp.SUM)
            dist.all_reduce(self.counts, op=dist.ReduceOp.SUM)

    def prototypes(self) -> Tensor:
        """`FP_base` `[N, D]` fp32 (Eq. 12): the mean wGAP of each class; zero rows for unseen classes."""
        return (self.sums / self.counts.clamp_min(1).to(self.sums.dtype)[:, None]).float()

    def probability_map(self, feat_q: Tensor, reduce: str = "mean") -> Tensor:
        """`P_ag` `[B, 1, h, w]` in [0, 1] for a query layer4 feature `[B, D, h, w]` (Eq. 13)."""
        return class_agnostic_map(feat_q, self.prototypes(), self.seen, reduce)

    # ------------------------------------------------------------------ files

    def save(self, path: Union[str, os.PathLike], meta: Optional[Mapping[str, Any]] = None) -> Path:
        """Write the bank (class ids, sums, counts, meta) to `path` atomically; `meta` adds to the bank's own."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        state = {
            "format": BANK_FORMAT,
            "class_ids": self.class_ids.tolist(),
            "dim": self.dim,
            "sums": self.sums.detach().cpu(),
            "counts": self.counts.detach().cpu(),
            "meta": {**self.meta, **dict(meta or {})},
        }
        tmp = path.with_name(path.name + ".tmp")
        torch.save(state, tmp)
        os.replace(tmp, path)
        return path

    def load(self, path: Union[str, os.PathLike]) -> None:
        """Read a bank written by `save`, refusing one built for other classes, features or meta.

        Raises:
            FileNotFoundError: no such file.
            ValueError: the file is not a bank, or a field (`class_ids`, `dim`, or a key of this bank's meta
                such as `backbone`, `dataset`, `fold`) differs; the message names the file and the field.
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"prototype bank file not found: {path}")
        state = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(state, dict) or state.get("format") != BANK_FORMAT:
            raise ValueError(f"{path}: not a prototype bank file (expected format {BANK_FORMAT!r})")
        mine = {"class_ids": self.class_ids.tolist(), "dim": self.dim}
        theirs = {"class_ids": state["class_ids"], "dim": state["dim"]}
        for key, value in self.meta.items():
            mine[key] = value
            theirs[key] = state["meta"].get(key)
        for key, value in mine.items():
            if theirs[key] != value:
                raise ValueError(
                    f"{path}: prototype bank was built with {key}={theirs[key]!r}, this model needs {key}={value!r}; "
                    f"delete the file or point model.ckmm.bank_file elsewhere to rebuild it"
                )
        self.sums.copy_(state["sums"].to(self.sums))
        self.counts.copy_(state["counts"].to(self.counts))
