"""The network a config or a trained model file describes, with the files it names read here (the model layer reads
no files)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable, Mapping, Optional, Sequence, Union

import torch
from torch import nn

from jc2a.config import Config, ConfigError, load_config
from jc2a.model import JC2A, build_model
from jc2a.runs.files import read_model_file, read_weights, resolve_checkpoint

__all__ = ["build_network", "init_weights", "load_model_state", "load_trained_model", "trained_config"]


def build_network(cfg: Config) -> JC2A:
    """`jc2a.model.build_model(cfg)`, with `model.backbone.weights` (a local safetensors or weights-only torch
    file) read and its tensors loaded strictly into the backbone; its `weights_source` names the file's sha256.

    Raises:
        FileNotFoundError: the weights file does not exist.
        ValueError: it is not a weights file, or its tensors do not fit the backbone (the key is named).
    """
    if cfg.train.init_from:  # every weight comes from the trained model: nothing of the hub or a weights file
        built = cfg.model_copy(deep=True)
        built.model.backbone.pretrained, built.model.backbone.weights = False, None
        model = build_model(built)
        model.init_note = init_weights(model, cfg.train.init_from)
        return model
    if cfg.model.backbone.weights is None:
        return build_model(cfg)
    tensors, source = read_weights(cfg.model.backbone.weights)
    return build_model(cfg, tensors, source)


def init_weights(model: JC2A, source: Union[str, os.PathLike]) -> str:
    """Start `model` from a trained model (`train.init_from`: a run folder or model file; mmsegmentation's
    `load_from`): every weight and buffer, strictly, but the CKMM bank, which is kept only where it fits (the same
    base classes and feature width) and is otherwise left empty to be rebuilt for this run's fold. What happened,
    in words.

    Raises:
        ConfigError: another architecture: one line naming the first tensors that differ.
    """
    model_file, _ = resolve_checkpoint(source)
    tensors, _ = read_model_file(model_file)
    bank = model.prototype_bank
    keys = {f"prototype_bank.{k}" for k in ("class_ids", "sums", "counts")}
    own = {k: v for k, v in model.state_dict().items() if k not in keys}
    theirs = {k: v for k, v in tensors.items() if k not in keys}
    check_fits(own, theirs, model_file)
    model.load_state_dict({**model.state_dict(), **theirs}, strict=True)
    backbone = f"file:{model_file.name} (init_from)"
    model.backbone.weights_source = backbone
    fits = bank is not None and all(k in tensors for k in keys) and (
        torch.equal(tensors["prototype_bank.class_ids"], bank.class_ids)
        and tuple(tensors["prototype_bank.sums"].shape) == tuple(bank.sums.shape)
    )
    if fits:
        bank.load_state_tensors({k.split(".", 1)[1]: tensors[k] for k in keys})
        return f"weights of {model_file}; its CKMM bank kept (the same base classes)"
    return f"weights of {model_file}" + ("; CKMM bank rebuilt (other base classes)" if bank is not None else "")




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
    model_file, _ = resolve_checkpoint(checkpoint, weights)
    cfg = trained_config(checkpoint, configs, overrides, weights)
    tensors, metadata = read_model_file(model_file)
    model = build_model(cfg)
    load_model_state(model, tensors, model_file)
    model.backbone.weights_source = _trained_backbone_source(metadata, model_file)
    return model, cfg


def _trained_backbone_source(metadata: dict, model_file: Path) -> str:
    """What a trained model's backbone started from (the training's `weights_source`, stored in the model file):
    reports and MLflow name it, not the "random init" the backbone is built with before the file's tensors load."""
    try:
        source = json.loads(metadata.get("backbone_weights", "null"))
    except json.JSONDecodeError:
        source = None
    return source if isinstance(source, str) and source else f"in {model_file.name} (origin not recorded)"


def trained_config(
    checkpoint: Union[str, os.PathLike],
    configs: Optional[Sequence[Union[str, os.PathLike]]] = None,
    overrides: Iterable[str] = (),
    weights: str = "final",
) -> Config:
    """The config `load_trained_model` builds a trained model with, without loading its tensors: `configs` when
    given, else the run folder's config.yaml, else the one stored in the model file (read in a temporary folder:
    nothing is written beside someone's model); the backbone and bank come from the file."""
    import tempfile

    from safetensors import safe_open

    model_file, config_file = resolve_checkpoint(checkpoint, weights)
    overrides = list(overrides)
    if configs:
        cfg = load_config(list(configs), overrides)
    elif config_file is not None:
        cfg = load_config(config_file, overrides)
    else:
        read_model_file(model_file)  # a one-line refusal of anything that is not a jc2a model file
        with safe_open(os.fspath(model_file), framework="pt", device="cpu") as f:
            text = (f.metadata() or {})["config"]
        with tempfile.TemporaryDirectory() as folder:
            stored = Path(folder) / "config.yaml"
            stored.write_text(text)
            cfg = load_config(stored, overrides)
    cfg.model.backbone.pretrained, cfg.model.backbone.weights = False, None  # the file holds the weights
    cfg.model.ckmm.bank_file = None  # and the bank
    cfg.train.init_from = None
    return cfg


def load_model_state(model: nn.Module, tensors: Mapping[str, torch.Tensor], source: Union[str, Path]) -> None:
    """`model.load_state_dict(tensors)`, strictly, with one line naming the first tensor that does not fit."""
    check_fits(model.state_dict(), tensors, source)
    model.load_state_dict(dict(tensors), strict=True)


def check_fits(own: Mapping[str, torch.Tensor], tensors: Mapping[str, torch.Tensor], source: Union[str, Path]) -> None:
    """ConfigError naming the first tensor of `tensors` that is missing, unexpected or of another shape than in
    `own` (a model's state dict, or part of it)."""
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
