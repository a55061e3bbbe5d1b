"""The JC2A network: backbone, HPAM, CKMM, MIA decoder, its loss and K-shot fusion, and its builder."""

from __future__ import annotations

import math
from typing import NamedTuple, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from jc2a.config import Config
from jc2a.folds import base_classes
from jc2a.labels import IGNORE_INDEX
from jc2a.model.backbone import Backbone, config_backbone, feature_size
from jc2a.model.ckmm import REDUCTIONS, PrototypeBank, weighted_gap
from jc2a.model.decoder import MIA_OPS, FeatureEnrichment, aggregate, aggregate_channels, log_mean_softmax
from jc2a.model.hpam import HPAM
from jc2a.model.prior import pfenet_prior, resize_mask

__all__ = ["JC2A", "JC2AMaps", "JC2AOutput", "build_model", "pyramid_bins", "pyramid_blocks"]

REFERENCE_FEATURE = 60  # layer4 side for a 473 input, the size `model.bins` are written for


class JC2AOutput(NamedTuple):
    """What `JC2A.forward` returns in train mode (eval mode returns `logits` alone)."""

    logits: Tensor  # [B, 2, H, W]; for K > 1 the log of the mean of the K one-shot softmaxes
    aux_logits: tuple[Tensor, ...]  # one [B, 2, b_l, b_l] per bin, finest first, fused over K the same way


class JC2AMaps(NamedTuple):
    """What `JC2A.forward(..., return_maps=True)` returns, in train and eval mode alike."""

    logits: Tensor  # [B, 2, H, W], as JC2AOutput.logits
    aux_logits: tuple[Tensor, ...]  # as JC2AOutput.aux_logits
    maps: dict[str, Tensor]  # "ckmm" P_ag [B, 1, h, w] (Eq. 13), "prior" [B, 1, h, w], "foreground" [B, H, W]


def pyramid_bins(bins: Sequence[int], image_size: int) -> list[int]:
    """Scale bins written for a 473 input (layer4 60x60) to `image_size`: `max(1, round(b * feat / 60))`.

    129 -> feature 17 -> [60, 30, 15, 8] becomes [17, 8, 4, 2]. Equal neighbours are kept: the list keeps its
    length, so `topk` and `block` still have one entry per bin.
    """
    feat = feature_size(image_size)
    return [max(1, round(b * feat / REFERENCE_FEATURE)) for b in bins]


def pyramid_blocks(
    bins: Sequence[int], topk: Sequence[int], block: Sequence[int], reference_bins: Optional[Sequence[int]] = None
) -> tuple[list[int], list[int]]:
    """`(topk, block)` fitted to the bins: `m_l <= b_l`, and `k_l` scaled with the number of blocks.

    `topk` is written for `reference_bins` (the config's bins, a 473 input), where it keeps about 20% of the
    `N_l = ceil(b_l / m_l)^2` blocks (paper §4.1); at other sizes `k_l * N_l / N_l^ref`, rounded, at least 1 and at
    most `N_l`, keeps that share: 129 -> [7, 2, 1, 1] of [25, 9, 4, 1] blocks, 641 -> [118, 39, 10, 7].
    """
    reference_bins = bins if reference_bins is None else reference_bins
    blocks = [min(m, b) for m, b in zip(block, bins)]
    ks = []
    for k, b, m, ref, m_ref in zip(topk, bins, blocks, reference_bins, block):
        n, n_ref = math.ceil(b / m) ** 2, math.ceil(ref / min(m_ref, ref)) ** 2
        ks.append(min(n, max(1, round(k * n / n_ref))))
    return ks, blocks


def _cross_entropy(logits: Tensor, target: Tensor) -> Tensor:
    """CE (ignore 255) in fp32, logits upsampled to the target size; zero, not NaN, when every pixel is ignored."""
    if tuple(logits.shape[-2:]) != tuple(target.shape[-2:]):
        logits = F.interpolate(logits.float(), size=target.shape[-2:], mode="bilinear", align_corners=True)
    total = F.cross_entropy(logits.float(), target, ignore_index=IGNORE_INDEX, reduction="sum")
    return total / (target != IGNORE_INDEX).sum().clamp_min(1)


