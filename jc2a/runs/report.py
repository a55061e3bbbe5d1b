"""Evaluation reports: the summary over folds and seeds, results.json/.md beside the paper's rows (`jc2a.paper`)."""

from __future__ import annotations

import json
import math
import os
import statistics
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence, Union

from jc2a.atomic import write_text
from jc2a.config import Config, flatten
from jc2a.paper import DATASETS, ROWS, VARIANTS, Numbers, comparison, identify, variant_name

__all__ = ["architecture", "markdown", "mean_std", "reproduction_markdown", "summarize", "variant", "write_results"]

FOLDS = (0, 1, 2, 3)


def variant(cfg: Config) -> str:
    """The paper's variant a config's model is (`jc2a.paper.VARIANTS` key: `jc2a`, `baseline`, `p2p`, `na`, ...), or
    `custom:` and what differs from the full JC2A."""
    return identify(flatten(cfg), flatten(Config()))


# --------------------------------------------------------------------------- summary


def mean_std(values: Sequence[float]) -> tuple[float, float]:
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
            mean, std = mean_std(per_seed)
            entry[f"{metric}_per_seed"] = per_seed
            entry[f"{metric}_mean"], entry[f"{metric}_std"] = mean, std
            entry[f"fold_{metric}"] = {}
            entry[f"fold_{metric}_std"] = {}
            for f in folds:
                fm, fs = mean_std([r[metric] for r in members if r["fold"] == f])
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
    return variant_name(method)


def _paper_cells(row: Optional[Numbers]) -> list[Optional[float]]:
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
    lines.append("- scored at each query's original resolution (PFENet's protocol): per-class intersection and "
                 "union summed over all episodes; mIoU = mean class IoU of the fold's novel classes; FB-IoU pooled")
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
        paper = comparison(dataset, architecture(backbone), method)
        for row in paper:
            label = f"Table {row.table} {row.label} (paper)" if row.table > 2 else f"{row.label} (paper)"
            lines.append(_table_row(backbone, label, shots, {k: _paper_cells(row.shots.get(k)) for k in shots}))
        ours = {k: _our_cells(by_shot.get(k)) for k in shots}
        lines.append(_table_row(backbone, f"{_method_name(method)} (this run)", shots, ours))
        if paper:  # this run minus the paper's own row (the last: JC2A in Tables 1-2, the ablation's otherwise)
            reference = {k: _paper_cells(paper[-1].shots.get(k)) for k in shots}
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


def write_results(out: Union[str, os.PathLike], results: Mapping[str, Any]) -> tuple[Path, Path]:
    """results.json and results.md in `out`, each written atomically."""
    out = Path(out)
    data = write_text(out / "results.json", json.dumps(results, indent=1, default=str) + "\n")
    text = write_text(out / "results.md", markdown(results))
    return data, text


# --------------------------------------------------------------------------- the README's reproduction table


def _pair(one: float, five: float, fb_one: Optional[float] = None, fb_five: Optional[float] = None) -> str:
    def cell(miou: float, fb: Optional[float]) -> str:
        return f"{miou:.1f}" + (f" ({fb:.1f})" if fb is not None else "")

    return f"{cell(one, fb_one)} | {cell(five, fb_five)}"


def reproduction_markdown() -> str:
    """A row per row of the paper's Tables 1-6 that this code builds (`jc2a.paper.ROWS`; HSNet's are another
    architecture): the configs that compose it and the paper's 1-shot / 5-shot mIoU (FB-IoU), mean over the four
    folds. The README holds this text (a test keeps the two equal)."""
    lines = [
        "| table | dataset | backbone | row | configs (`--config` each, in order) | paper 1-shot mIoU (FB-IoU) "
        "| 5-shot |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in ROWS:
        if row.variant not in VARIANTS:
            continue
        label = row.label
        if row.table <= 2 and row.variant == "pfenet":
            label += " (PFENet's architecture: baseline + prior)"
        if row.params_m is not None:
            label += f" ({row.params_m:.2f} M)"
        if row.speed is not None:
            label += f" (1-shot speed {row.speed[0]:.2f}x)"
        configs = " ".join(f"configs/{f}" for f in row.config_files())
        one, five = row.shots.get(1), row.shots.get(5)
        numbers = _pair(one.miou, five.miou, one.fbiou, five.fbiou) if one and five else "lost in the paper's text | —"
        lines.append(
            f"| {row.table} | {DATASETS[row.dataset]} | {_backbone_name(row.backbone)} | {label} | `{configs}` | "
            f"{numbers} |"
        )
    return "\n".join(lines) + "\n"
