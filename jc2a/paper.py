"""The paper's knowledge in one place: each model variant of Tables 1-6, the config that builds it, its numbers.

A *variant* is a configuration of the model (the switches of HPAM, CKMM, MIA and PFENet's prior, as dotted
`model.*` overrides of the defaults); a *row* is one line of one of the paper's tables: a variant on a dataset and
backbone, with the paper's numbers (mIoU per fold and mean, FB-IoU, 1- and 5-shot where printed), its parameter
count (Table 3) or inference speed (Table 4), and the file of `configs/ablation/` that composes it. Reports,
`jc2a summary`, the toy tables' runner and the README's reproduction table read this module; a test checks the
ablation config files against it, and the numbers against the paper's text (`tests/data/paper_tables.txt`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping, NamedTuple, Optional

__all__ = [
    "ABLATION_KEYS",
    "CKMM_TRANSFER",
    "DATASETS",
    "ROWS",
    "VARIANTS",
    "Numbers",
    "PaperRow",
    "Variant",
    "comparison",
    "identify",
    "rows",
    "variant_name",
]

DATASETS = {"pascal5i": "PASCAL-5i", "coco20i": "COCO-20i"}
NAN4 = (math.nan,) * 4


class Numbers(NamedTuple):
    """One shot's numbers of a row: mIoU per fold (NaN where not printed), their mean, FB-IoU (None: '-')."""

    folds: tuple[float, float, float, float]
    miou: float
    fbiou: Optional[float]


@dataclass(frozen=True)
class Variant:
    """A configuration of the model the paper names: `model` holds the dotted overrides of the defaults."""

    key: str  # stable id: results.json's `method`, run names
    name: str  # as the paper writes it
    model: Mapping[str, Any] = field(default_factory=dict)  # e.g. {"model.hpam.p2p": False}; {} = the full JC2A


def _v(key: str, name: str, **model: Any) -> Variant:
    return Variant(key, name, {f"model.{k.replace('__', '.')}": v for k, v in model.items()})


_NO_HPAM = dict(hpam__p2p=False, hpam__p2b=False)
VARIANTS: dict[str, Variant] = {
    v.key: v
    for v in (
        _v("jc2a", "JC²A"),
        # Table 3: the components (baseline = PFENet without its prior)
        _v("baseline", "baseline", **_NO_HPAM, ckmm__enabled=False),
        _v("p2p", "P2P", hpam__p2b=False, ckmm__enabled=False),
        _v("p2b", "P2B", hpam__p2p=False, ckmm__enabled=False),
        _v("p2p+p2b", "P2P+P2B", ckmm__enabled=False),
        _v("ckmm", "CKMM", **_NO_HPAM),
        # Table 4: HPAM's attention (Eqs. 2-3) and P2B's position embeddings (Eq. 4)
        _v("na", "NA", hpam__attention="softmax"),
        _v("nla", "NLA", hpam__attention="linear_bn"),
        _v("cosine", "cosine", hpam__attention="cosine"),
        _v("no_pe", "ours w/o PE", hpam__pos_embed=False),
        # Table 5 (and PFENet's rows of Tables 1-2): PFENet's class-specific prior
        _v("pfenet", "PFENet", **_NO_HPAM, ckmm__enabled=False, pfenet_prior=True),
        _v("pfenet+ckmm", "PFENet + CKMM", **_NO_HPAM, pfenet_prior=True),
        # Table 6: the hybrid prototype (Eq. 10) and MIA (Eq. 14)
        _v("hpam_multiply", "HPAM multiply", hpam__merge="multiply"),
        _v("hpam_concat", "HPAM concat", hpam__merge="concat"),
        _v("mia_multiply", "MIA multiply", mia="multiply"),
        _v("mia_add", "MIA add", mia="add"),
    )
}
# Every key a variant sets: what tells the variants apart (the rest of the model config is the same for all).
ABLATION_KEYS = tuple(sorted({k for v in VARIANTS.values() for k in v.model}))
HSNET = "hsnet"  # Tables 1-2 compare with HSNet, which this code does not build