class JC2A(nn.Module):
    """Joint Class-aware and Class-agnostic Alignment network for few-shot segmentation.

    One-shot path, per bin b_l: `init_merge([f_q, prototype, MIA(P_aw, P_ag) (, PFENet prior)])`, then PFENet's
    FEM. `P_aw` is HPAM's aligned prototype (Eq. 10), `P_ag` CKMM's class-agnostic map (Eq. 13). With neither
    HPAM nor CKMM (nor the prior) this is the paper's baseline: PFENet without its prior. K shots: the one-shot
    path runs once per support and the K foreground probability maps are averaged (decision-level fusion).
    """

    def __init__(
        self,
        backbone: Backbone,
        bins: Sequence[int],
        *,
        feat_dim: int = 256,
        dropout: float = 0.5,
        hpam: Optional[HPAM] = None,
        prototype_bank: Optional[PrototypeBank] = None,
        ckmm_reduce: str = "mean",
        pfenet_prior: bool = False,
        mia: str = "concat",
        aux_weight: float = 1.0,
        num_classes: int = 2,
    ) -> None:
        """Args:
        backbone: four-stage stride-8 feature extractor (`create_backbone`).
        bins: pyramid bin sizes, finest first, already scaled to the input size (`pyramid_bins`).
        feat_dim: C, width of the reduced mid-level features and of the decoder.
        dropout: Dropout2d after the mid-level reduction (PFENet's `down_query`, `down_supp`).
        hpam: the Hybrid Prototype Alignment Module (same `dim` and `bins`), or None for no class-aware alignment.
        prototype_bank: CKMM's base-class bank (`dim` = the backbone's layer4 channels), or None: no CKMM.
        ckmm_reduce: `mean` (Eq. 13) or `max` over the base classes.
        pfenet_prior: also feed PFENet's class-specific prior mask (Table 5's PFENet rows).
        mia: how `P_aw` and `P_ag` are aggregated (Eq. 14): `concat`, `add` or `multiply`.
        aux_weight: weight of the mean per-bin auxiliary CE in `loss`.
        num_classes: 2 (background, foreground).
        """
        super().__init__()
        if mia not in MIA_OPS:
            raise ValueError(f"unknown MIA op {mia!r}: expected one of {', '.join(MIA_OPS)}")
        if ckmm_reduce not in REDUCTIONS:
            raise ValueError(f"unknown CKMM reduction {ckmm_reduce!r}: expected one of {', '.join(REDUCTIONS)}")
        if hpam is not None and (hpam.dim != feat_dim or list(hpam.bins) != list(bins)):
            raise ValueError(f"HPAM was built for dim {hpam.dim}, bins {list(hpam.bins)}; model has {feat_dim}, {bins}")
        c2, c3, c4 = backbone.channels[1:]
        if prototype_bank is not None and prototype_bank.dim != c4:
            raise ValueError(f"prototype bank has dim {prototype_bank.dim}, the backbone's layer4 has {c4} channels")
        if pfenet_prior and not backbone.can_split:
            raise ValueError(
                f"PFENet's prior needs the backbone's last stage run on a masked layer3; backbone "
                f"{backbone.name!r} cannot run it apart (only timm FeatureListNet-style models such as ResNets can)"
            )
        self.bins = [int(b) for b in bins]
        self.feat_dim = feat_dim
        self.ckmm_reduce = ckmm_reduce
        self.use_pfenet_prior = pfenet_prior
        self.mia = mia
        self.aux_weight = aux_weight

        # 1. backbone and the mid-level reductions cat(layer3, layer2) -> C
        self.backbone = backbone
        self.down_query = nn.Sequential(
            nn.Conv2d(c3 + c2, feat_dim, kernel_size=1, bias=False), nn.ReLU(inplace=True), nn.Dropout2d(p=dropout)
        )
        self.down_supp = nn.Sequential(
            nn.Conv2d(c3 + c2, feat_dim, kernel_size=1, bias=False), nn.ReLU(inplace=True), nn.Dropout2d(p=dropout)
        )
        # 2. class-aware (HPAM) and class-agnostic (CKMM) guidance
        self.hpam = hpam
        self.prototype_bank = prototype_bank
        # 3. decoder: [f_q, prototype, MIA(P_aw, P_ag), prior] -> PFENet's FEM
        guidance = aggregate_channels(hpam.out_dim if hpam is not None else 0, prototype_bank is not None, mia)
        in_channels = 2 * feat_dim + guidance + int(pfenet_prior)
        self.decoder = FeatureEnrichment(in_channels, feat_dim, len(self.bins), num_classes)

    # ------------------------------------------------------------------ features

    def _normalize(self, img: Tensor) -> Tensor:
        """uint8 images (0..255) through the backbone's `normalize`; float images are taken as normalised."""
        if img.dtype == torch.uint8:
            return self.backbone.normalize(img)
        if not img.is_floating_point():
            raise ValueError(f"images must be uint8 (0..255) or float (already normalised), got {img.dtype}")
        return img

    def _support_features(self, img: Tensor, masks: Tensor) -> tuple[Tensor, Tensor, Optional[Tensor]]:
        """Supports `[N, 3, H, W]` and masks `[N, H, W]` -> (reduced mid-level `[N, C, h, w]`, target mask
        `[N, 1, h, w]` float, layer4 `[N, D, h, w]` as PFENet's prior takes it, or None when the prior is off).

        The supports' layer4 feeds nothing but the prior (CKMM reads the query's): without it, it is not computed.
        """
        if self.backbone.can_split:
            _, layer2, layer3 = self.backbone.forward_to_layer3(img)
        else:
            _, layer2, layer3, _ = self.backbone(img)
        mask = resize_mask((masks == 1).unsqueeze(1), tuple(layer3.shape[-2:]))  # [N, 1, h, w]
        layer4 = None
        if self.use_pfenet_prior:  # PFENet: supp_feat_4 = layer4(supp_feat_3 * mask)
            layer4 = self.backbone.forward_layer4(layer3 * mask.to(layer3.dtype))
        return self.down_supp(torch.cat([layer3, layer2], dim=1)), mask, layer4

    @torch.no_grad()
    def extract_bank_features(self, img: Tensor) -> Tensor:
        """The feature CKMM's prototypes are taken from: layer4 `[B, D, h, w]` of images `[B, 3, H, W]`.

        Images are uint8 (normalised by the backbone) or float (already normalised). Runs the backbone in eval
        mode (a trainable backbone's BatchNorm statistics are left untouched).
        """
        was_training = self.backbone.training
        self.backbone.eval()
        try:
            return self.backbone(self._normalize(img))[3]
        finally:
            self.backbone.train(was_training)

    @torch.no_grad()
    def update_bank(self, img: Tensor, mask: Tensor, class_id: Tensor) -> int:
        """Add a batch of (image `[B, 3, H, W]`, mask `[B, H, W]` 0/1/255, class `[B]`) to the bank (Eq. 11).

        Images as `forward` takes them; masks uint8 or int64. Returns the number of instances added. Call
        `prototype_bank.all_reduce()` once every rank is done.
        """
        if self.prototype_bank is None:
            raise RuntimeError("this model has no prototype bank (model.ckmm.enabled is false)")
        return self.prototype_bank.update(self.extract_bank_features(img), mask, class_id)

    # ------------------------------------------------------------------ forward

    def forward(
        self, query_img: Tensor, support_imgs: Tensor, support_masks: Tensor, return_maps: bool = False
    ) -> Union[Tensor, JC2AOutput, JC2AMaps]:
        """Segment the query with K supports.

        Args:
            query_img: `[B, 3, H, W]`, uint8 (0..255, normalised here with the backbone's mean and std, on the
                images' device) or float (taken as already normalised).
            support_imgs: `[B, K, 3, H_s, W_s]`, uint8 or float as `query_img`.
            support_masks: `[B, K, H_s, W_s]` uint8 or int64: 1 target, 0 background, 255 ignore (not target).
            return_maps: also return the intermediate maps (for figures), in train and eval mode.

        Returns:
            Eval mode: logits `[B, 2, H, W]` (K > 1: `log` of the mean of the K one-shot softmaxes).
            Train mode: `JC2AOutput(logits, aux_logits)` for `loss`.
            With `return_maps`: `JC2AMaps(logits, aux_logits, maps)`, `maps` holding `"ckmm"` (CKMM on: P_ag
            `[B, 1, h, w]` at the feature size, Eq. 13, one per query), `"prior"` (prior on: PFENet's prior
            `[B, 1, h, w]`, the mean over the K supports) and `"foreground"` (`[B, H, W]` fp32, the softmax of
            the logits' foreground channel).

        Raises:
            RuntimeError: CKMM is on and its prototype bank is empty.
        """
        shots = support_imgs.shape[1]
        # 1. features; the query is shared by the K one-shot paths, which run as one batch of B*K
        _, q2, q3, q4 = self.backbone(self._normalize(query_img))  # q4 [B, D, h, w]: CKMM and the prior
        f_q = self.down_query(torch.cat([q3, q2], dim=1))  # [B, C, h, w]
        supports = self._normalize(support_imgs.flatten(0, 1))
        f_s, mask, s4 = self._support_features(supports, support_masks.flatten(0, 1))  # [B*K, ...]
        prototype = weighted_gap(f_s, mask).to(f_s.dtype)[..., None, None]  # Eq. 11, [B*K, C, 1, 1]
        size = tuple(f_q.shape[-2:])

        # 2. class-agnostic map (Eq. 13) per query, PFENet's prior per (query, support) pair
        p_ag_q = self.prototype_bank.probability_map(q4, self.ckmm_reduce) if self.prototype_bank is not None else None
        p_ag = None if p_ag_q is None else p_ag_q.repeat_interleave(shots, dim=0)
        prior = pfenet_prior(q4.repeat_interleave(shots, dim=0), s4, mask) if s4 is not None else None
        f_q = f_q.repeat_interleave(shots, dim=0)

        # 3. per bin: [f_q, prototype, MIA(P_aw, P_ag) (Eq. 14), prior]
        inputs = []
        masked_s = f_s * mask.to(f_s.dtype) if self.hpam is not None else None  # f~_s = f_s (.) M_s, then pooled
        for level, b in enumerate(self.bins):
            fq_b = F.adaptive_avg_pool2d(f_q, b)
            parts = [fq_b, prototype.expand(-1, -1, b, b)]
            p_aw = None
            if self.hpam is not None:  # Eq. 10
                p_aw = self.hpam(level, fq_b, F.adaptive_avg_pool2d(masked_s, b), F.adaptive_avg_pool2d(mask, b))
            p_ag_b = _resize(p_ag, b)
            parts += aggregate(p_aw, None if p_ag_b is None else p_ag_b.to(fq_b.dtype), self.mia)
            if prior is not None:
                parts.append(_resize(prior, b).to(fq_b.dtype))
            inputs.append(torch.cat(parts, dim=1))

        # 4. decoder, upsampling to the input size, K-shot fusion
        logits, aux = self.decoder(inputs, size)
        logits = F.interpolate(logits, size=query_img.shape[-2:], mode="bilinear", align_corners=True)
        logits = log_mean_softmax(logits, shots)
        if not (self.training or return_maps):
            return logits
        aux_logits = tuple(log_mean_softmax(a, shots) for a in aux)
        if not return_maps:
            return JC2AOutput(logits, aux_logits)
        maps = {"foreground": logits.float().softmax(dim=1)[:, 1]}
        if p_ag_q is not None:
            maps["ckmm"] = p_ag_q
        if prior is not None:
            maps["prior"] = prior.view(-1, shots, *prior.shape[1:]).mean(dim=1)
        return JC2AMaps(logits, aux_logits, maps)

    # ------------------------------------------------------------------ loss

    def loss(self, output: Union[Tensor, JC2AOutput, JC2AMaps], query_mask: Tensor) -> Tensor:
        """CE (ignore 255) on the final logits + `aux_weight` x mean CE of the per-bin outputs.

        Args:
            output: what `forward` returned (a bare logits tensor has no auxiliary term).
            query_mask: `[B, H, W]` uint8 or int64, 1 target, 0 background, 255 ignore.

        Returns:
            A scalar. For K > 1 the logits are log-probabilities, so the CE is the NLL of the fused prediction.
        """
        logits, aux = (output, ()) if isinstance(output, Tensor) else (output.logits, output.aux_logits)
        target = query_mask.long()
        main = _cross_entropy(logits, target)
        if not aux or self.aux_weight == 0:
            return main
        aux_loss = torch.stack([_cross_entropy(a, target) for a in aux]).mean()
        return main + self.aux_weight * aux_loss


