"""Few-shot segmentation metrics: per-class intersection and union sums, mIoU and FB-IoU in percent."""

from __future__ import annotations

from typing import Sequence, Union

import torch
import torch.distributed as dist
from torch import Tensor

from jc2a.labels import IGNORE_INDEX

__all__ = ["FewShotIoU", "score_at_original_size"]



class FewShotIoU:
    """Intersections and unions summed over every episode of a fold, per class (PFENet's and HSNet's protocol).

    - Class IoU = sum of the foreground intersections of the class's episodes / sum of their foreground unions
      (never a mean of per-episode IoUs); a class whose union stays 0 scores 0, as PFENet and HSNet score it.
    - mIoU = the mean class IoU over the fold's classes that had at least one episode (`missing` names the
      others; PFENet and HSNet count such a class as 0, which never happens on COCO-20i or PASCAL-5i).
    - FB-IoU = the mean of the background IoU and the foreground IoU, each pooled over all episodes.
    Pixels whose target is 255 are ignored. The sums are integers, so they add up exactly across processes
    (`all_reduce`), in any order: the numbers do not depend on the number of processes.

    Args:
        class_ids: the fold's classes (contiguous ids).
    """

    def __init__(self, class_ids: Sequence[int]) -> None:
        self.class_ids = [int(c) for c in class_ids]
        if len(set(self.class_ids)) != len(self.class_ids) or not self.class_ids:
            raise ValueError(f"FewShotIoU needs distinct class ids, got {list(class_ids)}")
        self._row = {c: i for i, c in enumerate(self.class_ids)}
        # [classes, 2 (background, foreground)] intersections and unions; [classes] episodes
        self.intersection = torch.zeros(len(self.class_ids), 2, dtype=torch.int64)
        self.union = torch.zeros(len(self.class_ids), 2, dtype=torch.int64)
        self.episodes = torch.zeros(len(self.class_ids), dtype=torch.int64)

    def reset(self) -> None:
        for t in (self.intersection, self.union, self.episodes):
            t.zero_()

    @torch.no_grad()
    def update(self, pred: Tensor, target: Tensor, class_id: Union[Tensor, Sequence[int], int]) -> None:
        """Add a batch of episodes.

        Args:
            pred: `[B, H, W]` (or `[H, W]`) 0/1 integers, the predicted foreground.
            target: `[B, H, W]` 0/1/255, the same size.
            class_id: `[B]` class of each episode.
        """
        if pred.dim() == 2:
            pred, target = pred.unsqueeze(0), target.unsqueeze(0)
        if pred.shape != target.shape:
            raise ValueError(f"prediction {tuple(pred.shape)} and target {tuple(target.shape)} differ in size")
        ids = torch.as_tensor(class_id).view(-1).tolist()
        if len(ids) != pred.shape[0]:
            raise ValueError(f"{len(ids)} class ids for {pred.shape[0]} episodes")
        valid = target != IGNORE_INDEX
        fg_pred = (pred == 1) & valid
        fg_true = (target == 1) & valid
        bg_pred = (pred != 1) & valid
        bg_true = (target == 0) & valid
        sums = torch.stack(
            [
                (bg_pred & bg_true).flatten(1).sum(1),
                (fg_pred & fg_true).flatten(1).sum(1),
                (bg_pred | bg_true).flatten(1).sum(1),
                (fg_pred | fg_true).flatten(1).sum(1),
            ],
            dim=1,
        ).cpu()  # [B, 4]
        for i, c in enumerate(ids):
            if c not in self._row:
                raise ValueError(f"class {c} is not one of this fold's classes {self.class_ids}")
            row = self._row[c]
            self.intersection[row] += sums[i, :2]
            self.union[row] += sums[i, 2:]
            self.episodes[row] += 1

    def all_reduce(self) -> None:
        """Sum the counts over all processes (a no-op unless torch.distributed is initialised)."""
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            backend = dist.get_backend()
            device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
            packed = torch.cat([self.intersection.flatten(), self.union.flatten(), self.episodes]).to(device)
            dist.all_reduce(packed, op=dist.ReduceOp.SUM)
            packed = packed.cpu()
            n = self.intersection.numel()
            self.intersection.copy_(packed[:n].view_as(self.intersection))
            self.union.copy_(packed[n : 2 * n].view_as(self.union))
            self.episodes.copy_(packed[2 * n :])

    def compute(self) -> dict:
        """`{"miou", "fbiou", "class_iou": {id: percent}, "episodes", "missing": [ids]}`, in percent."""
        seen = self.episodes > 0
        iou = self.intersection[:, 1].double() / self.union[:, 1].clamp_min(1).double()
        miou = float(iou[seen].mean()) * 100 if bool(seen.any()) else 0.0
        pooled_i, pooled_u = self.intersection.sum(0).double(), self.union.sum(0).double()
        fbiou = float((pooled_i / pooled_u.clamp_min(1)).mean()) * 100 if bool(seen.any()) else 0.0
        return {
            "miou": miou,
            "fbiou": fbiou,
            "class_iou": {c: float(iou[i]) * 100 for i, c in enumerate(self.class_ids) if bool(seen[i])},
            "episodes": int(self.episodes.sum()),
            "missing": [c for i, c in enumerate(self.class_ids) if not bool(seen[i])],
        }


def score_at_original_size(logits: Tensor, label: Tensor) -> tuple[Tensor, Tensor]:
    """PFENet's scoring of one episode at the original resolution (docs/PROTOCOL.md).

    The canvas logits `[2, S, S]` (or `[1, 2, S, S]`) are upsampled bilinearly (align_corners=True) to a square of
    the original label's longer side L; the original label `[h, w]` (0/1/255) is padded into that square with 255.

    Returns:
        `(pred [L, L] 0/1 int64, target [L, L] int64)`.
    """
    if logits.dim() == 4:
        logits = logits[0]
    h, w = label.shape[-2:]
    side = max(h, w)
    target = torch.full((side, side), IGNORE_INDEX, dtype=torch.int64, device=label.device)
    target[:h, :w] = label.to(torch.int64)
    up = torch.nn.functional.interpolate(
        logits.unsqueeze(0).float(), size=(side, side), mode="bilinear", align_corners=True
    )
    return up[0].argmax(dim=0).to(target.device), target
