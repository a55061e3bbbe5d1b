"""Evaluation reports: the paper's numbers (Tables 1-6) as data, the summary over folds and seeds, results.json/.md."""

from __future__ import annotations

import json
import math
import os
import statistics
from pathlib import Path
from typing import Any, Iterable, Mapping, NamedTuple, Optional, Sequence, Union

from jc2a.config import Config

__all__ = [
    "PAPER",
    "PAPER_ABLATION",
    "PAPER_AGGREGATION",
    "PAPER_CKMM_TRANSFER",
    "PAPER_HPAM",
    "PaperRow",
    "markdown",
    "paper_comparison",
    "summarize",
    "variant",
    "write_atomic",
    "write_results",
]

FOLDS = (0, 1, 2, 3)
DATASETS = {"pascal5i": "PASCAL-5i", "coco20i": "COCO-20i"}
METHODS = {"JC2A": "JC²A", "PFENet": "PFENet [38]", "HSNet": "HSNet [28]"}


class PaperRow(NamedTuple):
    """One shot's numbers of a method in the paper's Tables 1-2: per-fold mIoU, their mean, FB-IoU (None: '-')."""

    folds: tuple[float, float, float, float]
    miou: float
    fbiou: Optional[float]


def _row(f0: float, f1: float, f2: float, f3: float, miou: float, fbiou: Optional[float]) -> PaperRow:
    return PaperRow((f0, f1, f2, f3), miou, fbiou)


# Tables 1 (PASCAL-5i) and 2 (COCO-20i): dataset -> timm backbone -> method -> shot -> row. JC2A and the two
# baselines this code can reproduce or descends from (PFENet: the decoder and protocol; HSNet: the protocol).
# Table 2 has no PFENet ResNet50 row. Numbers as printed: Table 1's JC2A ResNet50 5-shot mean (65.4, also in
# Tables 3, 4 and 6) is not the mean of its folds (65.55).
PAPER: dict[str, dict[str, dict[str, dict[int, PaperRow]]]] = {
    "pascal5i": {
        "resnet50": {
            "PFENet": {1: _row(61.7, 69.5, 55.4, 56.3, 60.8, 73.3), 5: _row(63.1, 70.7, 55.8, 57.9, 61.9, 73.9)},
            "HSNet": {1: _row(64.3, 70.7, 60.3, 60.5, 64.0, 76.7), 5: _row(70.3, 73.2, 67.4, 67.1, 69.5, 80.6)},
            "JC2A": {1: _row(67.3, 72.4, 57.7, 60.7, 64.5, 76.5), 5: _row(68.6, 72.9, 58.7, 62.0, 65.4, 76.8)},
        },
        "resnet101": {
            "PFENet": {1: _row(60.5, 69.4, 54.4, 55.9, 60.1, 72.9), 5: _row(62.8, 70.4, 54.9, 57.6, 61.4, 73.5)},
            "HSNet": {1: _row(67.3, 72.3, 62.0, 63.1, 66.2, 77.6), 5: _row(71.8, 74.4, 67.0, 68.3, 70.4, 80.6)},
            "JC2A": {1: _row(68.2, 74.4, 59.8, 63.0, 66.4, 78.8), 5: _row(70.6, 75.2, 61.9, 64.8, 68.1, 80.6)},
        },
    },
    "coco20i": {
        "resnet50": {
            "HSNet": {1: _row(36.3, 43.1, 38.7, 38.7, 39.2, 68.2), 5: _row(43.3, 51.3, 48.2, 45.0, 46.9, 70.7)},
            "JC2A": {1: _row(40.4, 47.4, 44.5, 43.5, 44.0, 70.0), 5: _row(44.3, 53.5, 46.0, 45.8, 47.4, 71.5)},
        },
        "resnet101": {
            "PFENet": {1: _row(34.3, 33.0, 32.3, 30.1, 32.4, 58.6), 5: _row(38.5, 38.6, 38.2, 34.3, 37.4, 61.9)},
            "HSNet": {1: _row(37.2, 44.1, 42.4, 41.3, 41.2, 69.1), 5: _row(45.9, 53.0, 51.8, 47.1, 49.5, 72.4)},
            "JC2A": {1: _row(41.5, 48.6, 45.6, 42.9, 44.7, 70.6), 5: _row(43.7, 55.2, 47.3, 47.7, 48.5, 72.0)},
        },
    },
}