def _resize(x: Optional[Tensor], b: int) -> Optional[Tensor]:
    """A probability map `[N, 1, h, w]` resized bilinearly to `b x b` (PFENet's `align_corners=True`)."""
    if x is None or tuple(x.shape[-2:]) == (b, b):
        return x
    return F.interpolate(x, size=(b, b), mode="bilinear", align_corners=True)


def build_model(
    cfg: Config, backbone_state: Optional[dict[str, Tensor]] = None, backbone_source: Optional[str] = None
) -> JC2A:
    """Build JC2A from a resolved config: `cfg.model` for the network, `cfg.data` for the bins and the bank.

    The bins are scaled to `cfg.data.image_size`; the prototype bank (CKMM) holds the base classes of
    `cfg.data.dataset` / `cfg.data.fold` and starts empty: fill it with `update_bank` (then
    `prototype_bank.all_reduce()`), or load a bank file into it (`jc2a.runs.files.load_bank`; `jc2a train` and
    `jc2a bank` read `cfg.model.ckmm.bank_file`). The model reads no files of its own: the backbone's weights
    are timm's hub weights, or `backbone_state` (what `model.backbone.weights` names, read by the run layer:
    `jc2a.runs.network.build_network`); a model with CKMM on and an empty bank refuses to run.

    `model.arch: prototype` builds the demo's simple baseline instead (`jc2a.model.baseline.PrototypeBaseline`).

    Raises:
        ValueError: `model.backbone.weights` names a file but no `backbone_state` is given.
    """
    mc = cfg.model
    if mc.backbone.weights is not None and backbone_state is None:
        raise ValueError(
            f"model.backbone.weights={mc.backbone.weights}: the model reads no files; build it with "
            f"jc2a.runs.network.build_network(cfg), which reads the file and passes its tensors"
        )
    if mc.arch == "prototype":
        from jc2a.model.baseline import build_baseline

        return build_baseline(cfg, backbone_state, backbone_source)  # type: ignore[return-value]
    backbone = config_backbone(cfg, backbone_state, backbone_source)
    bins = pyramid_bins(mc.bins, cfg.data.image_size)
    hpam = None
    if mc.hpam.p2p or mc.hpam.p2b:
        topk, block = pyramid_blocks(bins, mc.hpam.topk, mc.hpam.block, mc.bins)
        hpam = HPAM(
            mc.feat_dim,
            bins,
            topk,
            block,
            p2p=mc.hpam.p2p,
            p2b=mc.hpam.p2b,
            pos_embed=mc.hpam.pos_embed,
            attention=mc.hpam.attention,
            merge=mc.hpam.merge,
        )
    bank = None
    if mc.ckmm.enabled:
        bank = PrototypeBank(base_classes(cfg.data.dataset, cfg.data.fold), backbone.channels[-1])
    return JC2A(
        backbone,
        bins,
        feat_dim=mc.feat_dim,
        dropout=mc.dropout,
        hpam=hpam,
        prototype_bank=bank,
        ckmm_reduce=mc.ckmm.reduce,
        pfenet_prior=mc.pfenet_prior,
        mia=mc.mia,
        aux_weight=mc.aux_weight,
    )
