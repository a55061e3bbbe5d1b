"""The JC2A network: backbone, HPAM, CKMM, MIA decoder."""

from jc2a.model.backbone import Backbone, create_backbone, normalization
from jc2a.model.ckmm import PrototypeBank
from jc2a.model.jc2a import JC2A, JC2AMaps, JC2AOutput, build_model

__all__ = [
    "JC2A",
    "Backbone",
    "JC2AMaps",
    "JC2AOutput",
    "PrototypeBank",
    "build_model",
    "create_backbone",
    "normalization",
]
