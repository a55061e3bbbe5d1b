"""A timm CNN as a four-stage, stride-8 feature extractor with its own input normalisation (docs/PROTOCOL.md)."""

from __future__ import annotations

import contextlib
import hashlib
import logging
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Sequence

import timm
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import FeatureDictNet
from torch import Tensor, nn

from jc2a.errors import UserError

__all__ = [
    "config_backbone",
    "BACKBONE_VARIANTS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "OUTPUT_STRIDE",
    "OUT_INDICES",
    "Backbone",
    "BackboneVariant",
    "create_backbone",
    "feature_size",
    "load_features_state",
    "normalization",
    "state_shapes",
    "weights_source",
]

log = logging.getLogger(__name__)

OUT_INDICES = (1, 2, 3, 4)  # layer1..layer4 of a ResNet; the four stages after the stem in general
OUT_INDICES_FOUR_LEVELS = (0, 1, 2, 3)  # models whose features_only has four levels (ConvNeXt)
# families built and run at stride 8 by tests/test_backbone.py (the README lists them)
TESTED_BACKBONES = (
    "resnet18", "resnet50", "resnet101", "resnet50d", "resnext50_32x4d", "seresnet50", "res2net50_14w_8s",
    "regnetx_002", "regnety_004", "efficientnet_b0", "mobilenetv2_100", "mobilenetv3_small_050", "mnasnet_100",
    "rexnet_100", "cspresnet50", "xception41", "convnext_atto", "pfenet_resnet50",
)  # fmt: skip
OUTPUT_STRIDE = 8
IMAGENET_MEAN: tuple[float, float, float] = tuple(IMAGENET_DEFAULT_MEAN)  # timm's, the one source
IMAGENET_STD: tuple[float, float, float] = tuple(IMAGENET_DEFAULT_STD)

Triple = tuple[float, float, float]


@dataclass(frozen=True)
class BackboneVariant:
    """A backbone name of JC2A's own: a timm architecture built with fixed kwargs, then stage dilations patched.

    `dilations` maps a stage to the dilation of the 3x3 conv (`conv2`) of EVERY block in it (padding = dilation,
    stride 1; the stage's `downsample.0` gets stride 1 too), as PFENet sets them after building its ResNet.
    timm's `output_stride=8` alone gives the first block of each dilated stage the previous stage's dilation.
    Such a variant has no hub weights: they come from `source` through `jc2a convert-weights`.
    """

    architecture: str  # the timm model it is built from
    kwargs: Mapping[str, Any] = field(default_factory=dict)  # extra `timm.create_model` kwargs
    dilations: Mapping[str, int] = field(default_factory=dict)  # stage -> dilation in every block
    source: str = ""  # the original weights file its weights are converted from
    mean: Triple = IMAGENET_MEAN
    std: Triple = IMAGENET_STD

    def patch(self, features: nn.Module) -> None:
        """Set the dilations of `features` (a timm ResNet, `features_only` or not) in place.

        Args:
            features: the model built from `architecture` with `kwargs`.
        """
        for stage, dilation in self.dilations.items():
            for block in features.get_submodule(stage):
                conv = block.conv2
                if conv.kernel_size != (3, 3):
                    raise ValueError(f"cannot dilate {stage}: its conv2 is {conv.kernel_size}, not 3x3")
                conv.dilation, conv.padding, conv.stride = (dilation, dilation), (dilation, dilation), (1, 1)
                if block.downsample is not None:
                    block.downsample[0].stride = (1, 1)


# PFENet's ResNets (semseg's "deep base": a 3->64->64->128 stem of 3x3 convs, plain 1x1 downsample) with its
# dilations: 2 in every block of layer3, 4 in every block of layer4 (PFENet's model/PFENet.py).
_PFENET_DILATIONS = {"layer3": 2, "layer4": 4}
_DEEP_STEM = {"stem_type": "deep", "stem_width": 64}
BACKBONE_VARIANTS: dict[str, BackboneVariant] = {
    "pfenet_resnet50": BackboneVariant("resnet50", _DEEP_STEM, _PFENET_DILATIONS, "initmodel/resnet50_v2.pth"),
    "pfenet_resnet101": BackboneVariant("resnet101", _DEEP_STEM, _PFENET_DILATIONS, "initmodel/resnet101_v2.pth"),
}


