"""`jc2a demo`: the main job on the built-in toy data, in the paper's regime, end to end on a CPU in under ten
minutes on 2 cores (issue 17).

toy COCO (version 2: appearance modes and parts, look-alikes across folds, clutter, occlusion) -> shards ->
`jc2a pretrain` (the stand-in for ImageNet: a small timm CNN classifies all 80 toy classes on images of its own;
cached, so a second run skips it) -> JC2A on the pretrained backbone, frozen as in the paper, trained on fold 0's
base classes -> the same for the simple baseline (prototype matching, `model.arch: prototype`) on the same
episodes -> evaluation, 1-shot and 5-shot, on fold 0's *novel* classes (never seen in training) beside the same
JC2A untrained and the all-foreground prediction, on the same episodes -> how well CKMM's class-agnostic map
separates objects from background (AUROC) -> results.md / results.json, learning.md / learning.json, figures, a
training curve, an MLflow run.

    jc2a demo                       # everything under runs/demo
    jc2a demo --out /tmp/demo --train-images 400 --steps 300 --episodes 100 --pretrain-steps 200   # shorter
"""

from __future__ import annotations

import copy
import json
import logging
import math
import time
from dataclasses import replace
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from jc2a.config import Config, load_config
from jc2a.presets import preset
from jc2a.runs.session import reset_accelerate_state

log = logging.getLogger("jc2a.runs")
DEMO_CONFIG = preset("demo.yaml")
BASELINE_CONFIG = preset("demo_baseline.yaml")
TOY_VERSION = 2  # jc2a.data.toy.VERSION when this demo was tuned; the data, the cache and the pretraining use it
# Targets of an honest demo (issues 10 and 17): the trained model against the all-foreground prediction and against
# itself untrained, on the same novel-class episodes, 1-shot and 5-shot; CKMM's map against the objects.
TIMES_ALL_FOREGROUND = 2.0
POINTS_ABOVE_UNTRAINED = 20.0
AUROC_TARGET = 0.8
ROWS = ("JC2A trained", "prototype baseline trained", "JC2A untrained", "all-foreground")


class AllForeground(nn.Module):
    """The trivial baseline: every pixel of the query is the target (logits `[B, 2, S, S]`)."""

    def forward(self, query_img: Tensor, support_imgs: Tensor, support_masks: Tensor, return_maps: bool = False):
        b, _, h, w = query_img.shape
        logits = torch.zeros(b, 2, h, w, device=query_img.device)
        logits[:, 1] = 1.0
        return logits


def toy_shards(
    out: Path, train_images: int, val_images: int, size: int, progress: bool, version: int = TOY_VERSION
) -> Path:
    """The toy COCO dataset (`version`) and its shards under `out` (kept and reused when already complete)."""
    from jc2a.data.coco import CocoSource
    from jc2a.data.shards import write_shards
    from jc2a.data.toy import write_toy_coco

    coco, shards = out / f"coco-v{version}", out / f"shards-v{version}"
    stamp = coco / f".complete-{train_images}-{val_images}-{size}"
    if not stamp.is_file():
        write_toy_coco(coco, train_images=train_images, val_images=val_images, size=size, seed=0, progress=progress,
                       version=version)  # fmt: skip
        stamp.write_text("")
    for split in ("train", "val"):
        source = CocoSource(coco / f"{split}2014", coco / "annotations" / f"instances_{split}2014.json")
        summary = write_shards(source, shards, split, "coco", source.class_names, progress=progress)
        log.info("%s", summary.lines()[0])
    return shards


def pretrained_backbone(
    cache: Path, steps: Optional[int], seed: int, progress: bool, version: int = TOY_VERSION
) -> tuple[Path, dict]:
    """The pretrained toy backbone of the demo's config (architecture, toy version, seed, steps), from `cache`
    or pretrained into it."""
    from jc2a.runs.pretrain import Recipe, cached

    cfg = load_config(DEMO_CONFIG)
    recipe = Recipe(arch=cfg.model.backbone.name, version=version, seed=seed)
    if steps:
        recipe = replace(recipe, steps=steps)
    return cached(cache, recipe, progress)


