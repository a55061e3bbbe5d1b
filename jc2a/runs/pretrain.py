"""`jc2a pretrain`: a stand-in for ImageNet pretraining on the built-in toy data (issue 17).

The paper freezes an ImageNet-pretrained ResNet; no weights can be downloaded on the machines jc2a is built on, so
this trains a small timm CNN by image-level classification of all 80 toy classes (ImageNet, too, has seen most
COCO classes) on a toy split of its own (`jc2a.data.toy.pretrain_images`: its own random streams, never a few-shot
training or evaluation image), and writes its weights as safetensors in timm's key layout for the `features_only`
model of the same architecture: `model.backbone.weights=FILE` loads them (strictly) into the backbone.

    jc2a pretrain --out runs/pretrain/regnetx_002.safetensors       # ~2.5 minutes on 2 CPU cores
    jc2a train --config configs/demo.yaml model.backbone.weights=runs/pretrain/regnetx_002.safetensors

The recipe (`Recipe`): `images` toy images of `size` px (a `background` share with no object, labelled as an 81st
class "background only"; the others with 1-2 classes, every class equally often), 10% held out for the accuracy;
random crops of `crop` px and horizontal flips, a `letterbox` share shrunk along one side onto black as the
evaluation canvas pads; softmax cross-entropy against the image's classes (each present class 1/n of the target,
as for multi-label pretraining at scale); SGD with Nesterov momentum, a linear warm-up then a cosine decay; the
network dilated to `output_stride` 8, as the segmentation backbone runs it (train as it is used). The same seed
and thread count give the same file; `cached` reuses a file whose metadata (architecture, toy version, seed,
recipe) matches.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Union

from jc2a.errors import UserError

if TYPE_CHECKING:  # torch and numpy are imported where they are used: `jc2a pretrain --help` answers at once
    import numpy as np
    import torch

__all__ = ["FORMAT", "Recipe", "add_arguments", "cached", "pretrain", "read_summary", "run"]

log = logging.getLogger("jc2a.runs")

FORMAT = "jc2a-toy-pretrain/1"  # the safetensors metadata `format` of a pretrained toy backbone
NUM_CLASSES = 80  # every COCO category of the toy data, base and novel (ImageNet has seen most COCO classes)
BACKGROUND = NUM_CLASSES  # the classifier's last class: an image of background, clutter and distractors only


@dataclass(frozen=True)
class Recipe:
    """What a pretrained file depends on (its cache key): the architecture, the toy data and the schedule."""

    arch: str = "regnetx_002"  # RegNetX-200MF: post-ReLU stages (CKMM's cosine needs them), fast on a CPU
    version: int = 2  # the toy data version (jc2a.data.toy.VERSIONS) this recipe was tuned on, as the demo's
    seed: int = 0
    images: int = 3000  # drawn, 10% of them held out for the accuracy
    size: int = 96
    crop: int = 80
    steps: int = 300
    batch_size: int = 64
    lr: float = 0.4
    weight_decay: float = 5e-5
    warmup: float = 0.05  # fraction of the steps
    background: float = 0.3  # share of images with no object, labelled as one more class, "background"
    letterbox: float = 0.5  # share of the crops shrunk along one side and padded with black (as evaluation pads)
    output_stride: int = 8  # the classifier dilated as the segmentation backbone is (8): train as it is used
    optimizer: str = "sgd"  # sgd (Nesterov momentum 0.9) | adamw

    def key(self) -> str:
        """The cache file's name: architecture, toy version, seed, then the rest of the recipe."""
        return (f"{self.arch}-toy{self.version}-seed{self.seed}-{self.images}x{self.size}c{self.crop}-"
                f"{self.steps}x{self.batch_size}-{self.optimizer}{self.lr:g}-bg{self.background:g}-lb{self.letterbox:g}-"
                f"os{self.output_stride}")

    def check(self) -> None:
        from jc2a.data.toy import VERSIONS  # here: `jc2a pretrain --help` does not draw in the toy generator

        if self.version not in VERSIONS:
            raise UserError(f"toy data version {self.version}: expected one of {', '.join(map(str, VERSIONS))}")
        if not 8 <= self.crop <= self.size:
            raise UserError(f"--crop {self.crop} must be between 8 and --size {self.size}")
        if self.optimizer not in ("sgd", "adamw"):
            raise UserError(f"optimizer {self.optimizer!r}: expected sgd or adamw")
        if self.output_stride not in (8, 16, 32):
            raise UserError(f"output stride {self.output_stride}: expected 8, 16 or 32")
        if not 0 <= self.background < 1:
            raise UserError(f"background share {self.background} must be in [0, 1)")
        if self.images < 20 or self.steps < 1 or self.batch_size < 1 or self.lr <= 0:
            raise UserError("--images must be >= 20 and --steps, --batch-size, --lr positive")


