"""A timm CNN as a four-stage, stride-8 feature extractor, frozen by default (SPEC §2 Backbone)."""

from __future__ import annotations

import os
from typing import Optional, Union

import timm
import torch
from torch import Tensor, nn

# one lookup of a backbone's input statistics, shared with the data pipeline that normalises with them
from jc2a.data.transforms import IMAGENET_MEAN, IMAGENET_STD, normalization

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "Backbone", "create_backbone", "feature_size", "normalization"]

OUT_INDICES = (1, 2, 3, 4)  # layer1..layer4 of a ResNet; the four stages after the stem in general
OUTPUT_STRIDE = 8


def feature_size(image_size: int) -> int:
    """Side of the stride-8 feature maps for a square input: `(size - 1) // 8 + 1` (473 -> 60, 129 -> 17)."""
    return (image_size - 1) // OUTPUT_STRIDE + 1


class Backbone(nn.Module):
    """Four feature maps of a timm `features_only` network, all but the first at stride 8.

    When frozen, the parameters do not require grad, the forward runs under `no_grad`, and the module stays
    in `eval()` whatever `train()` asks, so BatchNorm statistics never move.
    """

    def __init__(self, features: nn.Module, name: str, *, frozen: bool = True) -> None:
        """Args:
        features: a timm `features_only` model returning four maps.
        name: the timm model name it was built from (recorded with the prototype bank).
        frozen: freeze the weights and keep BatchNorm in eval mode.
        """
        super().__init__()
        self.features = features
        self.name = name
        self.frozen = frozen
        self.channels: list[int] = list(features.feature_info.channels())
        self.reductions: list[int] = list(features.feature_info.reduction())
        if frozen:
            self.requires_grad_(False)
            self.eval()

    def train(self, mode: bool = True) -> Backbone:
        """Switch train/eval; a frozen backbone always stays in eval mode."""
        return super().train(mode and not self.frozen)

    def forward(self, x: Tensor) -> list[Tensor]:
        """`[B, 3, H, W]` -> four maps `[B, channels[i], h_i, w_i]`: stride 4, then three at stride 8."""
        if self.frozen:
            with torch.no_grad():
                return list(self.features(x))
        return list(self.features(x))


def create_backbone(
    name: str,
    *,
    pretrained: bool = False,
    weights: Optional[Union[str, os.PathLike]] = None,
    frozen: bool = True,
) -> Backbone:
    """Build a timm CNN as a four-stage stride-8 backbone.

    Args:
        name: a timm model name (`resnet50`, `resnet101`, `regnety_004`, `efficientnet_b0`, ...).
        pretrained: load timm's pretrained weights (from the hub, or from `weights`).
        weights: a local weights file (timm's `pretrained_cfg_overlay=dict(file=...)`); implies `pretrained`.
        frozen: freeze the weights and keep BatchNorm in eval mode (the paper's setting).

    Raises:
        FileNotFoundError: `weights` is given and does not exist.
        ValueError: the model cannot give four stages at stride 8 (e.g. a ViT, or no dilation support).
    """
    kwargs: dict = {}
    if weights is not None:
        if not os.path.isfile(weights):
            raise FileNotFoundError(f"backbone weights file not found: {weights}")
        pretrained = True
        kwargs["pretrained_cfg_overlay"] = dict(file=os.fspath(weights))
    if not timm.is_model(name.split(".")[0]):
        raise ValueError(f"backbone {name!r} is not a timm model")
    try:
        features = timm.create_model(
            name,
            pretrained=pretrained,
            features_only=True,
            out_indices=OUT_INDICES,
            output_stride=OUTPUT_STRIDE,
            **kwargs,
        )
    except (TypeError, IndexError, AssertionError, NotImplementedError) as exc:
        # TypeError: no `output_stride` (ViT, DenseNet...); IndexError: fewer than five feature levels;
        # AssertionError / NotImplementedError: the model rejects output_stride=8 or features_only.
        raise ValueError(
            f"backbone {name!r} cannot be used: JC2A needs a timm CNN with four stages (out_indices "
            f"{OUT_INDICES}) and dilation support for output_stride={OUTPUT_STRIDE} ({type(exc).__name__}: {exc})"
        ) from exc
    reductions = list(features.feature_info.reduction())
    if len(reductions) != 4 or reductions[0] > OUTPUT_STRIDE or reductions[1:] != [OUTPUT_STRIDE] * 3:
        raise ValueError(
            f"backbone {name!r} cannot be used: its stages {OUT_INDICES} come out at strides {reductions}, "
            f"JC2A needs [4, 8, 8, 8] (four stages, the last three dilated to stride {OUTPUT_STRIDE})"
        )
    return Backbone(features, name, frozen=frozen)