# --------------------------------------------------------------------------- CKMM's map against the objects


def auroc(scores: np.ndarray, positive: np.ndarray) -> float:
    """The exact area under the ROC curve of `scores` for `positive` (the Mann-Whitney rank statistic, ties counted
    half): the probability that a random positive scores above a random negative. NaN without both classes."""
    scores, positive = np.asarray(scores, np.float64).ravel(), np.asarray(positive, bool).ravel()
    n_pos = int(positive.sum())
    n_neg = positive.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return math.nan
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    ranks = (np.cumsum(counts) - (counts - 1) / 2.0)[inverse]  # 1-based, tied values share their mean rank
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


@torch.no_grad()
def ckmm_separation(model: nn.Module, cfg: Config, shards, seed: int, episodes: int) -> dict:
    """How well CKMM's class-agnostic map (Eq. 13) separates object pixels from background on the evaluation queries.

    For every distinct query of the first `episodes` episodes of list `seed`: the map of the query (the model's
    backbone and bank), upsampled bilinearly to the evaluation canvas, scored inside the image's region against the
    query's full label (object: any class, base or novel, id > 0; background: 0; 255 ignored) by its exact AUROC.
    Returns the mean, median, min and share of queries >= 0.8, and the per-query values.
    """
    from jc2a.data.episodes import eval_list
    from jc2a.data.records import decode_record
    from jc2a.data.transforms import eval_transform
    from jc2a.labels import IGNORE_INDEX

    model.eval()
    size = cfg.data.image_size
    transform = eval_transform(size, cfg.data.eval_resize)
    queries = list(dict.fromkeys(ep.query for ep in eval_list(cfg.data, shards, seed, episodes)))
    device = next(model.parameters()).device
    per_query = {}
    for position in queries:
        image, label, _ = decode_record(shards.read(position))
        img, canvas_label = transform(image, label)  # the full label, nearest, 255 outside the image
        layer4 = model.backbone(model.backbone.normalize(img[None].to(device)))[3]
        heat = model.prototype_bank.probability_map(layer4, model.ckmm_reduce)
        heat = F.interpolate(heat, size=(size, size), mode="bilinear", align_corners=True)[0, 0].cpu().numpy()
        target = canvas_label.numpy()
        valid = target != IGNORE_INDEX
        value = auroc(heat[valid], target[valid] > 0)
        if not math.isnan(value):
            per_query[shards.records[position]["key"]] = value
    values = np.array(list(per_query.values()))
    return {
        "mean": float(values.mean()),
        "median": float(np.median(values)),
        "min": float(values.min()),
        "share_at_target": float((values >= AUROC_TARGET).mean()),
        "queries": len(values),
        "per_query": per_query,
    }


# --------------------------------------------------------------------------- the learning table