@dataclass(frozen=True)
class PaperRow:
    """One line of one of the paper's tables."""

    table: int
    label: str  # the line's name in the paper
    dataset: str
    backbone: str  # the architecture: resnet50 | resnet101
    variant: str  # a VARIANTS key, or HSNET
    shots: Mapping[int, Numbers]  # {1: ..., 5: ...}; {} where the paper's text lost the numbers
    config: Optional[str] = None  # the configs/ablation/ file (stem) that composes it; None: the defaults
    params_m: Optional[float] = None  # Table 3: parameters in millions, as printed
    speed: Optional[tuple[float, float]] = None  # Table 4: inference speed ratio, 1- and 5-shot

    def config_files(self) -> list[str]:
        """The `--config` files that build this row, in order, relative to the configs folder."""
        files = [f"{self.dataset}.yaml"]
        if self.backbone != "resnet50":
            files.append(f"backbone/{self.backbone}.yaml")
        if self.config:
            files.append(f"ablation/{self.config}.yaml")
        return files


def _n(f0: float, f1: float, f2: float, f3: float, miou: float, fbiou: Optional[float]) -> Numbers:
    return Numbers((f0, f1, f2, f3), miou, fbiou)


def _mean(one: float, five: float, fb_one: Optional[float] = None, fb_five: Optional[float] = None) -> dict:
    """Tables 3, 4, 6 print the mean over folds only."""
    return {1: Numbers(NAN4, one, fb_one), 5: Numbers(NAN4, five, fb_five)}