# Table 3 (PASCAL-5i, ResNet50, mean mIoU over folds): `ablation_row` -> (parameters in M, 1-shot, 5-shot).
PAPER_ABLATION: dict[str, tuple[float, float, float]] = {
    "baseline": (34.09, 59.0, 60.6),
    "p2p": (34.52, 61.3, 62.2),
    "p2b": (34.61, 62.7, 63.3),
    "p2p+p2b": (34.61, 63.6, 64.7),
    "ckmm": (34.11, 61.7, 62.8),
    "all": (34.64, 64.5, 65.4),
}

# Table 4 (PASCAL-5i, ResNet50): HPAM's attention -> (1-shot mIoU, FB-IoU, inference speed, 5-shot the same).
# Keys are `model.hpam.attention`; "linear_relu/no_pe" is ours without P2B's position embeddings.
PAPER_HPAM: dict[str, tuple[float, float, float, float, float, float]] = {
    "softmax": (64.2, 76.9, 1.00, 65.5, 77.2, 0.19),  # NA
    "linear_bn": (62.8, 74.5, 4.11, 63.3, 74.9, 0.84),  # NLA
    "cosine": (62.3, 74.4, 2.86, 62.8, 73.3, 0.55),
    "linear_relu/no_pe": (63.1, 74.9, 4.07, 64.0, 75.2, 0.80),
    "linear_relu": (64.5, 76.5, 4.10, 65.4, 76.8, 0.82),
}
PAPER_HPAM_NAMES = {"softmax": "NA", "linear_bn": "NLA", "cosine": "cosine", "linear_relu/no_pe": "ours w/o PE"}

# Table 6 (PASCAL-5i, ResNet50): (component, op) -> (1-shot mIoU, FB-IoU, 5-shot mIoU, FB-IoU). HPAM's op is
# `model.hpam.merge` (Eq. 10), MIA's `model.mia` (Eq. 14).
PAPER_AGGREGATION: dict[tuple[str, str], tuple[float, float, float, float]] = {
    ("hpam", "multiply"): (60.2, 72.3, 61.8, 73.5),
    ("hpam", "add"): (64.5, 76.5, 65.4, 76.8),
    ("hpam", "concat"): (64.0, 75.7, 64.8, 76.1),
    ("mia", "multiply"): (58.8, 70.1, 60.9, 73.0),
    ("mia", "add"): (62.7, 74.3, 63.3, 75.0),
    ("mia", "concat"): (64.5, 76.5, 65.4, 76.8),
}

# Table 5 (CKMM added to other methods): the paper's text extraction keeps one row per dataset, SCL [49]'s numbers
# (PASCAL-5i ResNet50, COCO-20i ResNet101) each with a subscript that reads as CKMM's gain ("+0.65", some rendered
# "±0.70"); the PFENet and MM-Net rows are lost. (dataset, shot) -> ((fold-0..3, mIoU), (their subscripts)).
PAPER_CKMM_TRANSFER: dict[tuple[str, int], tuple[tuple[float, ...], tuple[float, ...]]] = {
    ("pascal5i", 1): ((63.0, 70.0, 56.5, 57.7, 61.8), (0.65, 1.63, 0.47, 0.70, 0.86)),
    ("pascal5i", 5): ((64.5, 70.9, 57.3, 58.7, 62.9), (0.79, 1.28, 0.54, 0.77, 0.85)),
    ("coco20i", 1): ((36.4, 38.6, 37.5, 35.4, 37.0), (1.26, 1.30, 0.78, 1.03, 1.09)),
    ("coco20i", 5): ((38.9, 40.5, 41.5, 38.7, 39.9), (1.17, 1.34, 0.88, 1.01, 1.10)),
}


# --------------------------------------------------------------------------- which paper row a config is