def normalization(backbone_name: str) -> tuple[Triple, Triple]:
    """`(mean, std)` in 0..1 units from timm's pretrained cfg of `backbone_name` (tags like `resnet50.a1_in1k` too).

    Reads the registered cfg only (the model is not built, nothing is downloaded); names timm does not know,
    or cfgs without three-channel statistics, fall back to ImageNet's mean and std (with a warning). The names of
    `BACKBONE_VARIANTS` give their own statistics (PFENet's: ImageNet's).
    """
    from timm.models import get_pretrained_cfg

    if backbone_name in BACKBONE_VARIANTS:
        variant = BACKBONE_VARIANTS[backbone_name]
        return variant.mean, variant.std
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
        weights_source: str = "unknown",
        train_bn: bool = False,
    ) -> None:
        """Args:
        features: a timm `features_only` model returning four maps.
        name: the timm model name it was built from (or a `BACKBONE_VARIANTS` name).
        frozen: freeze the weights and keep BatchNorm in eval mode.
        mean: per-channel input mean in 0..1 units (default: `normalization(name)`, timm's pretrained cfg).
        std: per-channel input std in 0..1 units (default: `normalization(name)`).
        weights_source: which weights `features` holds (`weights_source()`'s strings; `create_backbone` sets it).
        train_bn: a frozen backbone still follows `train()`: BatchNorm normalises with batch statistics and moves
            its running statistics (PFENet calls `model.train()` on its whole model); the weights stay frozen.
        """
        super().__init__()
        self.features = features
        self.name = name
        self.frozen = frozen
        self.train_bn = train_bn
        self.weights_source = weights_source
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
        """Switch train/eval; a frozen backbone stays in eval mode unless `train_bn` (PFENet's BatchNorm)."""
        return super().train(mode and (not self.frozen or self.train_bn))

    @property
    def moves(self) -> bool:
        """Whether training changes what this backbone computes (trainable weights, or BatchNorm statistics that
        move): CKMM's bank, taken from its layer4, then goes stale and is rebuilt."""
        return not self.frozen or self.train_bn

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
            raise UserError(
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


def weights_source(name: str, pretrained: bool) -> str:
    """Which weights `create_backbone(name, pretrained=)` gives from the hub, without building anything.

    `"timm:<architecture>.<tag>"` for timm's hub weights (an untagged name resolved to timm's default tag:
    `resnet50` -> `timm:resnet50.a1_in1k`), `"random init"` when not pretrained. (A local weights file is read by
    the run layer, which names it `"file:<basename> sha256:<hex>"`.)

    Args:
        name: a timm model name, or a `BACKBONE_VARIANTS` name.
        pretrained: whether hub weights are asked for.

    Raises:
        ValueError: hub weights asked for a variant that has none, or a pretrained tag timm does not know.
    """
    if not pretrained:
        return "random init"
    if name in BACKBONE_VARIANTS:
        source = BACKBONE_VARIANTS[name].source
        raise UserError(
            f"backbone {name!r} has no hub weights: convert PFENet's {source} with `jc2a convert-weights {source} "
            f"{name}.safetensors` and pass model.backbone.weights={name}.safetensors "
            f"(or model.backbone.pretrained=false for a random init)"
        )
    from timm.models import get_pretrained_cfg

    try:
        cfg = get_pretrained_cfg(name)
    except RuntimeError as exc:  # an unknown pretrained tag of a known architecture
        raise UserError(f"backbone {name!r}: {exc}") from None
    architecture = name.split(".")[0]
    if cfg is None:  # an architecture with no registered pretrained cfg
        return f"timm:{name}"
    architecture = cfg.architecture or architecture
    return f"timm:{architecture}.{cfg.tag}" if cfg.tag else f"timm:{architecture}"


def state_shapes(name: str) -> dict[str, tuple[int, ...]]:
    """Key -> shape of the state dict a `create_backbone(name)` backbone's `features` hold (timm's key layout).

    Built on the meta device: no memory, no weights, quick even for a ResNet101.

    Args:
        name: a timm model name, or a `BACKBONE_VARIANTS` name.
    """
    with torch.device("meta"):
        features = _create_features(name, pretrained=False)
    return {key: tuple(t.shape) for key, t in features.state_dict().items()}


def _create_features(name: str, *, pretrained: bool, **kwargs: Any) -> nn.Module:
    """The timm `features_only` model of `name` (a variant: its architecture, kwargs and dilation patch)."""
    variant = BACKBONE_VARIANTS.get(name)
    architecture = variant.architecture if variant is not None else name
    if not timm.is_model(architecture.split(".")[0]):
        raise UserError(f"backbone {name!r} is not a timm model{_did_you_mean(architecture.split('.')[0])}")
    extra = dict(variant.kwargs) if variant is not None else {}
    # five feature levels (a stem stage, then four: ResNets, RegNets, EfficientNets...) give their last four; four
    # levels (ConvNeXt: its stem is the first stage's stride-4 input) give all four
    features, error = None, None
    for indices in (OUT_INDICES, OUT_INDICES_FOUR_LEVELS):
        try:
            features = timm.create_model(
                architecture,
                pretrained=pretrained,
                features_only=True,
                out_indices=indices,
                output_stride=OUTPUT_STRIDE,
                **extra,
                **kwargs,
            )
            break
        except IndexError as exc:  # fewer feature levels than these indices: the four-level layout next
            error = exc
        except (TypeError, AssertionError, NotImplementedError) as exc:
            # TypeError: no `output_stride` (ViT, DenseNet...); AssertionError / NotImplementedError: the model
            # rejects output_stride=8 (no dilation: GhostNet, DLA...) or features_only
            error = exc
            break
    if features is None:
        reason = f"{type(error).__name__}: {error}".rstrip(": ")
        raise UserError(
            f"backbone {name!r} cannot be used: JC2A needs a timm CNN with four stages and dilation support for "
            f"output_stride={OUTPUT_STRIDE} ({reason}); these are tested: {', '.join(TESTED_BACKBONES)}"
        ) from error
    if variant is not None:
        variant.patch(features)
    return features


def _did_you_mean(name: str) -> str:
    """` (did you mean 'resnet50'?)` for a mistyped timm architecture, or nothing."""
    import difflib

    close = difflib.get_close_matches(name, [*timm.list_models(), *BACKBONE_VARIANTS], n=3, cutoff=0.75)
    return f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""


def load_features_state(features: nn.Module, name: str, tensors: Mapping[str, Tensor], where: str) -> None:
    """Load a state dict in timm's key layout into a `features_only` model, strictly.

    Every tensor the features need must be there with its shape; a key under a module the features do not have
    (the classifier `fc`, `head`, `conv_head`...: what `features_only` drops) is skipped; any other key is refused.
    timm's own `pretrained_cfg_overlay=dict(file=...)` loads a `features_only` model with `strict=False` (a
    missing tensor silently stays random): not used.

    Args:
        features: the model `create_backbone` built.
        name: the backbone's name, for messages.
        tensors: the weights (read by the caller; the model layer reads no files).
        where: what the tensors came from (a file name), the start of every error message.

    Raises:
        ValueError: a missing, mis-shaped or unexpected key, named with both shapes.
    """
    expected = features.state_dict()
    modules = {key.split(".")[0] for key in expected}
    for key, target in expected.items():
        if key not in tensors:
            raise UserError(f"{where}: weights for backbone {name!r} lack {key!r} (shape {list(target.shape)})")
        if tuple(tensors[key].shape) != tuple(target.shape):
            raise UserError(
                f"{where}: {key!r} has shape {list(tensors[key].shape)}, backbone {name!r} needs {list(target.shape)}"
            )
    for key in tensors:
        if key not in expected and key.split(".")[0] in modules:
            raise UserError(f"{where}: unexpected key {key!r} for backbone {name!r}")
    features.load_state_dict({k: v for k, v in tensors.items() if k in expected}, strict=True)


def create_backbone(
    name: str,
    *,
    pretrained: bool = False,
    state_dict: Optional[Mapping[str, Tensor]] = None,
    source: Optional[str] = None,
    where: Optional[str] = None,
    frozen: bool = True,
    train_bn: bool = False,
) -> Backbone:
    """Build a timm CNN, or one of `BACKBONE_VARIANTS` (`pfenet_resnet50`, `pfenet_resnet101`), as a four-stage
    stride-8 backbone; its `weights_source` says which weights it holds.

    Args:
        name: a timm model name (`resnet50.tv_in1k`, `resnet101`, `regnety_004`, `efficientnet_b0`, ...), or a
            variant (PFENet's deep-stem ResNets, dilated as PFENet dilates them; no hub weights).
        pretrained: load timm's pretrained weights from the hub (timm's own loading path).
        state_dict: weights in timm's key layout instead (a local file, read by the run layer:
            `jc2a.runs.files.read_weights`), loaded strictly (`load_features_state`).
        source: what `state_dict` is (`file:<name> sha256:<hex>`), for `weights_source`.
        where: where it came from (the file's path), the start of a refusal's message.
        frozen: freeze the weights and keep BatchNorm in eval mode (the paper's setting).
        train_bn: a frozen backbone's BatchNorm still follows `train()` (PFENet's behaviour; see `Backbone`).

    Raises:
        ValueError: the model cannot give four stages at stride 8 (e.g. a ViT, or no dilation support); a variant
            asked for hub weights; weights that do not fit (the first missing, unexpected or mis-shaped key named).
    """
    origin = (source or "state dict") if state_dict is not None else weights_source(name, pretrained)
    features = _create_features(name, pretrained=pretrained and state_dict is None)
    if state_dict is not None:
        load_features_state(features, name, state_dict, where or "backbone weights")
    reductions = list(features.feature_info.reduction())
    if len(reductions) != 4 or reductions[0] > OUTPUT_STRIDE or reductions[1:] != [OUTPUT_STRIDE] * 3:
        raise UserError(
            f"backbone {name!r} cannot be used: its stages {OUT_INDICES} come out at strides {reductions}, "
            f"JC2A needs [4, 8, 8, 8] (four stages, the last three dilated to stride {OUTPUT_STRIDE})"
        )
    # its mean/std: timm's pretrained cfg of `name` (a variant's own)
    return Backbone(features, name, frozen=frozen, weights_source=origin, train_bn=train_bn)


def config_backbone(
    cfg: Any, backbone_state: Optional[dict[str, Tensor]] = None, backbone_source: Optional[str] = None
) -> Backbone:
    """The backbone `model.backbone.*` describes (JC2A's and the demo's baseline's): its timm name, hub weights or
    `backbone_state` (named `backbone_source`), frozen or not, its BatchNorm statistics fixed or moving."""
    bc = cfg.model.backbone
    return create_backbone(bc.name, pretrained=bc.pretrained, state_dict=backbone_state, source=backbone_source,
                           where=bc.weights, frozen=bc.frozen, train_bn=bc.train_bn)  # fmt: skip