# Numbers as printed. Table 1's JC2A ResNet50 5-shot mean (65.4, also in Tables 3, 4 and 6) is not the mean of
# its folds (65.55); Table 2 has no PFENet ResNet50 row.
ROWS: tuple[PaperRow, ...] = (
    # Table 1, PASCAL-5i
    PaperRow(1, "PFENet [38]", "pascal5i", "resnet50", "pfenet",
             {1: _n(61.7, 69.5, 55.4, 56.3, 60.8, 73.3), 5: _n(63.1, 70.7, 55.8, 57.9, 61.9, 73.9)}, "table5_pfenet"),
    PaperRow(1, "HSNet [28]", "pascal5i", "resnet50", HSNET,
             {1: _n(64.3, 70.7, 60.3, 60.5, 64.0, 76.7), 5: _n(70.3, 73.2, 67.4, 67.1, 69.5, 80.6)}),
    PaperRow(1, "JC²A", "pascal5i", "resnet50", "jc2a",
             {1: _n(67.3, 72.4, 57.7, 60.7, 64.5, 76.5), 5: _n(68.6, 72.9, 58.7, 62.0, 65.4, 76.8)}),
    PaperRow(1, "PFENet [38]", "pascal5i", "resnet101", "pfenet",
             {1: _n(60.5, 69.4, 54.4, 55.9, 60.1, 72.9), 5: _n(62.8, 70.4, 54.9, 57.6, 61.4, 73.5)}, "table5_pfenet"),
    PaperRow(1, "HSNet [28]", "pascal5i", "resnet101", HSNET,
             {1: _n(67.3, 72.3, 62.0, 63.1, 66.2, 77.6), 5: _n(71.8, 74.4, 67.0, 68.3, 70.4, 80.6)}),
    PaperRow(1, "JC²A", "pascal5i", "resnet101", "jc2a",
             {1: _n(68.2, 74.4, 59.8, 63.0, 66.4, 78.8), 5: _n(70.6, 75.2, 61.9, 64.8, 68.1, 80.6)}),
    # Table 2, COCO-20i
    PaperRow(2, "HSNet [28]", "coco20i", "resnet50", HSNET,
             {1: _n(36.3, 43.1, 38.7, 38.7, 39.2, 68.2), 5: _n(43.3, 51.3, 48.2, 45.0, 46.9, 70.7)}),
    PaperRow(2, "JC²A", "coco20i", "resnet50", "jc2a",
             {1: _n(40.4, 47.4, 44.5, 43.5, 44.0, 70.0), 5: _n(44.3, 53.5, 46.0, 45.8, 47.4, 71.5)}),
    PaperRow(2, "PFENet [38]", "coco20i", "resnet101", "pfenet",
             {1: _n(34.3, 33.0, 32.3, 30.1, 32.4, 58.6), 5: _n(38.5, 38.6, 38.2, 34.3, 37.4, 61.9)}, "table5_pfenet"),
    PaperRow(2, "HSNet [28]", "coco20i", "resnet101", HSNET,
             {1: _n(37.2, 44.1, 42.4, 41.3, 41.2, 69.1), 5: _n(45.9, 53.0, 51.8, 47.1, 49.5, 72.4)}),
    PaperRow(2, "JC²A", "coco20i", "resnet101", "jc2a",
             {1: _n(41.5, 48.6, 45.6, 42.9, 44.7, 70.6), 5: _n(43.7, 55.2, 47.3, 47.7, 48.5, 72.0)}),
    # Table 3, PASCAL-5i ResNet50: the components, mean mIoU only, and the parameter count
    PaperRow(3, "baseline", "pascal5i", "resnet50", "baseline", _mean(59.0, 60.6), "table3_baseline", 34.09),
    PaperRow(3, "P2P", "pascal5i", "resnet50", "p2p", _mean(61.3, 62.2), "table3_p2p", 34.52),
    PaperRow(3, "P2B", "pascal5i", "resnet50", "p2b", _mean(62.7, 63.3), "table3_p2b", 34.61),
    PaperRow(3, "P2P+P2B", "pascal5i", "resnet50", "p2p+p2b", _mean(63.6, 64.7), "table3_p2p_p2b", 34.61),
    PaperRow(3, "CKMM", "pascal5i", "resnet50", "ckmm", _mean(61.7, 62.8), "table3_ckmm", 34.11),
    PaperRow(3, "all", "pascal5i", "resnet50", "jc2a", _mean(64.5, 65.4), "table3_all", 34.64),
    # Table 4, PASCAL-5i ResNet50: HPAM's attention; mIoU, FB-IoU and inference speed
    PaperRow(4, "NA", "pascal5i", "resnet50", "na", _mean(64.2, 65.5, 76.9, 77.2), "table4_na", speed=(1.00, 0.19)),
    PaperRow(4, "NLA", "pascal5i", "resnet50", "nla", _mean(62.8, 63.3, 74.5, 74.9), "table4_nla",
             speed=(4.11, 0.84)),
    PaperRow(4, "cosine", "pascal5i", "resnet50", "cosine", _mean(62.3, 62.8, 74.4, 73.3), "table4_cosine",
             speed=(2.86, 0.55)),
    PaperRow(4, "ours w/o PE", "pascal5i", "resnet50", "no_pe", _mean(63.1, 64.0, 74.9, 75.2), "table4_no_pe",
             speed=(4.07, 0.80)),
    PaperRow(4, "ours", "pascal5i", "resnet50", "jc2a", _mean(64.5, 65.4, 76.5, 76.8), "table4_ours",
             speed=(4.10, 0.82)),
    # Table 5: CKMM added to PFENet (ResNet50 on PASCAL-5i, ResNet101 on COCO-20i); the text lost these numbers
    PaperRow(5, "PFENet", "pascal5i", "resnet50", "pfenet", {}, "table5_pfenet"),
    PaperRow(5, "PFENet + CKMM", "pascal5i", "resnet50", "pfenet+ckmm", {}, "table5_pfenet_ckmm"),
    PaperRow(5, "PFENet", "coco20i", "resnet101", "pfenet", {}, "table5_pfenet"),
    PaperRow(5, "PFENet + CKMM", "coco20i", "resnet101", "pfenet+ckmm", {}, "table5_pfenet_ckmm"),
    # Table 6, PASCAL-5i ResNet50: how the hybrid prototype (Eq. 10) and MIA (Eq. 14) aggregate
    PaperRow(6, "HPAM multiply", "pascal5i", "resnet50", "hpam_multiply", _mean(60.2, 61.8, 72.3, 73.5),
             "table6_hpam_multiply"),
    PaperRow(6, "HPAM add", "pascal5i", "resnet50", "jc2a", _mean(64.5, 65.4, 76.5, 76.8), "table6_hpam_add"),
    PaperRow(6, "HPAM concat", "pascal5i", "resnet50", "hpam_concat", _mean(64.0, 64.8, 75.7, 76.1),
             "table6_hpam_concat"),
    PaperRow(6, "MIA multiply", "pascal5i", "resnet50", "mia_multiply", _mean(58.8, 60.9, 70.1, 73.0),
             "table6_mia_multiply"),
    PaperRow(6, "MIA add", "pascal5i", "resnet50", "mia_add", _mean(62.7, 63.3, 74.3, 75.0), "table6_mia_add"),
    PaperRow(6, "MIA concat", "pascal5i", "resnet50", "jc2a", _mean(64.5, 65.4, 76.5, 76.8), "table6_mia_concat"),
)  # fmt: skip