def variant(cfg: Config) -> str:
    """The paper's name for a config's model: "JC2A" for the full model with the paper's choices, else its Table 3
    row (`baseline`, `p2p`, ... as `ablation_row`) plus what differs from the paper's choices (`+attention=softmax`,
    `+no_pe`, `+hpam.merge=concat`, `+mia=add`)."""
    from jc2a.runs.common import ablation_row

    mc, row = cfg.model, ablation_row(cfg)
    hpam_on = mc.hpam.p2p or mc.hpam.p2b
    changed = []
    if hpam_on and mc.hpam.attention != "linear_relu":
        changed.append(f"attention={mc.hpam.attention}")
    if mc.hpam.p2b and not mc.hpam.pos_embed:
        changed.append("no_pe")
    if hpam_on and mc.hpam.merge != "add":
        changed.append(f"hpam.merge={mc.hpam.merge}")
    if mc.ckmm.enabled and mc.mia != "concat":
        changed.append(f"mia={mc.mia}")
    if row == "all" and not changed:
        return "JC2A"
    return "+".join([row, *changed])


def paper_comparison(dataset: str, backbone: str, method: str) -> list[tuple[str, dict[int, PaperRow]]]:
    """The paper's rows to print beside ours: `[(label, {shot: PaperRow})]`, empty when no row has this setting.

    Tables 1-2 (PFENet, HSNet, JC2A) for the full model on a (dataset, backbone) the paper reports; Tables 3, 4
    and 6 (PASCAL-5i, ResNet50, mean mIoU / FB-IoU only) for an ablation the paper ran.
    """
    table = PAPER.get(dataset, {}).get(backbone)
    if table is None:
        return []
    if method == "JC2A":
        return [(f"{METHODS[m]} (paper)", table[m]) for m in ("PFENet", "HSNet", "JC2A") if m in table]
    if (dataset, backbone) != ("pascal5i", "resnet50"):
        return []
    nan4 = (math.nan,) * 4
    if method in PAPER_ABLATION:  # Table 3: mean mIoU only
        _, one, five = PAPER_ABLATION[method]
        return [(f"Table 3 {method} (paper)", {1: PaperRow(nan4, one, None), 5: PaperRow(nan4, five, None)})]
    table4 = {"all+attention=" + k: k for k in ("softmax", "linear_bn", "cosine")}
    table4["all+no_pe"] = "linear_relu/no_pe"
    if method in table4:
        m1, f1, _, m5, f5, _ = PAPER_HPAM[table4[method]]
        name = PAPER_HPAM_NAMES[table4[method]]
        return [(f"Table 4 {name} (paper)", {1: PaperRow(nan4, m1, f1), 5: PaperRow(nan4, m5, f5)})]
    for (component, op), (m1, f1, m5, f5) in PAPER_AGGREGATION.items():
        key = "hpam.merge" if component == "hpam" else "mia"
        if method == f"all+{key}={op}":
            return [
                (f"Table 6 {component.upper()} {op} (paper)", {1: PaperRow(nan4, m1, f1), 5: PaperRow(nan4, m5, f5)})
            ]
    return []


# --------------------------------------------------------------------------- summary


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarize(rows: Iterable[Mapping[str, Any]]) -> list[dict]:
    """Per (dataset, backbone, method, shot): the mean over folds of each seed's mIoU and FB-IoU, then the mean
    and sample std over seeds; per fold the mean over seeds. Rows are results.json rows."""
    groups: dict[tuple, list[Mapping[str, Any]]] = {}
    for r in rows:
        key = (r["dataset"], r["backbone"], r.get("method", ""), r.get("weights", "final"), r["shot"])
        groups.setdefault(key, []).append(r)
    out = []
    for (dataset, backbone, method, weights, shot), members in groups.items():
        folds = sorted({r["fold"] for r in members})
        seeds = sorted({r["seed"] for r in members})
        entry: dict[str, Any] = {"dataset": dataset, "backbone": backbone, "method": method, "weights": weights}
        entry["shot"] = shot
        entry.update(folds=folds, seeds=seeds, episodes=members[0]["episodes"])
        for metric in ("miou", "fbiou"):
            per_seed = [statistics.fmean(r[metric] for r in members if r["seed"] == s) for s in seeds]
            mean, std = _mean_std(per_seed)
            entry[f"{metric}_per_seed"] = per_seed
            entry[f"{metric}_mean"], entry[f"{metric}_std"] = mean, std
            entry[f"fold_{metric}"] = {}
            entry[f"fold_{metric}_std"] = {}
            for f in folds:
                fm, fs = _mean_std([r[metric] for r in members if r["fold"] == f])
                entry[f"fold_{metric}"][str(f)], entry[f"fold_{metric}_std"][str(f)] = fm, fs
        entry["all_folds"] = folds == list(FOLDS)
        out.append(entry)
    return out