def _schedule(step: int, total: int, warmup: float) -> float:
    """Linear warm-up over the first `warmup` of the steps, then a cosine decay to zero."""
    ramp = max(1, round(warmup * total))
    if step < ramp:
        return (step + 1) / ramp
    return 0.5 * (1 + math.cos(math.pi * (step - ramp) / max(1, total - ramp)))


def _batch(images: torch.Tensor, rng: np.random.Generator, crop: int, letterbox: float) -> torch.Tensor:
    """Random `crop` x `crop` crops (one offset per image) and horizontal flips of uint8 images `[B, S, S, 3]`; a
    `letterbox` share of them is then shrunk along one side (to 55-100%) and put top-left on a black canvas, as the
    evaluation canvas (PFENet's `Resize`) puts every image that is not square: the backbone sees that padding is
    not an object."""
    import torch
    import torch.nn.functional as F

    size = images.shape[1]
    out = torch.empty((len(images), crop, crop, 3), dtype=torch.uint8)
    offsets = rng.integers(0, size - crop + 1, size=(len(images), 2))
    flips = rng.random(len(images)) < 0.5
    boxed = rng.random(len(images)) < letterbox
    sides = rng.uniform(0.55, 1.0, len(images))
    tall = rng.random(len(images)) < 0.5
    for i, ((y, x), flip) in enumerate(zip(offsets.tolist(), flips.tolist())):
        patch = images[i, y : y + crop, x : x + crop]
        patch = patch.flip(1) if flip else patch
        if boxed[i]:
            short = max(8, int(round(crop * sides[i])))
            h, w = (crop, short) if tall[i] else (short, crop)
            small = F.interpolate(patch.permute(2, 0, 1)[None].float(), size=(h, w), mode="bilinear",
                                  align_corners=False)[0].round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0)
            patch = torch.zeros_like(patch)
            patch[:h, :w] = small
        out[i] = patch
    return out


