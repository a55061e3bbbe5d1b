"""`jc2a convert-weights`: PFENet's ImageNet ResNet weights (semseg's deep-base .pth) to timm-layout safetensors.

PFENet's `initmodel/resnet50_v2.pth` / `resnet101_v2.pth` are plain state dicts of semseg's "deep base" ResNet:
a stem `conv1`/`bn1`, `conv2`/`bn2`, `conv3`/`bn3` (3->64->64->128), then `layer1..4` and `fc` in torchvision's
layout. timm's deep-stem ResNet (`stem_type='deep', stem_width=64`, JC2A's `pfenet_resnet50` / `pfenet_resnet101`)
is the same network with the stem in one Sequential: `conv1.0`, `conv1.1` (bn), `conv1.3`, `conv1.4` (bn),
`conv1.6`, then `bn1`. The layers' keys are unchanged.

The .pth is read with `torch.load(weights_only=True)`: a file holding pickled objects other than tensors and plain
containers is refused before anything in it runs. Every tensor is checked against the target architecture; the
output is written atomically as safetensors (nothing to unpickle when it is read back), for
`model.backbone.name=pfenet_resnet50 model.backbone.weights=OUT`.

`fc.*` (the ImageNet classifier) is dropped: the backbone is a `features_only` model without a head, and its
loader (`jc2a.model.backbone.load_features_state`) skips it. A missing BatchNorm
`num_batches_tracked` (older torch versions did not save it) is written as 0, torch's initial value.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import torch

from jc2a.errors import UserError

__all__ = ["FORMAT", "STEM_RENAMES", "convert", "to_timm_keys"]

FORMAT = "jc2a-backbone-weights/1"  # the safetensors metadata `format` of a converted file

# semseg's deep-base stem -> timm's deep stem (the first component of a key; layers and fc are unchanged)
STEM_RENAMES = {
    "conv1": "conv1.0",
    "bn1": "conv1.1",
    "conv2": "conv1.3",
    "bn2": "conv1.4",
    "conv3": "conv1.6",
    "bn3": "bn1",
}
_SEMSEG_STEM = {timm: semseg for semseg, timm in STEM_RENAMES.items()}
_DROPPED_PREFIXES = ("fc.",)
_ARCHS = ("pfenet_resnet50", "pfenet_resnet101")


def to_timm_keys(state: Mapping[str, Any]) -> dict[str, Any]:
    """Rename semseg's deep-base stem keys to timm's deep-stem keys (`conv1.weight` -> `conv1.0.weight`, `bn3.bias`
    -> `bn1.bias`, ...); every other key is kept as it is.

    Args:
        state: a state dict in semseg's key layout.
    """
    out = {}
    for key, value in state.items():
        head, _, rest = key.partition(".")
        out[f"{STEM_RENAMES[head]}.{rest}" if head in STEM_RENAMES and rest else key] = value
    return out


def _layer3_blocks(keys) -> int:
    return len({key.split(".")[1] for key in keys if key.startswith("layer3.") and key.count(".") >= 2})


def convert(
    src: Union[str, os.PathLike], dst: Union[str, os.PathLike], arch: Optional[str] = None
) -> tuple[str, Path, int]:
    """Convert PFENet's ResNet weights `src` (.pth, semseg keys) into `dst` (safetensors, timm keys).

    Args:
        src: the .pth file (e.g. PFENet's `initmodel/resnet50_v2.pth`).
        dst: the safetensors file to write (atomically; its folder is created).
        arch: `pfenet_resnet50` or `pfenet_resnet101`; None: from the number of layer3 blocks (6 or 23).

    Returns:
        `(arch, dst, number of tensors written)`.

    Raises:
        FileNotFoundError: `src` does not exist.
        ValueError: `src` is not a weights-only torch state dict, its architecture cannot be inferred, or a key is
            missing, unexpected or mis-shaped for `arch` (the first such key is named, with both shapes).
    """
    from jc2a.model.backbone import state_shapes
    from jc2a.runs.files import file_sha256, read_torch_weights, write_safetensors

    src, dst = Path(src), Path(dst)
    if arch is not None and arch not in _ARCHS:
        raise UserError(f"--arch must be one of {', '.join(_ARCHS)}, got {arch!r}")
    original = read_torch_weights(src)
    renamed = to_timm_keys(original)
    semseg_key = dict(zip(renamed, original))  # timm key -> the key in src, for messages
    shapes = {name: state_shapes(name) for name in ([arch] if arch else _ARCHS)}
    if arch is None:
        blocks = _layer3_blocks(renamed)
        matches = [name for name, expected in shapes.items() if _layer3_blocks(expected) == blocks]
        if not matches:
            known = ", ".join(f"{name}: {_layer3_blocks(expected)}" for name, expected in shapes.items())
            raise UserError(
                f"{src}: {blocks} layer3 blocks, not a PFENet ResNet ({known}); pass --arch to check it against one"
            )
        arch = matches[0]
    expected = shapes[arch]
    tensors: dict[str, torch.Tensor] = {}
    for key, shape in expected.items():
        value = renamed.get(key)
        if value is None and key.endswith(".num_batches_tracked"):
            value = torch.tensor(0, dtype=torch.long)  # not saved by older torch; torch's initial value
        if value is None:
            raise UserError(f"{src}: missing key {_named(key, semseg_key)}, which {arch} needs (shape {list(shape)})")
        if tuple(value.shape) != shape:
            raise UserError(
                f"{src}: {_named(key, semseg_key)} has shape {list(value.shape)}, {arch} needs {list(shape)}"
            )
        tensors[key] = value.detach().contiguous().clone()
    for key in renamed:
        if key not in expected and not key.startswith(_DROPPED_PREFIXES):
            raise UserError(f"{src}: unexpected key {_named(key, semseg_key)} for {arch}")
    metadata = {"format": FORMAT, "arch": arch, "source": src.name, "source_sha256": file_sha256(src)}
    write_safetensors(dst, tensors, metadata)
    return arch, dst, len(tensors)


def _named(key: str, semseg_key: Mapping[str, str]) -> str:
    """A timm key with the key it has (or would have) in semseg's layout when that differs, for messages."""
    original = semseg_key.get(key)
    if original is None:  # a key the file lacks: its name in semseg's layout
        head = next((h for h in _SEMSEG_STEM if key.startswith(h + ".")), None)
        original = _SEMSEG_STEM[head] + key[len(head) :] if head is not None else key
    return repr(key) if original == key else f"{original!r} (timm: {key!r})"


