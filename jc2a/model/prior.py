"""PFENet's class-specific prior mask (the peer baseline of Table 5) and the min-max normalisation it uses."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["COSINE_EPS", "minmax_normalize", "pfenet_prior", "resize_mask"]

COSINE_EPS = 1e-7  # PFENet's epsilon, both for the cosine and for the min-max normalisation


def resize_mask(mask: Tensor, size: tuple[int, int]) -> Tensor:
    """A float mask `[B, 1, H, W]` resized bilinearly (align_corners=True, as PFENet) to `size`, in fp32."""
    mask = mask.float()
    if tuple(mask.shape[-2:]) == tuple(size):
        return mask
    return F.interpolate(mask, size=size, mode="bilinear", align_corners=True)


def minmax_normalize(x: Tensor, eps: float = COSINE_EPS) -> Tensor:
    """Per-image min-max normalisation to [0, 1] in fp32: `[B, 1, h, w]` -> `[B, 1, h, w]`.

    `(x - min) / (max - min + eps)`: a constant map becomes zeros (finite).
    """
    flat = x.float().flatten(1)
    lo = flat.min(dim=1, keepdim=True).values
    hi = flat.max(dim=1, keepdim=True).values
    return ((flat - lo) / (hi - lo + eps)).view_as(x)


def pfenet_prior(feat_q: Tensor, feat_s: Tensor, mask_s: Tensor) -> Tensor:
    """PFENet's prior: for every query position, the best cosine match among the masked support positions.

    Args:
        feat_q: query high-level feature (layer4) `[B, D, h, w]`.
        feat_s: support high-level feature `[B, D, h, w]`; PFENet's is `layer4(layer3 * M_s)` (the backbone's last
            stage run on the masked layer3, `JC2A` does so), masked here a second time.
        mask_s: support target mask `[B, 1, H, W]`, float in [0, 1], any size (resized to the feature).

    Returns:
        `[B, 1, h, w]` in [0, 1]: `max_s cos(q, s * M_s)`, min-max normalised per image. Computed in fp32.
    """
    with torch.autocast(device_type=feat_q.device.type, enabled=False):
        b, d, h, w = feat_q.shape
        mask = resize_mask(mask_s, tuple(feat_s.shape[-2:]))
        q = feat_q.float().flatten(2)  # [B, D, hw]
        s = (feat_s.float() * mask).flatten(2).transpose(1, 2)  # [B, hw_s, D]
        norms = torch.bmm(s.norm(dim=2, keepdim=True), q.norm(dim=1, keepdim=True))  # [B, hw_s, hw]
        similarity = torch.bmm(s, q) / (norms + COSINE_EPS)
        prior = similarity.max(dim=1).values.view(b, 1, h, w)  # max over the support positions
        return minmax_normalize(prior)