# --------------------------------------------------------------------------- results.md


WEIGHTS_NOTE = {
    "final": "Scored: the final weights (the run's model.safetensors).",
    "best": "Scored: the best/ weights, picked on the validation episodes. PFENet's reported numbers are this kind: "
    "it keeps the epoch with the best mIoU on the test episodes themselves, so they are selected on the test set.",
}


def architecture(name: str) -> str:
    """The network a backbone name builds, without its weights tag or jc2a's variant prefix: `resnet50.tv_in1k`,
    `pfenet_resnet50` and `resnet50` are all the paper's ResNet50."""
    return name.split(".")[0].removeprefix("pfenet_")


def _backbone_name(name: str) -> str:
    return name.replace("resnet", "ResNet") if name.startswith("resnet") else name


def _method_name(method: str) -> str:
    return METHODS.get(method, method)


def _paper_cells(row: Optional[PaperRow]) -> list[Optional[float]]:
    """fold-0..3, mIoU, FB-IoU of a paper row (None where the paper has no number)."""
    if row is None:
        return [None] * 6
    folds = [None if math.isnan(v) else v for v in row.folds]
    return [*folds, row.miou, row.fbiou]


def _our_cells(s: Optional[Mapping[str, Any]]) -> list[Optional[tuple[float, float]]]:
    """fold-0..3, mIoU, FB-IoU of a summary entry as (mean, std over seeds) pairs (None: not evaluated)."""
    if s is None:
        return [None] * 6
    folds = [(s["fold_miou"][str(f)], s["fold_miou_std"][str(f)]) if str(f) in s["fold_miou"] else None for f in FOLDS]
    return [*folds, (s["miou_mean"], s["miou_std"]), (s["fbiou_mean"], s["fbiou_std"])]


def _minus(ours: Optional[tuple[float, float]], paper: Optional[float]) -> Optional[float]:
    return None if ours is None or paper is None else ours[0] - paper


def _table_row(backbone: str, label: str, shots: Sequence[int], cells: Mapping[int, list], signed: bool = False) -> str:
    """One markdown table row: backbone, method, then per shot fold-0..3, mIoU, FB-IoU."""
    out = [_backbone_name(backbone), label]
    for k in shots:
        for value in cells[k]:
            if value is None:
                out.append("–")
            elif isinstance(value, tuple):
                out.append(f"{value[0]:.1f} ± {value[1]:.1f}" if value[1] else f"{value[0]:.1f}")
            else:
                out.append(f"{value:+.1f}" if signed else f"{value:.1f}")
    return "| " + " | ".join(out) + " |"