def _normalize(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 `[B, H, W, 3]` -> float `[B, 3, H, W]`, `(x / 255 - mean) / std` (the backbone's own statistics)."""
    return (images.permute(0, 3, 1, 2).float() / 255.0 - mean) / std


def accuracy(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, mean, std, crop: int) -> dict:
    """On held-out images (centre crops), in percent: on those with objects, top-1 (the best class is one of the
    image's) and recall@n (the image's n classes are its n best); on the background-only ones, how many come out as
    background."""
    import torch

    model.eval()
    offset = (images.shape[1] - crop) // 2
    hits, recall, objects, background, empty = 0.0, 0.0, 0, 0.0, 0
    with torch.no_grad():
        for start in range(0, len(images), 128):
            x = _normalize(images[start : start + 128, offset : offset + crop, offset : offset + crop], mean, std)
            logits, y = model(x), labels[start : start + 128]
            best = logits.argmax(1)
            for row, target, top in zip(logits, y, best.tolist()):
                if bool(target[BACKGROUND]):
                    empty += 1
                    background += float(top == BACKGROUND)
                    continue
                n = int(target.sum())
                objects += 1
                hits += float(target[top])
                recall += float(target[row.topk(n).indices].float().mean())
    model.train()
    return {"top1": 100.0 * hits / max(objects, 1), "recall_at_n": 100.0 * recall / max(objects, 1),
            "background_recall": 100.0 * background / max(empty, 1)}  # fmt: skip


def pretrain(out: Union[str, os.PathLike], recipe: Recipe = Recipe(), progress: bool = True) -> dict:
    """Pretrain `recipe.arch` on the toy pretraining split and write its features' weights to `out`.

    Returns the summary that is also the file's metadata (`read_summary`): the recipe, the held-out accuracy, the
    seconds it took (drawing the images, training) and the thread count.

    Raises:
        UserError: a bad recipe, or an architecture whose classifier's keys do not cover its `features_only`
            model's (create_backbone refuses the others by name).
    """
    import numpy as np
    import timm
    import torch
    import torch.nn.functional as F
    from tqdm import tqdm

    from jc2a.data.toy import pretrain_images
    from jc2a.model.backbone import normalization, state_shapes
    from jc2a.runs.files import write_safetensors

    recipe.check()
    start = time.perf_counter()
    # 1. the pretraining split: its own streams of the toy generator, 10% held out
    counts = (recipe.background, 0.7 * (1 - recipe.background), 0.3 * (1 - recipe.background))
    pixels, classes = pretrain_images(recipe.images, recipe.size, recipe.seed, recipe.version, NUM_CLASSES, progress,
                                      counts)  # fmt: skip
    held = max(10, recipe.images // 10)
    images, labels = torch.from_numpy(pixels), torch.from_numpy(classes)
    labels = torch.cat([labels, ~labels.any(1, keepdim=True)], dim=1)  # no visible class: "background"
    train_x, train_y, val_x, val_y = images[:-held], labels[:-held].float(), images[-held:], labels[-held:]
    drawn = time.perf_counter() - start
    # 2. the classifier, at the backbone's own input statistics
    torch.manual_seed(recipe.seed)
    model = timm.create_model(recipe.arch, pretrained=False, num_classes=NUM_CLASSES + 1,
                              output_stride=recipe.output_stride)
    wanted = state_shapes(recipe.arch)
    own = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = [k for k, shape in wanted.items() if own.get(k) != shape]
    if missing:
        raise UserError(f"{recipe.arch}: its classifier lacks the backbone tensor {missing[0]!r}; pick another --arch")
    mean_, std_ = normalization(recipe.arch)
    mean, std = torch.tensor(mean_).view(1, 3, 1, 1), torch.tensor(std_).view(1, 3, 1, 1)
    decay = [p for n, p in model.named_parameters() if p.ndim > 1]
    no_decay = [p for n, p in model.named_parameters() if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": recipe.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if recipe.optimizer == "adamw":
        optimizer = torch.optim.AdamW(groups, lr=recipe.lr)
    else:
        optimizer = torch.optim.SGD(groups, lr=recipe.lr, momentum=0.9, nesterov=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _schedule(s, recipe.steps, recipe.warmup))
    # 3. the loop: one fixed permutation stream, crops and flips from the same seed
    rng = np.random.default_rng([recipe.seed, 0x9E7])
    order: list[int] = []
    model.train()
    losses = []
    bar = tqdm(range(recipe.steps), desc="pretrain", unit="step", disable=not progress, leave=False)
    for _ in bar:
        while len(order) < recipe.batch_size:
            order += rng.permutation(len(train_x)).tolist()
        index, order = order[: recipe.batch_size], order[recipe.batch_size :]
        x = _normalize(_batch(train_x[index], rng, recipe.crop, recipe.letterbox), mean, std)
        y = train_y[index]
        loss = -(F.log_softmax(model(x), dim=1) * (y / y.sum(1, keepdim=True))).sum(1).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}")
    trained = time.perf_counter() - start - drawn
    # 4. the held-out accuracy, then the features' tensors (timm's key layout) with the summary as metadata
    scores = accuracy(model, val_x, val_y, mean, std, recipe.crop)
    state = model.state_dict()
    tensors = {k: state[k].detach().contiguous().clone() for k in wanted}
    summary = {"format": FORMAT, "recipe": asdict(recipe), **scores, "train_images": int(len(train_x)),
               "held_out_images": int(held), "final_loss": float(np.mean(losses[-20:])),
               "seconds_images": drawn, "seconds_training": trained, "threads": torch.get_num_threads()}  # fmt: skip
    write_safetensors(out, tensors, {"format": FORMAT, "summary": json.dumps(summary)})
    log.info("pretrained %s on %d toy images in %.0f s (+%.0f s drawing them): held-out top-1 %.1f%%, recall@n "
             "%.1f%% -> %s", recipe.arch, len(train_x), trained, drawn, scores["top1"], scores["recall_at_n"],
             out)  # fmt: skip
    return summary


def read_summary(path: Union[str, os.PathLike]) -> Optional[dict]:
    """The summary stored in a pretrained file, or None when the file is missing or is not one."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(os.fspath(path), framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
    except (OSError, SafetensorError):
        return None
    if metadata.get("format") != FORMAT:
        return None
    try:
        return json.loads(metadata["summary"])
    except (KeyError, json.JSONDecodeError):
        return None


def cached(folder: Union[str, os.PathLike], recipe: Recipe = Recipe(), progress: bool = True) -> tuple[Path, dict]:
    """The pretrained file of `recipe` in `folder` (`<recipe.key()>.safetensors`), pretrained first when it is not
    there (or is not a complete file of this recipe). Returns (path, summary, with `reused` true or false)."""
    path = Path(folder) / f"{recipe.key()}.safetensors"
    summary = read_summary(path)
    if summary is not None and summary.get("recipe") == asdict(recipe):
        return path, {**summary, "reused": True}
    return path, {**pretrain(path, recipe, progress), "reused": False}


# --------------------------------------------------------------------------- command line


def add_arguments(parser) -> None:
    d = Recipe()
    parser.add_argument("--out", type=Path, required=True, help="the weights file to write (safetensors)")
    parser.add_argument("--arch", default=d.arch, help=f"a timm CNN create_backbone accepts (default {d.arch})")
    parser.add_argument("--toy-version", type=int, default=d.version, help=f"toy data version (default {d.version})")
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument("--images", type=int, default=d.images, help=f"toy images drawn (default {d.images})")
    parser.add_argument("--size", type=int, default=d.size, help=f"their side (default {d.size})")
    parser.add_argument("--crop", type=int, default=d.crop, help=f"random crop side (default {d.crop})")
    parser.add_argument("--steps", type=int, default=d.steps, help=f"optimizer steps (default {d.steps})")
    parser.add_argument("--batch-size", type=int, default=d.batch_size)
    parser.add_argument("--lr", type=float, default=d.lr, help=f"peak SGD lr (default {d.lr})")
    parser.add_argument("--no-progress", action="store_true")


def run(args) -> int:
    from jc2a.runs.session import setup_logging

    setup_logging()
    recipe = Recipe(args.arch, args.toy_version, args.seed, args.images, args.size, args.crop, args.steps,
                    args.batch_size, args.lr)  # fmt: skip
    summary = pretrain(args.out, recipe, progress=not args.no_progress)
    print(f"{args.out}: {recipe.arch} pretrained on toy v{recipe.version} ({summary['train_images']} images, "
          f"{recipe.steps} steps) in {summary['seconds_images'] + summary['seconds_training']:.0f} s; held-out "
          f"top-1 {summary['top1']:.1f}%, recall@n {summary['recall_at_n']:.1f}%; "
          f"use model.backbone.name={recipe.arch} model.backbone.weights={args.out}")  # fmt: skip
    return 0
