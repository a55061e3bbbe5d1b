"""The simple baseline beside JC2A (issue 17): prototype matching, the classic PANet / SG-One design.

`model.arch: prototype` builds it instead of JC2A, on the same backbone and the same mid-level features: the
support's foreground and background prototypes by masked average pooling (Eq. 11's wGAP), the cosine similarity
of every query position with each, and a small head (two 3x3 convolutions) on the query feature gated by the
foreground similarity (SG-One's guidance) and the two similarity maps (PANet's non-parametric scores). No HPAM,
no CKMM, no pyramid: one prototype per support. K shots are fused as JC2A fuses them (the mean of the K one-shot
foreground probabilities), and it trains with the same loop, loss (CE, 255 ignored) and episodes.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from jc2a.labels import IGNORE_INDEX
from jc2a.model.backbone import Backbone, config_backbone
from jc2a.model.ckmm import weighted_gap
from jc2a.model.decoder import log_mean_softmax
from jc2a.model.prior import COSINE_EPS, resize_mask

__all__ = ["BaselineMaps", "BaselineOutput", "PrototypeBaseline", "build_baseline"]


class BaselineOutput(NamedTuple):
    """Train mode's output, as JC2A's (`JC2AOutput`): no auxiliary outputs."""

    logits: Tensor  # [B, 2, H, W]; for K > 1 the log of the mean of the K one-shot softmaxes
    aux_logits: tuple[Tensor, ...]  # always ()


class BaselineMaps(NamedTuple):
    """`return_maps=True`'s output, as JC2A's (`JC2AMaps`): the foreground probability and the prototype's cosine."""

    logits: Tensor
    aux_logits: tuple[Tensor, ...]
    maps: dict[str, Tensor]  # "foreground" [B, H, W], "similarity" [B, 1, h, w] (the mean over the K supports)


class PrototypeBaseline(nn.Module):
    """Masked-average-pooled support prototypes, cosine similarity with the query, a small head.

    Args:
        backbone: the four-stage stride-8 backbone (`create_backbone`), as JC2A's.
        feat_dim: C, the width of the reduced mid-level feature `cat(layer3, layer2) -> C` (shared by query and
            support, as SG-One's) and of the head.
        dropout: Dropout2d after the reduction.
        scale: the cosine similarities are multiplied by it before the head (PANet's alpha = 20; 10 here).
    """

    def __init__(self, backbone: Backbone, feat_dim: int = 64, dropout: float = 0.0, scale: float = 10.0) -> None:
        super().__init__()
        c2, c3 = backbone.channels[1:3]
        self.backbone = backbone
        self.prototype_bank = None  # no CKMM: the training loop builds no bank for it
        self.feat_dim, self.scale = feat_dim, scale
        self.reduce = nn.Sequential(
            nn.Conv2d(c3 + c2, feat_dim, kernel_size=1, bias=False), nn.ReLU(inplace=True), nn.Dropout2d(p=dropout)
        )
        self.head = nn.Sequential(
            nn.Conv2d(feat_dim + 2, feat_dim, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(feat_dim, feat_dim, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(feat_dim, 2, kernel_size=1),
        )

    def _features(self, img: Tensor) -> Tensor:
        if img.dtype == torch.uint8:
            img = self.backbone.normalize(img)
        if self.backbone.can_split:  # the last stage feeds nothing here
            _, layer2, layer3 = self.backbone.forward_to_layer3(img)
        else:
            _, layer2, layer3, _ = self.backbone(img)
        return self.reduce(torch.cat([layer3, layer2], dim=1))

    def forward(
        self, query_img: Tensor, support_imgs: Tensor, support_masks: Tensor, return_maps: bool = False
    ) -> Union[Tensor, BaselineOutput, BaselineMaps]:
        """Segment the query with K supports; inputs and outputs as `JC2A.forward`'s."""
        shots = support_imgs.shape[1]
        f_q = self._features(query_img).repeat_interleave(shots, dim=0)  # [B*K, C, h, w]
        f_s = self._features(support_imgs.flatten(0, 1))
        masks = support_masks.flatten(0, 1).unsqueeze(1)
        size = tuple(f_s.shape[-2:])
        fg = weighted_gap(f_s, resize_mask(masks == 1, size))  # [B*K, C]
        bg = weighted_gap(f_s, resize_mask(masks == 0, size))
        q = F.normalize(f_q.float(), dim=1, eps=COSINE_EPS)
        sim_fg = torch.einsum("nchw,nc->nhw", q, F.normalize(fg, dim=1, eps=COSINE_EPS)).unsqueeze(1)
        sim_bg = torch.einsum("nchw,nc->nhw", q, F.normalize(bg, dim=1, eps=COSINE_EPS)).unsqueeze(1)
        x = torch.cat([f_q * sim_fg.clamp_min(0).to(f_q.dtype), self.scale * sim_fg, self.scale * sim_bg], dim=1)
        logits = F.interpolate(self.head(x), size=query_img.shape[-2:], mode="bilinear", align_corners=True)
        logits = log_mean_softmax(logits, shots)
        if not (self.training or return_maps):
            return logits
        if not return_maps:
            return BaselineOutput(logits, ())
        similarity = sim_fg.view(-1, shots, *sim_fg.shape[1:]).mean(dim=1)
        maps = {"foreground": logits.float().softmax(dim=1)[:, 1], "similarity": similarity}
        return BaselineMaps(logits, (), maps)

    def loss(self, output: Union[Tensor, BaselineOutput, BaselineMaps], query_mask: Tensor) -> Tensor:
        """CE (255 ignored) of the (fused) logits against `query_mask` `[B, H, W]`, in fp32."""
        logits = output if isinstance(output, Tensor) else output.logits
        target = query_mask.long()
        total = F.cross_entropy(logits.float(), target, ignore_index=IGNORE_INDEX, reduction="sum")
        return total / (target != IGNORE_INDEX).sum().clamp_min(1)


def build_baseline(
    cfg, backbone_state: Optional[dict[str, Tensor]] = None, backbone_source: Optional[str] = None
) -> PrototypeBaseline:
    """The baseline of a config with `model.arch: prototype`: its backbone as `build_model` builds JC2A's
    (`model.backbone.*`), `model.feat_dim` and `model.dropout`; the HPAM, CKMM, MIA and pyramid keys do not
    apply to it."""
    mc = cfg.model
    backbone = config_backbone(cfg, backbone_state, backbone_source)
    return PrototypeBaseline(backbone, feat_dim=mc.feat_dim, dropout=mc.dropout)