def markdown(results: Mapping[str, Any]) -> str:
    """results.md: per (dataset, backbone, method) a table laid out like the paper's Tables 1-2 (folds, mIoU,
    FB-IoU, for 1- and 5-shot), the paper's rows beside ours where the setting matches, then every row."""
    summary, rows = results["summary"], results["rows"]
    seeds = sorted({r["seed"] for r in rows})
    lines = ["# Evaluation", ""]
    lines.append(f"- checkpoint: `{results['checkpoint']}`")
    episodes = sorted({r["episodes"] for r in rows})
    lines.append(f"- {', '.join(map(str, episodes))} episodes per fold and seed; seeds {seeds} (cells with several "
                 "seeds: mean ± sample std over seeds)")  # fmt: skip
    lines.append("- scored at each query's original resolution (SPEC §4): per-class intersection and union summed "
                 "over all episodes; mIoU = mean class IoU of the fold's novel classes; FB-IoU pooled")  # fmt: skip
    lines.append("")
    settings = sorted({(s["dataset"], s["backbone"], s["method"], s.get("weights", "final")) for s in summary})
    for dataset, backbone, method, weights in settings:
        setting = (dataset, backbone, method, weights)
        by_shot = {s["shot"]: s for s in summary if (s["dataset"], s["backbone"], s["method"], s["weights"]) == setting}
        shots = sorted(set(by_shot) | {1, 5})
        lines.append(f"## {DATASETS.get(dataset, dataset)}, {_backbone_name(backbone)}, {_method_name(method)}, "
                     f"{weights} weights")  # fmt: skip
        lines.append("")
        lines.append(WEIGHTS_NOTE[weights])
        lines.append("")
        header = ["Backbone", "Method"]
        for k in shots:
            header += [f"{k}-shot fold-{f}" for f in FOLDS] + [f"{k}-shot mIoU", f"{k}-shot FB-IoU"]
        lines.append("| " + " | ".join(header) + " |")
        lines.append("|" + "|".join("---" for _ in header) + "|")
        paper = paper_comparison(dataset, architecture(backbone), method)
        for label, by in paper:
            lines.append(_table_row(backbone, label, shots, {k: _paper_cells(by.get(k)) for k in shots}))
        ours = {k: _our_cells(by_shot.get(k)) for k in shots}
        lines.append(_table_row(backbone, f"{_method_name(method)} (this run)", shots, ours))
        if paper:  # this run minus the paper's own row (the last: JC2A in Tables 1-2, the ablation's otherwise)
            reference = {k: _paper_cells(paper[-1][1].get(k)) for k in shots}
            delta = {k: [_minus(a, b) for a, b in zip(ours[k], reference[k])] for k in shots}
            for k, s in by_shot.items():
                if not s["all_folds"]:  # a mean over fewer folds is not the paper's mean: compare folds only
                    delta[k][4:] = [None, None]
            lines.append(_table_row(backbone, "this run − paper", shots, delta, signed=True))
        lines.append("")
        partial = sorted({f for s in by_shot.values() if not s["all_folds"] for f in s["folds"]})
        if partial:
            lines.append(f"This run's mIoU and FB-IoU are over fold(s) {', '.join(map(str, partial))} only, not the "
                         "paper's mean over four folds.")  # fmt: skip
        if not paper:
            lines.append(f"No paper row for this setting ({DATASETS.get(dataset, dataset)}, "
                         f"{_backbone_name(backbone)}, {_method_name(method)}): the paper reports ResNet50 and "
                         "ResNet101 on PASCAL-5i and COCO-20i, ablations on PASCAL-5i ResNet50.")  # fmt: skip
        lines.append("")
    lines += ["## Every fold, shot and seed", "", "| dataset | backbone | method | weights | fold | shot | seed | "
              "episodes | mIoU | FB-IoU |", "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        lines.append(f"| {r['dataset']} | {r['backbone']} | {_method_name(r.get('method', ''))} | "
                     f"{r.get('weights', 'final')} | {r['fold']} | {r['shot']} | {r['seed']} | {r['episodes']} | "
                     f"{r['miou']:.2f} | {r['fbiou']:.2f} |")  # fmt: skip
    sources = sorted({r["backbone_weights"] for r in rows if r.get("backbone_weights")})
    if sources:
        lines += ["", "Backbone weights: " + "; ".join(f"`{w}`" for w in sources)]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- files


