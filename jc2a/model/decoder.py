"""Multiple Information Aggregation (MIA, Eq. 14) and PFENet's Feature Enrichment Module as the decoder."""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["MIA_OPS", "FeatureEnrichment", "aggregate", "aggregate_channels", "log_mean_softmax"]

MIA_OPS = ("concat", "add", "multiply")


def aggregate(p_aw: Optional[Tensor], p_ag: Optional[Tensor], op: str = "concat") -> list[Tensor]:
    """MIA (Eq. 14): join the class-aware prototype `P_aw` and the class-agnostic map `P_ag` of one bin.

    - `concat` (paper): `[P_aw, P_ag]`, `out_dim + 1` channels.
    - `add`: `P_aw + P_ag`, the map broadcast over the channels, `out_dim` channels.
    - `multiply`: `P_aw * P_ag`, the map broadcast over the channels (it gates the prototype), `out_dim` channels.

    With only one of the two (HPAM off: `P_ag` alone, as the baseline + CKMM row of Table 3; CKMM off:
    `P_aw` alone) there is nothing to aggregate and `op` does not matter: the one present is passed on.

    Args:
        p_aw: `[B, out_dim, b, b]` or None.
        p_ag: `[B, 1, b, b]` or None.
        op: `concat`, `add` or `multiply`.

    Returns:
        The tensors to concatenate to the query feature and the support prototype (possibly empty).
    """
    if p_aw is None or p_ag is None:
        return [t for t in (p_aw, p_ag) if t is not None]
    p_ag = p_ag.to(p_aw.dtype)
    if op == "concat":
        return [p_aw, p_ag]
    if op == "add":
        return [p_aw + p_ag]
    if op == "multiply":
        return [p_aw * p_ag]
    raise ValueError(f"unknown MIA op {op!r}: expected one of {', '.join(MIA_OPS)}")


def aggregate_channels(aw_dim: int, ag: bool, op: str = "concat") -> int:
    """Channels of `aggregate`'s output for a `P_aw` of `aw_dim` channels (0: none) and a `P_ag` or not."""
    if aw_dim and ag:
        return aw_dim + 1 if op == "concat" else aw_dim
    return aw_dim + int(ag)


def _conv(c_in: int, c_out: int, kernel_size: int) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, kernel_size=kernel_size, padding=kernel_size // 2, bias=False)


def _head(dim: int, num_classes: int) -> nn.Sequential:
    """PFENet's classifier: Conv3x3 + ReLU + Dropout2d(0.1) + Conv1x1 -> classes."""
    return nn.Sequential(
        _conv(dim, dim, 3), nn.ReLU(inplace=True), nn.Dropout2d(p=0.1), nn.Conv2d(dim, num_classes, kernel_size=1)
    )


def _double_conv(dim: int) -> nn.Sequential:
    """Two Conv3x3 + ReLU (PFENet's `beta_conv` and `res2`)."""
    return nn.Sequential(_conv(dim, dim, 3), nn.ReLU(inplace=True), _conv(dim, dim, 3), nn.ReLU(inplace=True))


class FeatureEnrichment(nn.Module):
    """PFENet's decoder over the pyramid bins, finest first, each bin's input already concatenated.

    Per bin l: `init_merge` (Conv1x1 -> C + ReLU) of `[f_q, prototype, MIA(P_aw, P_ag) (, prior)]`; for l > 0,
    `alpha_conv` (Conv1x1 2C -> C + ReLU) on `[merge, previous bin upsampled]` + residual; `beta_conv` (2x
    Conv3x3 + ReLU) + residual; `inner_cls` gives the bin's auxiliary logits. The bins, upsampled to the
    feature size, are concatenated: `res1` (Conv1x1 -> C + ReLU), `res2` (2x Conv3x3 + ReLU) + residual, `cls`.
    """

    def __init__(self, in_channels: int, dim: int, num_bins: int, num_classes: int = 2) -> None:
        """Args:
        in_channels: channels of each bin's concatenated input.
        dim: C, the decoder width (256 in the paper).
        num_bins: pyramid levels.
        num_classes: 2 (background, foreground).
        """
        super().__init__()
        self.init_merge = nn.ModuleList(
            nn.Sequential(_conv(in_channels, dim, 1), nn.ReLU(inplace=True)) for _ in range(num_bins)
        )
        self.alpha_conv = nn.ModuleList(nn.Sequential(_conv(2 * dim, dim, 1), nn.ReLU()) for _ in range(num_bins - 1))
        self.beta_conv = nn.ModuleList(_double_conv(dim) for _ in range(num_bins))
        self.inner_cls = nn.ModuleList(_head(dim, num_classes) for _ in range(num_bins))
        self.res1 = nn.Sequential(_conv(dim * num_bins, dim, 1), nn.ReLU(inplace=True))
        self.res2 = _double_conv(dim)
        self.cls = _head(dim, num_classes)

    def forward(self, inputs: Sequence[Tensor], size: tuple[int, int]) -> tuple[Tensor, list[Tensor]]:
        """Decode.

        Args:
            inputs: one `[B, in_channels, b_l, b_l]` per bin, finest first.
            size: the feature size `(h, w)` the bins are upsampled to before fusion.

        Returns:
            `(logits [B, classes, h, w], [aux logits [B, classes, b_l, b_l] per bin])`.
        """
        pyramid: list[Tensor] = []
        aux: list[Tensor] = []
        for level, x in enumerate(inputs):
            merge = self.init_merge[level](x)  # Eq. 14's 1x1 aggregation
            if level > 0:
                prev = F.interpolate(pyramid[-1], size=merge.shape[-2:], mode="bilinear", align_corners=True)
                merge = self.alpha_conv[level - 1](torch.cat([merge, prev], dim=1)) + merge
            merge = self.beta_conv[level](merge) + merge
            aux.append(self.inner_cls[level](merge))
            pyramid.append(F.interpolate(merge, size=size, mode="bilinear", align_corners=True))
        x = self.res1(torch.cat(pyramid, dim=1))
        x = self.res2(x) + x
        return self.cls(x), aux


def log_mean_softmax(logits: Tensor, shots: int) -> Tensor:
    """Decision-level K-shot fusion: `[B*K, n, ...]` -> `log(mean_k softmax(logits_k))` `[B, n, ...]` (fp32).

    Its softmax is exactly the mean of the K softmaxes (its exp already sums to one over the classes).
    """
    if shots == 1:
        return logits
    log_p = F.log_softmax(logits.float(), dim=1)
    return torch.logsumexp(log_p.view(-1, shots, *log_p.shape[1:]), dim=1) - math.log(shots)