def compare(cfg: Config, run_dir: Path, baseline_dir: Path, shots: list[int], episodes: int, progress: bool) -> dict:
    """mIoU / FB-IoU of the trained baseline, JC2A untrained (the same seed's initial weights, so the same frozen
    pretrained backbone and a random head; its CKMM bank, the trained run's: the frozen backbone makes them equal)
    and the all-foreground prediction, on the novel-class episodes of list `data.eval_seeds[0]`, per shot."""
    from accelerate.utils import set_seed

    from jc2a.data.episodes import open_shards
    from jc2a.runs.bank import ensure_bank
    from jc2a.runs.evaluate import evaluate_episodes
    from jc2a.runs.network import build_network, load_trained_model
    from jc2a.runs.session import close_accelerator, make_accelerator

    reset_accelerate_state()
    accelerator = make_accelerator(cfg)
    baseline, _ = load_trained_model(baseline_dir)
    set_seed(cfg.train.seed)  # the initial weights of the training run
    untrained = build_network(cfg).to(accelerator.device)
    if untrained.prototype_bank is not None:
        train_shards = open_shards(cfg.data, cfg.data.train_split)
        ensure_bank(accelerator, untrained, cfg, train_shards, run_dir / "bank.safetensors", progress)
    models = {ROWS[1]: baseline, ROWS[2]: untrained, ROWS[3]: AllForeground()}
    val = open_shards(cfg.data, cfg.data.val_split)
    out: dict = {}
    for name, model in models.items():
        model.to(accelerator.device).eval()
        for shot in shots:
            setting = copy.deepcopy(cfg)
            setting.data.shot = shot
            result, _ = evaluate_episodes(
                accelerator, model, setting, val, cfg.data.eval_seeds[0], episodes, 0, progress, f"{name} {shot}-shot"
            )
            out.setdefault(name, {})[shot] = {"miou": result["miou"], "fbiou": result["fbiou"],
                                              "episodes": result["episodes"]}  # fmt: skip
    close_accelerator(accelerator)
    return out


def verdicts(scores: dict, separation: dict) -> list[dict]:
    """Per shot: JC2A trained against 2x all-foreground, untrained + 20 points, and (reported, not required) the
    baseline; then CKMM's map against the AUROC target."""
    out = []
    for shot, trained in scores[ROWS[0]].items():
        fg, raw = scores[ROWS[3]][shot]["miou"], scores[ROWS[2]][shot]["miou"]
        base = scores[ROWS[1]][shot]["miou"]
        ok_fg = trained["miou"] >= TIMES_ALL_FOREGROUND * fg
        ok_raw = trained["miou"] >= raw + POINTS_ABOVE_UNTRAINED
        out.append({"shot": shot, "trained": trained["miou"], "all_foreground": fg, "untrained": raw,
                    "baseline": base, "vs_all_foreground": ok_fg, "vs_untrained": ok_raw,
                    "beats_baseline": trained["miou"] > base, "passed": ok_fg and ok_raw})  # fmt: skip
    ok = separation["mean"] >= AUROC_TARGET
    out.append({"shot": None, "ckmm_auroc": separation["mean"], "target": AUROC_TARGET, "passed": ok})
    return out