def write_atomic(path: Union[str, os.PathLike], text: str) -> Path:
    """Write `text` to a temporary name beside `path`, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_results(out: Union[str, os.PathLike], results: Mapping[str, Any]) -> tuple[Path, Path]:
    """results.json and results.md in `out`, each written atomically."""
    out = Path(out)
    data = write_atomic(out / "results.json", json.dumps(results, indent=1, default=str) + "\n")
    text = write_atomic(out / "results.md", markdown(results))
    return data, text


# --------------------------------------------------------------------------- the README's reproduction table


def _pair(one: float, five: float, fb_one: Optional[float] = None, fb_five: Optional[float] = None) -> str:
    def cell(miou: float, fb: Optional[float]) -> str:
        return f"{miou:.1f}" + (f" ({fb:.1f})" if fb is not None else "")

    return f"{cell(one, fb_one)} | {cell(five, fb_five)}"


def table3_config(row: str) -> str:
    """The config file of a row of the paper's Table 3 (`PAPER_ABLATION`'s keys), relative to the repository."""
    return f"configs/ablation/table3_{row.replace('+', '_')}.yaml"


def reproduction_markdown() -> str:
    """A row per row of the paper's Tables 1-6 (JC2A's and the baselines this code builds): the configs that
    compose it and the paper's 1-shot / 5-shot mIoU (FB-IoU), mean over the four folds. The README holds this text
    (a test keeps the two equal)."""
    data = {"pascal5i": "configs/pascal5i.yaml", "coco20i": "configs/coco20i.yaml"}
    backbone = {"resnet50": "", "resnet101": " configs/backbone/resnet101.yaml"}
    rows = [
        "| table | dataset | backbone | row | configs (`--config` each, in order) | paper 1-shot mIoU (FB-IoU) "
        "| 5-shot |",
        "|---|---|---|---|---|---|---|",
    ]
    ablation_file = {"JC2A": "", "PFENet": " configs/ablation/table5_pfenet.yaml", "HSNet": None}
    for number, dataset in ((1, "pascal5i"), (2, "coco20i")):
        for name, methods in PAPER[dataset].items():
            for method, per_shot in methods.items():
                extra = ablation_file[method]
                if extra is None:
                    continue  # another architecture: its number is the paper's, not a config of this code
                configs = f"{data[dataset]}{backbone[name]}{extra}".strip()
                one, five = per_shot[1], per_shot[5]
                label = METHODS[method] + (" (PFENet's architecture: baseline + prior)" if method == "PFENet" else "")
                rows.append(
                    f"| {number} | {DATASETS[dataset]} | {_backbone_name(name)} | {label} | `{configs}` | "
                    f"{_pair(one.miou, five.miou, one.fbiou, five.fbiou)} |"
                )
    base = "configs/pascal5i.yaml"
    for row, (params, one, five) in PAPER_ABLATION.items():
        rows.append(
            f"| 3 | PASCAL-5i | ResNet50 | {row} ({params:.2f} M) | `{base} {table3_config(row)}` | {_pair(one, five)} |"
        )
    files = {"softmax": "table4_na", "linear_bn": "table4_nla", "cosine": "table4_cosine",
             "linear_relu/no_pe": "table4_no_pe", "linear_relu": "table4_ours"}  # fmt: skip
    for key, (one, fb1, speed1, five, fb5, _) in PAPER_HPAM.items():
        name = PAPER_HPAM_NAMES.get(key, "ours")
        rows.append(
            f"| 4 | PASCAL-5i | ResNet50 | {name} (1-shot speed {speed1:.2f}x) | "
            f"`{base} configs/ablation/{files[key]}.yaml` | {_pair(one, five, fb1, fb5)} |"
        )
    for dataset, name in (("pascal5i", "resnet50"), ("coco20i", "resnet101")):
        for config, label in (("table5_pfenet", "PFENet"), ("table5_pfenet_ckmm", "PFENet + CKMM")):
            rows.append(
                f"| 5 | {DATASETS[dataset]} | {_backbone_name(name)} | {label} | "
                f"`{data[dataset]}{backbone[name]} configs/ablation/{config}.yaml` | lost in the paper's text | — |"
            )
    for (component, op), (one, fb1, five, fb5) in PAPER_AGGREGATION.items():
        rows.append(
            f"| 6 | PASCAL-5i | ResNet50 | {component.upper()} {op} | "
            f"`{base} configs/ablation/table6_{component}_{op}.yaml` | {_pair(one, five, fb1, fb5)} |"
        )
    return "\n".join(rows) + "\n"
