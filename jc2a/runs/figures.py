"""Qualitative figures as the paper's Figs. 3-4: supports, query with ground truth, prediction, CKMM's map."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence, Union

import numpy as np

from jc2a.runs.preview import overlay, save_figure

GROUND_TRUTH = (255, 220, 0)  # yellow, as the paper's figures
PREDICTION = (30, 144, 255)  # blue


def content_box(image: np.ndarray, mask: np.ndarray) -> tuple[int, int]:
    """(h, w) of the top-left part of a test canvas `[S, S, 3]` that holds the image: the bounding box of the
    pixels that are not black padding or not 255 in the mask (the canvas pads with both)."""
    inside = image.any(axis=-1) | (mask != 255)
    rows, cols = np.flatnonzero(inside.any(axis=1)), np.flatnonzero(inside.any(axis=0))
    if rows.size == 0:
        return image.shape[:2]
    return int(rows[-1]) + 1, int(cols[-1]) + 1


def save_prediction_figure(item: Mapping[str, Any], path: Path, class_names: Mapping[int, str], title: str) -> Path:
    """One row of panels for an evaluated episode, saved as a PNG.

    Args:
        item: `episode_panels` output: `query [S,S,3]` uint8, `query_mask [S,S]` 0/1/255, `region` (h, w) of the
            query on the canvas, `supports [K,S,S,3]`, `support_masks [K,S,S]`, `prediction [S,S]` 0/1,
            `heat [S,S]` in [0, 1] with `heat_name`, `class_id`, `iou` (the episode's foreground IoU in percent at
            the original resolution), `query_key`, `support_keys`.
        path: the PNG to write.
        class_names: contiguous id -> name.
        title: the figure's heading (fold, shot, seed).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    h, w = item["region"]
    query, truth = item["query"][:h, :w], item["query_mask"][:h, :w]
    shots = len(item["supports"])
    fig, axes = plt.subplots(1, shots + 3, figsize=(2.8 * (shots + 3) + 0.6, 3.4), squeeze=False)
    axes = axes[0]
    # 1. the supports with their masks
    for k in range(shots):
        img, mask = item["supports"][k], item["support_masks"][k]
        sh, sw = content_box(img, mask)
        axes[k].imshow(overlay(img[:sh, :sw], mask[:sh, :sw], GROUND_TRUTH))
        axes[k].set_title(f"support {k + 1}\n{_short(item['support_keys'][k])}", fontsize=8)
    # 2. the query with its ground truth, 3. the prediction, 4. the class-agnostic map
    axes[shots].imshow(overlay(query, truth, GROUND_TRUTH))
    axes[shots].set_title(f"query, ground truth\n{_short(item['query_key'])}", fontsize=8)
    axes[shots + 1].imshow(overlay(query, item["prediction"][:h, :w], PREDICTION))
    axes[shots + 1].set_title(f"prediction\nIoU {item['iou']:.1f}%", fontsize=8)
    heat = axes[shots + 2].imshow(item["heat"][:h, :w], cmap="jet", vmin=0.0, vmax=1.0)
    axes[shots + 2].set_title(f"{item['heat_name']}\n(class-agnostic)" if item["heat_name"] == "CKMM map"
                              else item["heat_name"], fontsize=8)  # fmt: skip
    fig.colorbar(heat, ax=axes[shots + 2], fraction=0.046, pad=0.04)
    for ax in axes:
        ax.axis("off")
    class_id = int(item["class_id"])
    suptitle = f"{title}: episode {item['episode']}, class {class_id} ({class_names.get(class_id, '?')})"
    return save_figure(fig, path, suptitle, dpi=90)


def _short(key: str, width: int = 28) -> str:
    return key if len(key) <= width else "…" + key[-width + 1 :]


def save_figures(items: Sequence[Mapping[str, Any]], out: Path, class_names: Mapping[int, str], title: str) -> list:
    """One PNG per episode in `out`, `episode-<n>.png`, in episode order."""
    return [
        save_prediction_figure(item, out / f"episode-{int(item['episode']):04d}.png", class_names, title)
        for item in sorted(items, key=lambda i: int(i["episode"]))
    ]


def training_curve(metrics: Union[Path, Mapping[str, Path]], path: Path, title: str = "training") -> Path:
    """Loss and validation mIoU against the step, as a PNG: of one run (its metrics.jsonl), or of several on one
    plot (`{name: metrics.jsonl}`, each name in the legend; the demo's JC2A beside its baseline)."""
    import json

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = {"": Path(metrics)} if isinstance(metrics, (str, Path)) else dict(metrics)
    colours = (("tab:blue", "tab:orange"), ("tab:cyan", "tab:red"), ("tab:green", "tab:purple"))
    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    twin = ax.twinx()
    for (name, source), (loss_colour, val_colour) in zip(runs.items(), colours):
        records = [json.loads(line) for line in Path(source).read_text().splitlines() if line.strip()]
        loss = [(r["step"], r["loss"]) for r in records if "loss" in r]
        val = [(r["step"], r["val_miou"]) for r in records if "val_miou" in r]
        prefix = f"{name}: " if name else ""
        if loss:
            ax.plot(*zip(*loss), color=loss_colour, lw=1, label=f"{prefix}training loss (main + aux)")
        if val:
            twin.plot(*zip(*val), "o-", color=val_colour, label=f"{prefix}validation mIoU (novel classes)")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    twin.set_ylabel("validation mIoU (%)")
    handles = ax.get_legend_handles_labels()[0] + twin.get_legend_handles_labels()[0]
    if handles:
        ax.legend(handles, [h.get_label() for h in handles], fontsize=7, loc="center right")
    return save_figure(fig, path, title, dpi=100)


def probability_figure(probability: np.ndarray, path: Path, title: str) -> Path:
    """A probability map `[H, W]` in [0, 1] as a colour PNG with its colour scale (0 to 1), at about its own size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    h, w = probability.shape
    dpi = 100
    fig, ax = plt.subplots(figsize=(max(w, 64) / dpi + 1.2, max(h, 64) / dpi + 0.5), dpi=dpi)
    shown = ax.imshow(probability, cmap="jet", vmin=0.0, vmax=1.0)
    ax.axis("off")
    fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.04, label="probability")
    return save_figure(fig, path, title, dpi=dpi)


def crop_heat(heat: np.ndarray, region: tuple[int, int]) -> np.ndarray:
    """A class-agnostic map on the canvas `[S, S]` cut to the image's `region` (h, w) and min-max scaled within it:
    the padding's own responses (a bright strip beside a non-square image) neither show nor set the scale."""
    h, w = region
    part = heat[:h, :w].astype(np.float32)
    low, high = float(part.min()), float(part.max())
    return (part - low) / (high - low) if high > low else np.zeros_like(part)
