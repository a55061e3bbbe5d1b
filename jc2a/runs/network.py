"""The network a config or a trained model file describes, with the files it names read here (the model layer reads
no files)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Mapping, Optional, Sequence, Union

import torch
from torch import nn

from jc2a.config import Config, ConfigError, load_config
from jc2a.model import JC2A, build_model
from jc2a.runs.files import read_model_file, read_weights, resolve_checkpoint

__all__ = ["build_network", "load_model_state", "load_trained_model"]


def build_network(cfg: Config) -> JC2A:
    """`jc2a.model.build_model(cfg)`, with `model.backbone.weights` (a local safetensors or weights-only torch
    file) read and its tensors loaded strictly into the backbone; its `weights_source` names the file's sha256.

    Raises:
        FileNotFoundError: the weights file does not exist.
        ValueError: it is not a weights file, or its tensors do not fit the backbone (the key is named).
    """
    if cfg.model.backbone.weights is None:
        return build_model(cfg)
    tensors, source = read_weights(cfg.model.backbone.weights)
    return build_model(cfg, tensors, source)


def load_trained_model(
    checkpoint: Union[str, os.PathLike],
    configs: Optional[Sequence[Union[str, os.PathLike]]] = None,
    overrides: Iterable[str] = (),
    weights: str = "final",
) -> tuple[nn.Module, Config]:
    """A trained JC2A and its config from a model file or run folder.

    The config is `configs` when given (e.g. another fold's data settings), else the run folder's config.yaml,
    else the one stored in the model file; `overrides` apply last. The backbone is built without downloading
    anything (its weights are in the file). A file from an incompatible config is refused with one line naming
    the first tensor that does not fit. `weights`: a run folder's final model or its best/ one.
    """
    model_file, config_file = resolve_checkpoint(checkpoint, weights)
    tensors, metadata = read_model_file(model_file)
    overrides = list(overrides)
    if configs:
        cfg = load_config(list(configs), overrides)
    elif config_file is not None:
        cfg = load_config(config_file, overrides)
    else:
        stored = model_file.with_name(f".{model_file.stem}.config.yaml")
        try:
            stored.write_text(metadata["config"])
            cfg = load_config(stored, overrides)
        finally:
            stored.unlink(missing_ok=True)
    cfg.model.backbone.pretrained, cfg.model.backbone.weights = False, None  # the file holds the weights
    cfg.model.ckmm.bank_file = None  # and the bank
    model = build_model(cfg)
    load_model_state(model, tensors, model_file)
    return model, cfg


def load_model_state(model: nn.Module, tensors: Mapping[str, torch.Tensor], source: Union[str, Path]) -> None:
    """`model.load_state_dict(tensors)`, strictly, with one line naming the first tensor that does not fit."""
    own = model.state_dict()
    missing = [k for k in own if k not in tensors]
    extra = [k for k in tensors if k not in own]
    if missing or extra:
        what = f"lacks {missing[0]}" if missing else f"has {extra[0]}, which this model does not"
        raise ConfigError(
            f"{source}: checkpoint from an incompatible config: it {what} ({len(missing)} missing, {len(extra)} "
            f"unexpected tensors); evaluate it with the config it was trained with"
        )
    for k, v in own.items():
        if tuple(v.shape) != tuple(tensors[k].shape):
            raise ConfigError(
                f"{source}: checkpoint from an incompatible config: {k} is {tuple(tensors[k].shape)} in the file, "
                f"{tuple(v.shape)} in this model"
            )
    model.load_state_dict(dict(tensors), strict=True)
