"""Class-agnostic Knowledge Mining Module (CKMM, Eqs. 11-13): the base-class prototype bank and its probability map."""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn

from jc2a.errors import UserError
from jc2a.model.prior import COSINE_EPS, minmax_normalize, resize_mask

__all__ = ["EMPTY_BANK", "REDUCTIONS", "PrototypeBank", "class_agnostic_map", "weighted_gap"]

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
    b, _, h, w = feat_q.shape
    if not bool(seen.any()):
        return feat_q.new_zeros(b, 1, h, w, dtype=torch.float32)
    with torch.autocast(device_type=feat_q.device.type, enabled=False):
        q = nn.functional.normalize(feat_q.float().flatten(2), dim=1, eps=COSINE_EPS)  # [B, D, hw]
        p = nn.functional.normalize(prototypes[seen].float(), dim=1, eps=COSINE_EPS)  # [N_seen, D]
        cos = torch.matmul(p, q)  # [B, N_seen, hw]
        if reduce == "mean":  # Eq. 13
            prob = cos.mean(dim=1)
        elif reduce == "max":
            prob = cos.max(dim=1).values
        else:
            raise ValueError(f"unknown CKMM reduction {reduce!r}: expected one of {', '.join(REDUCTIONS)}")
        return minmax_normalize(prob.view(b, 1, h, w))


class PrototypeBank(nn.Module):
    """Per-class running sums of wGAP prototypes of the base classes (Eqs. 11-12), saved in the state_dict.

    Buffers: `class_ids [N]` (the fold's base classes, contiguous ids), `sums [N, D]` (float64) and
    `counts [N]` (int64). Built in one pass over the base training data, each rank on its share, then
    `all_reduce()`: the sums and counts add up exactly, so the prototypes do not depend on the number of
    ranks. The sums stay float64 when the network is cast to half precision. `state_tensors` /
    `load_state_tensors` are what a bank file holds; the files themselves are `jc2a.runs.files`'.
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

    # ------------------------------------------------------------------ state as tensors

    def state_tensors(self) -> dict[str, Tensor]:
        """`class_ids` (int64), `sums` (float64) and `counts` (int64), on the CPU: what a bank file holds.
        Files are the runs' business (`jc2a.runs.files.save_bank` / `load_bank`); the model knows tensors only."""
        return {
            "class_ids": self.class_ids.detach().cpu().contiguous(),
            "sums": self.sums.detach().cpu().double().contiguous(),
            "counts": self.counts.detach().cpu().contiguous(),
        }

    def load_state_tensors(self, tensors: Mapping[str, Tensor], source: str = "prototype bank") -> None:
        """Copy the `state_tensors()` of a bank of the same classes and dim into this one.

        Anything else is refused with one line that starts with `source` (the caller's name for where the
        tensors come from, e.g. a file), and the bank is left as it was.

        Raises:
            ValueError: other tensor names or dtypes, other class ids, shapes that are not `[N, dim]` / `[N]`,
                non-finite sums or negative counts.
        """
        names = ("class_ids", "sums", "counts")
        if set(tensors) != set(names):
            raise UserError(f"{source}: prototype bank tensors are {sorted(tensors)}, expected {sorted(names)}")
        expected = {"class_ids": torch.int64, "sums": torch.float64, "counts": torch.int64}
        for name, dtype in expected.items():
            if tensors[name].dtype != dtype:
                raise UserError(f"{source}: prototype bank tensor {name} is {tensors[name].dtype}, expected {dtype}")
        ids, sums, counts = tensors["class_ids"], tensors["sums"], tensors["counts"]
        if ids.tolist() != self.class_ids.tolist():
            raise UserError(
                f"{source}: prototype bank was built with class_ids={ids.tolist()}, this model needs "
                f"class_ids={self.class_ids.tolist()}; rebuild it with `jc2a bank` or delete the file"
            )
        n = len(self.class_ids)
        if tuple(sums.shape) != (n, self.dim) or tuple(counts.shape) != (n,):
            raise UserError(
                f"{source}: prototype bank sums {tuple(sums.shape)} and counts {tuple(counts.shape)} do not fit "
                f"{n} classes of dim {self.dim}"
            )
        if not bool(torch.isfinite(sums).all()):
            raise UserError(f"{source}: prototype bank sums are not all finite")
        if bool((counts < 0).any()):
            raise UserError(f"{source}: prototype bank has negative counts")
        self.sums.copy_(sums.to(self.sums))
        self.counts.copy_(counts.to(self.counts))
