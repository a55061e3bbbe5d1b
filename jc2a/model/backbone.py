"""A timm CNN as a four-stage, stride-8 feature extractor with its own input normalisation (SPEC §2 Backbone)."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
from typing import Optional, Sequence, Union

import timm
import torch
from timm.models import FeatureDictNet
from torch import Tensor, nn

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "OUTPUT_STRIDE",
    "OUT_INDICES",
    "Backbone",
    "create_backbone",
    "feature_size",
    "normalization",
]

log = logging.getLogger(__name__)

OUT_INDICES = (1, 2, 3, 4)  # layer1..layer4 of a ResNet; the four stages after the stem in general
OUTPUT_STRIDE = 8
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

Triple = tuple[float, float, float]


def normalization(backbone_name: str) -> tuple[Triple, Triple]:
    """`(mean, std)` in 0..1 units from timm's pretrained cfg of `backbone_name` (tags like `resnet50.a1_in1k` too).

    Reads the registered cfg only (the model is not built, nothing is downloaded); names timm does not know,
    or cfgs without three-channel statistics, fall back to ImageNet's mean and std (with a warning).
    """
    from timm.models import get_pretrained_cfg

    try:
        cfg = get_pretrained_cfg(backbone_name)
    except RuntimeError:  # an unknown pretrained tag of a known architecture
        cfg = None
    mean, std = getattr(cfg, "mean", None), getattr(cfg, "std", None)
    if mean is None or std is None or len(mean) != 3 or len(std) != 3:
        log.warning("no 3-channel pretrained mean/std for backbone %r in timm; using ImageNet's", backbone_name)
        return IMAGENET_MEAN, IMAGENET_STD
    return _triple(mean), _triple(std)


def _triple(values: Sequence[float]) -> Triple:
    a, b, c = (float(v) for v in values)
    return a, b, c


def feature_size(image_size: int) -> int:
    """Side of the stride-8 feature maps for a square input: `(size - 1) // 8 + 1` (473 -> 60, 129 -> 17)."""
    return (image_size - 1) // OUTPUT_STRIDE + 1


class Backbone(nn.Module):
    """Four feature maps of a timm `features_only` network, all but the first at stride 8.

    The backbone owns its input normalisation: `normalize` turns uint8 images into `(x / 255 - mean) / std`
    with the statistics its weights were trained with. When frozen, the parameters do not require grad, the
    forward runs under `no_grad`, and the module stays in `eval()` whatever `train()` asks, so BatchNorm
    statistics never move. For timm's FeatureListNet-style models (ResNets, RegNets...) the stages up to
    layer3 and the last stage also run separately (`forward_to_layer3`, `forward_layer4`): PFENet's prior
    runs layer4 on a masked layer3, and the supports' layer4 is skipped when nothing needs it.
    """

    def __init__(
        self,
        features: nn.Module,
        name: str,
        *,
        frozen: bool = True,
        mean: Optional[Sequence[float]] = None,
        std: Optional[Sequence[float]] = None,
    ) -> None:
        """Args:
        features: a timm `features_only` model returning four maps.
        name: the timm model name it was built from.
        frozen: freeze the weights and keep BatchNorm in eval mode.
        mean: per-channel input mean in 0..1 units (default: `normalization(name)`, timm's pretrained cfg).
        std: per-channel input std in 0..1 units (default: `normalization(name)`).
        """
        super().__init__()
        self.features = features
        self.name = name
        self.frozen = frozen
        self.channels: list[int] = list(features.feature_info.channels())
        self.reductions: list[int] = list(features.feature_info.reduction())
        if mean is None or std is None:
            default_mean, default_std = normalization(name)
            mean = default_mean if mean is None else mean
            std = default_std if std is None else std
        self.mean: Triple = _triple(mean)
        self.std: Triple = _triple(std)
        self.register_buffer("pixel_mean", torch.tensor(self.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(self.std).view(1, 3, 1, 1), persistent=False)
        self._layer4_start = _layer4_start(features)
        if frozen:
            self.requires_grad_(False)
            self.eval()

    def _apply(self, fn, recurse=True):  # nn.Module's signature
        # `.half()` / `.to(dtype)` must not round the statistics: the buffers follow device moves only.
        out = super()._apply(fn, recurse)
        for name, values in (("pixel_mean", self.mean), ("pixel_std", self.std)):
            buf = getattr(self, name)
            if buf.dtype != torch.float32:
                setattr(self, name, torch.tensor(values, device=buf.device).view(1, 3, 1, 1))
        return out

    def train(self, mode: bool = True) -> Backbone:
        """Switch train/eval; a frozen backbone always stays in eval mode."""
        return super().train(mode and not self.frozen)

    def _grad(self) -> contextlib.AbstractContextManager:
        return torch.no_grad() if self.frozen else contextlib.nullcontext()

    def normalize(self, x: Tensor) -> Tensor:
        """uint8 images `[N, 3, H, W]` (0..255), on any device -> float32 `(x / 255 - mean) / std` `[N, 3, H, W]`."""
        if x.dtype != torch.uint8:
            raise ValueError(f"Backbone.normalize expects uint8 images (0..255), got {x.dtype}")
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"Backbone.normalize expects images [N, 3, H, W], got shape {tuple(x.shape)}")
        mean, std = self.pixel_mean.to(x.device), self.pixel_std.to(x.device)
        return (x.float() / 255.0 - mean) / std

    def forward(self, x: Tensor) -> list[Tensor]:
        """`[B, 3, H, W]` -> four maps `[B, channels[i], h_i, w_i]`: stride 4, then three at stride 8."""
        with self._grad():
            return list(self.features(x))

    @property
    def can_split(self) -> bool:
        """Whether the stages up to layer3 and the last stage run separately (timm FeatureListNet-style models)."""
        return self._layer4_start is not None

    def _split_modules(self) -> tuple[list[tuple[str, nn.Module]], list[nn.Module]]:
        if self._layer4_start is None:
            raise ValueError(
                f"backbone {self.name!r} cannot run its last stage apart from the first three (only timm "
                f"FeatureListNet-style models such as ResNets and RegNets can); PFENet's prior needs it"
            )
        items = list(self.features.items())
        return items[: self._layer4_start], [m for _, m in items[self._layer4_start :]]

    def forward_to_layer3(self, x: Tensor) -> list[Tensor]:
        """`[B, 3, H, W]` -> the first three maps (layer1, layer2, layer3), without running the last stage.

        Raises:
            ValueError: the backbone cannot be split (`can_split` is False).
        """
        head, _ = self._split_modules()
        returned = self.features.return_layers
        out = []
        with self._grad():
            for name, module in head:
                x = module(x)
                if name in returned:
                    out.append(x)
        return out

    def forward_layer4(self, layer3: Tensor) -> Tensor:
        """The last stage on a given layer3 map: `[B, channels[2], h, w]` -> `[B, channels[3], h, w]`.

        Raises:
            ValueError: the backbone cannot be split (`can_split` is False).
        """
        _, tail = self._split_modules()
        x = layer3
        with self._grad():
            for module in tail:
                x = module(x)
        return x

    @torch.no_grad()
    def weights_digest(self) -> str:
        """Hex sha256 of the state_dict tensors (name, dtype, shape, bytes; sorted by name): the weights' identity."""
        digest = hashlib.sha256()
        state = self.state_dict()
        for name in sorted(state):
            t = state[name].detach().cpu().contiguous()
            digest.update(f"{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
            digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        return digest.hexdigest()


def _layer4_start(features: nn.Module) -> Optional[int]:
    """Index of the first module after the third returned stage of a timm FeatureDictNet/FeatureListNet, or None.

    Such a model is a ModuleDict run in order, returning the outputs of `return_layers`; its modules after the
    third returned stage compute the fourth (for a ResNet: `layer4`). Other feature models cannot be split.
    """
    if not isinstance(features, FeatureDictNet) or features.concat:
        return None
    names = list(features.keys())
    returned = [i for i, n in enumerate(names) if n in features.return_layers]
    if len(returned) != 4 or returned[-1] != len(names) - 1:
        return None
    return returned[2] + 1


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
    return Backbone(features, name, frozen=frozen)  # its mean/std: timm's pretrained cfg of `name`
