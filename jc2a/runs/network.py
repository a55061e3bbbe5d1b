"""The network a config describes, with the files it names read here: the model layer reads no files."""

from __future__ import annotations

from jc2a.config import Config
from jc2a.model import JC2A, build_model
from jc2a.runs.files import read_weights

__all__ = ["build_network"]


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