def _word(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def learning_markdown(scores: dict, checks: list[dict], separation: dict, seconds: dict, setting: dict) -> str:
    shots = list(scores[ROWS[0]])
    lines = ["# Demo: does JC2A learn novel classes?", "",
             f"Fold 0 of toy COCO-20i (version {setting['toy_version']}): trained on the 60 base classes on a "
             f"frozen {setting['backbone']} pretrained by `jc2a pretrain` (held-out top-1 "
             f"{setting['pretrain_top1']:.1f}%), evaluated on the 20 novel classes (never seen in training), on the "
             f"same {setting['episodes']} episodes per shot for every row."
             + (" JC2A keeps PFENet's prior mask (model.pfenet_prior; configs/demo.yaml says why)."
                if setting.get("pfenet_prior") else ""), "",
             "| model | " + " | ".join(f"{k}-shot mIoU | {k}-shot FB-IoU" for k in shots) + " |",
             "|---|" + "---|---|" * len(shots)]  # fmt: skip
    for name in ROWS:
        cells = " | ".join(f"{r['miou']:.1f} | {r['fbiou']:.1f}" for r in scores[name].values())
        lines.append(f"| {name} | {cells} |")
    lines += ["", "| shot | JC2A >= 2 x all-foreground | JC2A >= untrained + 20 | JC2A - baseline |",
              "|---|---|---|---|"]  # fmt: skip
    for c in checks:
        if c["shot"] is None:
            continue
        fg = f"{c['trained']:.1f} vs {TIMES_ALL_FOREGROUND * c['all_foreground']:.1f}: {_word(c['vs_all_foreground'])}"
        raw = f"{c['trained']:.1f} vs {c['untrained'] + POINTS_ABOVE_UNTRAINED:.1f}: {_word(c['vs_untrained'])}"
        lines.append(f"| {c['shot']} | {fg} | {raw} | {c['trained'] - c['baseline']:+.1f} |")
    lines += ["", "CKMM's class-agnostic map against the objects (any class, base or novel) on "
              f"{separation['queries']} evaluation queries: mean AUROC {separation['mean']:.3f} "
              f"(median {separation['median']:.3f}, min "
              f"{separation['min']:.3f}; {100 * separation['share_at_target']:.0f}% of the queries >= "
              f"{AUROC_TARGET}), target >= {AUROC_TARGET}: {_word(separation['mean'] >= AUROC_TARGET)}. "
              "0.5 is chance.", "",
              "Time (s): " + ", ".join(f"{k} {v:.0f}" for k, v in seconds.items())
              + f"; {setting['threads']} thread(s)."]  # fmt: skip
    return "\n".join(lines) + "\n"


def demo(
    out: Path = Path("runs/demo"),
    train_images: int = 600,
    val_images: int = 240,
    size: int = 160,
    steps: Optional[int] = None,
    episodes: Optional[int] = None,
    overrides: tuple[str, ...] = (),
    progress: bool = True,
    seed: Optional[int] = None,
    pretrain_steps: Optional[int] = None,
    pretrain_seed: int = 0,
    pretrain_cache: Optional[Path] = None,
    threads: Optional[int] = None,
    toy_version: Optional[int] = None,
) -> dict:
    """Run the demo; returns the scores, the CKMM separation, the checks and where everything is.

    Args:
        out: everything goes here.
        train_images, val_images, size: the toy data (fold 0's few-shot training and evaluation images).
        steps: training steps of JC2A and of the baseline (default: configs/demo.yaml's).
        episodes: evaluation episodes per shot (default: the config's).
        overrides: dotted key=value overrides of configs/demo.yaml (both models).
        seed: `train.seed` of both models (default: the config's).
        pretrain_steps: the pretraining's steps (default: `jc2a pretrain`'s).
        pretrain_seed: the pretraining's seed.
        pretrain_cache: where pretrained backbones are kept (default `<out>/pretrain`).
        threads: torch's intra-op threads (default: torch's, one per core).
        toy_version: the toy data (and pretraining images) version (default `TOY_VERSION`); 1 is the flat set
            of before issue 17.
    """
    from jc2a.runs.evaluate import evaluate
    from jc2a.runs.figures import training_curve
    from jc2a.runs.session import setup_logging
    from jc2a.runs.tracking import tracking_uri
    from jc2a.runs.train import train

    setup_logging()
    toy_version = TOY_VERSION if toy_version is None else toy_version
    if threads:
        torch.set_num_threads(threads)
    out = Path(out)
    seconds: dict[str, float] = {}
    # 1. data: toy COCO in the real 2014 layout, then shards
    start = time.perf_counter()
    shards = toy_shards(out, train_images, val_images, size, progress, toy_version)
    seconds["data"] = time.perf_counter() - start
    # 2. the stand-in for ImageNet: the backbone pretrained on the toy pretraining split (cached)
    start = time.perf_counter()
    weights, pretrained = pretrained_backbone(pretrain_cache or out / "pretrain", pretrain_steps, pretrain_seed,
                                              progress, toy_version)  # fmt: skip
    seconds["pretrain"] = time.perf_counter() - start
    run_dir, baseline_dir = out / "run", out / "baseline"
    extra = [f"data.shards={shards}", f"model.backbone.weights={weights}"]
    extra += [f"train.max_steps={steps}"] if steps else []
    extra += [f"data.eval_episodes={episodes}"] if episodes else []
    extra += [f"train.seed={seed}"] if seed is not None else []
    extra += list(overrides)
    cfg = load_config(DEMO_CONFIG, [*extra, f"train.output_dir={run_dir}"])
    base_cfg = load_config(BASELINE_CONFIG, [*extra, f"train.output_dir={baseline_dir}"])
    # 3. JC2A: the CKMM bank, then training on fold 0's base classes (validation on novel classes along the way)
    start = time.perf_counter()
    if not (run_dir / "model.safetensors").is_file():
        reset_accelerate_state()
        train(cfg, progress=progress)
    seconds["train JC2A"] = time.perf_counter() - start
    # 4. the baseline: the same backbone, episodes, steps and schedule
    start = time.perf_counter()
    if not (baseline_dir / "model.safetensors").is_file():
        reset_accelerate_state()
        train(base_cfg, progress=progress)
    seconds["train baseline"] = time.perf_counter() - start
    curve = training_curve({"JC2A": run_dir / "metrics.jsonl", "baseline": baseline_dir / "metrics.jsonl"},
                           run_dir / "training_curve.png",
                           "jc2a demo: training on fold 0's base classes (frozen pretrained backbone)")  # fmt: skip
    # 5. the paper's evaluation of the trained JC2A (results.json / results.md, figures, MLflow): its table row
    start = time.perf_counter()
    reset_accelerate_state()
    results = evaluate(run_dir, overrides=[f"data.shards={shards}", *([f"data.eval_episodes={episodes}"] if episodes
                       else [])], shots=(1, 5), out=run_dir / "eval", figures=4, progress=progress)  # fmt: skip
    scores = {ROWS[0]: {r["shot"]: {"miou": r["miou"], "fbiou": r["fbiou"], "episodes": r["episodes"]}
                        for r in results["rows"]}}  # fmt: skip
    # 6. honest learning: the baseline, JC2A untrained and all-foreground on the same episodes
    scores.update(compare(cfg, run_dir, baseline_dir, [1, 5], cfg.data.eval_episodes, progress))
    seconds["evaluate"] = time.perf_counter() - start
    # 7. CKMM's map against the objects, on the same evaluation queries
    start = time.perf_counter()
    from jc2a.data.episodes import open_shards
    from jc2a.runs.network import load_trained_model

    model, _ = load_trained_model(run_dir)
    val = open_shards(cfg.data, cfg.data.val_split)
    separation = ckmm_separation(model, cfg, val, cfg.data.eval_seeds[0], cfg.data.eval_episodes)
    val.close()
    seconds["ckmm auroc"] = time.perf_counter() - start
    checks = verdicts(scores, separation)
    setting = {"toy_version": toy_version, "backbone": cfg.model.backbone.name, "pretrain_top1": pretrained["top1"],
               "episodes": cfg.data.eval_episodes, "threads": torch.get_num_threads(), "seed": cfg.train.seed,
               "steps": cfg.train.max_steps, "pfenet_prior": cfg.model.pfenet_prior}  # fmt: skip
    text = learning_markdown(scores, checks, separation, seconds, setting)
    (run_dir / "eval" / "learning.md").write_text(text)
    (run_dir / "eval" / "learning.json").write_text(json.dumps(
        {"scores": scores, "checks": checks, "ckmm_auroc": separation, "pretrain": pretrained, "setting": setting,
         "seconds": seconds}, indent=1))  # fmt: skip
    uri = tracking_uri(run_dir)
    where = {
        "run": str(run_dir),
        "baseline": str(baseline_dir),
        "model": str(run_dir / "model.safetensors"),
        "backbone": str(weights),
        "results": str(run_dir / "eval" / "results.md"),
        "learning": str(run_dir / "eval" / "learning.md"),
        "figures": str(run_dir / "eval" / "figures"),
        "curve": str(curve),
        "mlflow": f"mlflow ui --backend-store-uri {uri}",
    }
    print("\n" + text)
    print("where everything is:")
    for key, value in where.items():
        print(f"  {key:9s} {value}")
    return {
        "scores": scores,
        "checks": checks,
        "ckmm_auroc": separation,
        "pretrain": pretrained,
        "where": where,
        "seconds": seconds,
        "passed": all(c["passed"] for c in checks),
    }