# Table 5's text keeps one row per dataset, SCL [49]'s numbers (PASCAL-5i ResNet50, COCO-20i ResNet101), each with
# a subscript that reads as CKMM's gain ("+0.65", some rendered "±0.70"); the PFENet and MM-Net rows are lost.
# (dataset, shot) -> ((fold-0..3, mIoU), (their subscripts)).
CKMM_TRANSFER: dict[tuple[str, int], tuple[tuple[float, ...], tuple[float, ...]]] = {
    ("pascal5i", 1): ((63.0, 70.0, 56.5, 57.7, 61.8), (0.65, 1.63, 0.47, 0.70, 0.86)),
    ("pascal5i", 5): ((64.5, 70.9, 57.3, 58.7, 62.9), (0.79, 1.28, 0.54, 0.77, 0.85)),
    ("coco20i", 1): ((36.4, 38.6, 37.5, 35.4, 37.0), (1.26, 1.30, 0.78, 1.03, 1.09)),
    ("coco20i", 5): ((38.9, 40.5, 41.5, 38.7, 39.9), (1.17, 1.34, 0.88, 1.01, 1.10)),
}


def rows(table: Optional[int] = None, **match: Any) -> list[PaperRow]:
    """The rows of `table` (all tables when None) whose fields equal `match` (e.g. `dataset="pascal5i"`)."""
    return [
        r for r in ROWS if (table is None or r.table == table) and all(getattr(r, k) == v for k, v in match.items())
    ]


def identify(model: Mapping[str, Any], defaults: Mapping[str, Any]) -> str:
    """The variant a model config is: a `VARIANTS` key, or `custom:` and what differs from the full JC2A.

    Args:
        model: the config's dotted values (`jc2a.config.flatten(cfg)`; only `ABLATION_KEYS` are read).
        defaults: the same of the default config (the full JC2A).
    """
    values = {k: model[k] for k in ABLATION_KEYS}
    for v in VARIANTS.values():
        if values == {k: v.model.get(k, defaults[k]) for k in ABLATION_KEYS}:
            return v.key
    changed = [f"{k.removeprefix('model.')}={_text(values[k])}" for k in ABLATION_KEYS if values[k] != defaults[k]]
    return "custom:" + ",".join(changed)


def _text(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def variant_name(key: str) -> str:
    """How reports print a variant key (`jc2a` -> `JC²A`; a custom one as it is)."""
    return VARIANTS[key].name if key in VARIANTS else ("HSNet" if key == HSNET else key)


def comparison(dataset: str, backbone: str, variant: str) -> list[PaperRow]:
    """The paper's rows to print beside a result of `variant` on (dataset, backbone architecture), the row of the
    variant itself last: for the full JC2A, Tables 1-2's PFENet, HSNet and JC2A rows; for an ablation, its rows of
    Tables 3-6 (PFENet also its Tables 1-2 rows). Rows whose numbers the paper's text lost are left out."""
    found = [r for r in rows(dataset=dataset, backbone=backbone) if r.shots]
    if variant == "jc2a":
        return [r for r in found if r.table in (1, 2)]
    return [r for r in found if r.variant == variant]
