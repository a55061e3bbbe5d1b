"""`jc2a preview`: stream training and evaluation episodes from shards and save them as pictures."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from jc2a.config import Config


def to_rgb(img: torch.Tensor) -> np.ndarray:
    """A `[3,H,W]` uint8 tensor (as episodes carry images) to `uint8 [H,W,3]`."""
    return np.ascontiguousarray(img.permute(1, 2, 0).numpy(), dtype=np.uint8)


def overlay(rgb: np.ndarray, mask: np.ndarray, colour=(255, 220, 0), alpha: float = 0.5) -> np.ndarray:
    """Target pixels (1) tinted with `colour` and outlined, ignored pixels (255) darkened."""
    import cv2

    out = rgb.astype(np.float32)
    fg = mask == 1
    out[fg] = (1 - alpha) * out[fg] + alpha * np.asarray(colour, np.float32)
    out[mask == 255] *= 0.35
    out = np.ascontiguousarray(out.astype(np.uint8))
    contours, _ = cv2.findContours(fg.astype(np.uint8), cv2.RETR_LIST, cv2.CHAIN_APPROX_NONE)
    cv2.drawContours(out, contours, -1, colour, 1)
    return out


def save_episode_figure(episode: dict, path: Path, class_names: dict[int, str], title: str = "") -> Path:
    """One row: the query with its mask, then each support with its mask; saved as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shots = episode["support_imgs"].shape[0]
    fig, axes = plt.subplots(1, shots + 1, figsize=(3 * (shots + 1), 3.3), squeeze=False)
    panels = [("query", episode["query_img"], episode["query_mask"], episode.get("query_key", ""))]
    keys = episode.get("support_keys", [""] * shots)
    panels += [
        (f"support {k + 1}", episode["support_imgs"][k], episode["support_masks"][k], keys[k]) for k in range(shots)
    ]
    for ax, (name, img, mask, key) in zip(axes[0], panels):
        ax.imshow(overlay(to_rgb(img), mask.numpy()))
        ax.set_title(f"{name}\n{key}", fontsize=7)
        ax.axis("off")
    class_id = int(episode["class_id"])
    return save_figure(fig, path, f"{title} class {class_id} ({class_names.get(class_id, '?')})", dpi=80)


def save_figure(fig, path: Path, suptitle: str, dpi: int) -> Path:
    """Title, lay out and write a matplotlib figure as PNG (its folder made), then free it."""
    import matplotlib.pyplot as plt

    fig.suptitle(suptitle, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def preview(cfg: Config, episodes: int, out: Path) -> list[Path]:
    """Save `episodes` training and `episodes` evaluation episodes of `cfg` as pictures in `out`."""
    from jc2a.data.episodes import eval_loader, open_shards, train_loader
    from jc2a.model.backbone import normalization

    mean, _ = normalization(cfg.model.backbone.name)  # the padding colour of training crops
    written = []
    train = open_shards(cfg.data, cfg.data.train_split)
    loader = train_loader(cfg.data, cfg.train.seed, 1, mean, shards=train)
    for i, batch in zip(range(episodes), loader):
        ep = {k: v[0] for k, v in batch.items()}
        written.append(save_episode_figure(ep, out / f"train-{i:03d}.png", train.class_names, "train"))
    val = open_shards(cfg.data, cfg.data.val_split)
    for i, batch in zip(range(episodes), eval_loader(cfg.data, seed=cfg.data.eval_seeds[0], shards=val)):
        ep = {k: v[0] for k, v in batch.items()}
        written.append(save_episode_figure(ep, out / f"eval-{i:03d}.png", val.class_names, "eval"))
    return written


