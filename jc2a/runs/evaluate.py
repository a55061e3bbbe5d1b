"""`jc2a eval`: a trained model at the paper's protocol (docs/PROTOCOL.md): results.json, results.md, figures, MLflow.

Launch (each process takes its share of the fixed episode list; the sums are all-reduced, so the numbers do not
depend on the number of processes):

    jc2a eval --checkpoint runs/coco-f0                        # its fold, 1- and 5-shot, the config's eval seeds
    jc2a eval --checkpoint 'runs/coco-f{fold}' --folds 0 1 2 3 --seeds 0 1 2 3 4   # Table 2, mean ± std
    jc2a eval --checkpoint runs/coco-f0 --config configs/coco20i.yaml data.shards=/data/coco   # data elsewhere
    accelerate launch -m jc2a eval --checkpoint runs/coco-f0 --no-progress      # N GPUs or processes
    torchrun --nproc_per_node 4 -m jc2a eval --checkpoint runs/coco-f0

A model is evaluated on the novel classes of the fold it was trained on, and only there: several folds need a
checkpoint path holding `{fold}`. Every (fold, shot, seed) is checked before the first episode. What it writes in
`--out` (default `<run>/eval`; `<its folder>/eval` for a model file; `runs/coco-f0123-eval` for `runs/coco-f{fold}`
on folds 0-3): results.json, results.md (laid out like the paper's Tables 1-2, the paper's numbers beside ours
where the setting matches), metrics.jsonl and figures/episode-<n>.png. A failure part-way writes the rows measured
so far (results.json: `"complete": false`). The MLflow run is linked to the training run(s) it evaluates.
"""

from __future__ import annotations

import copy
import json
import logging
import os
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
import yaml

from jc2a.config import Config, ConfigError, to_dict
from jc2a.data.episodes import eval_list, eval_loader, open_shards
from jc2a.data.transforms import Resize, eval_canvas
from jc2a.errors import UserError
from jc2a.folds import novel_classes
from jc2a.labels import IGNORE_INDEX
from jc2a.metrics import FewShotIoU, score_at_original_size
from jc2a.runs.figures import crop_heat
from jc2a.runs.files import resolve_checkpoint
from jc2a.runs.network import load_trained_model, trained_config
from jc2a.runs.preview import to_rgb
from jc2a.runs.report import summarize, variant, write_results
from jc2a.runs.session import autocast, close_accelerator, make_accelerator, setup_logging
from jc2a.runs.tracking import RunLog, mlflow_params, start_tracking

log = logging.getLogger("jc2a.runs")

FOLD = "{fold}"
ALL_FOLDS = (0, 1, 2, 3)


# --------------------------------------------------------------------------- checkpoints per fold


def checkpoint_for(checkpoint: Union[str, os.PathLike], fold: Optional[int]) -> str:
    """The checkpoint of `fold`: `{fold}` in the path replaced by the fold number."""
    text = os.fspath(checkpoint)
    return text.replace(FOLD, str(fold)) if fold is not None else text


def trained_on(checkpoint: Union[str, os.PathLike], weights: str = "final") -> tuple[str, int]:
    """(dataset, fold) a model file was trained on, from the config stored in its metadata."""
    from safetensors import safe_open

    model_file, _ = resolve_checkpoint(checkpoint, weights)
    try:
        with safe_open(os.fspath(model_file), framework="pt", device="cpu") as f:
            data = yaml.safe_load((f.metadata() or {})["config"])["data"]
        return str(data["dataset"]), int(data["fold"])
    except Exception as exc:  # not safetensors, or no jc2a metadata: load_trained_model says which
        raise UserError(f"{model_file}: not a jc2a model file (no training config in its metadata: {exc})") from None


def plan_folds(checkpoint: Union[str, os.PathLike], folds: Optional[Sequence[int]]) -> list[Optional[int]]:
    """The folds to evaluate: `--folds`, all four for a `{fold}` checkpoint, else [None] (the config's fold).

    Raises:
        UserError: several folds with a checkpoint that is not a `{fold}` template (a model trained on one fold
            has seen the others' novel classes as base classes).
    """
    template = FOLD in os.fspath(checkpoint)
    folds = list(dict.fromkeys(int(f) for f in folds)) if folds else None
    for f in folds or ():
        if f not in ALL_FOLDS:
            raise UserError(f"--folds {f}: folds are 0, 1, 2 and 3")
    if folds and len(folds) > 1 and not template:
        raise UserError(
            f"--folds {' '.join(map(str, folds))} with --checkpoint {checkpoint}: a model is trained on one fold and "
            f"evaluated on that fold's novel classes only; give a checkpoint path with {FOLD} "
            f"(e.g. runs/coco-f{FOLD}) to evaluate one model per fold"
        )
    if template and not folds:
        return list(ALL_FOLDS)
    return folds or [None]


def load_for_fold(
    checkpoint: Union[str, os.PathLike],
    fold: Optional[int],
    configs: Optional[Sequence[Union[str, os.PathLike]]] = None,
    overrides: Iterable[str] = (),
    weights: str = "final",
) -> tuple[torch.nn.Module, Config]:
    """The trained model of `fold` (None: the config's fold) and its config, refused with one line when it was
    trained on another dataset or fold than the one it would be evaluated on. `weights`: final or best."""
    path = checkpoint_for(checkpoint, fold)
    overrides = [*overrides, *([f"data.fold={fold}"] if fold is not None else [])]
    model, cfg = load_trained_model(path, configs, overrides, weights)
    dataset, trained = trained_on(path, weights)
    if (dataset, trained) != (cfg.data.dataset, cfg.data.fold):
        model_file, _ = resolve_checkpoint(path, weights)
        raise ConfigError(
            f"{model_file}: trained on {dataset} fold {trained}, asked to evaluate {cfg.data.dataset} fold "
            f"{cfg.data.fold}: a model is scored on its own fold's novel classes only (use --folds {trained}, or a "
            f"--checkpoint path with {FOLD})"
        )
    return model, cfg


# --------------------------------------------------------------------------- one (fold, shot, seed)


@torch.no_grad()
def evaluate_episodes(
    accelerator,
    model: torch.nn.Module,
    cfg: Config,
    shards,
    seed: int,
    episodes: int,
    figures: int = 0,
    progress: bool = False,
    desc: str = "eval",
) -> tuple[dict, list[dict]]:
    """mIoU / FB-IoU of this process's share of the fold's episode list `seed` (K = `cfg.data.shot`), all-reduced
    over the processes: `FewShotIoU.compute()`'s dict, the same on every rank, and the figure material of the
    episodes numbered below `figures` that this rank ran (`episode_panels`)."""
    from jc2a.progress import progress as bar_of

    model.eval()
    device = accelerator.device
    meter = FewShotIoU(novel_classes(cfg.data.dataset, cfg.data.fold))
    rank, world = accelerator.process_index, accelerator.num_processes
    loader = eval_loader(cfg.data, seed, rank, world, batch_size=1, shards=shards, episodes=episodes)
    items, canvas = [], eval_canvas(cfg.data.image_size, cfg.data.eval_resize)
    bar = bar_of(total=len(loader), desc=desc, unit="episode", disable=not progress, leave=False)
    for batch in loader:
        # 1. forward on the S x S canvas under the accelerator's autocast; K supports fused by the model
        episode = int(batch["episode"][0])
        want = episode < figures  # the figures' episodes also return CKMM's map: the same forward
        query, supports = batch["query_img"].to(device), batch["support_imgs"].to(device)
        with autocast(accelerator, cfg):
            out = model(query, supports, batch["support_masks"].to(device), return_maps=want)
        logits = out.logits if want else out
        # 2. scored at the query's original resolution (docs/PROTOCOL.md), summed per class
        pred, target = score_at_original_size(logits[0], batch["query_label"][0].to(device))
        meter.update(pred, target, batch["class_id"])
        # 3. what the figure of this episode shows
        if want:
            items.append(episode_panels(batch, out, pred, target, canvas))
        bar.update(1)
        bar.set_postfix(miou=f"{meter.compute()['miou']:.1f}")
    bar.close()
    meter.all_reduce()
    return meter.compute(), items


def episode_panels(batch: dict, out, pred: torch.Tensor, target: torch.Tensor, canvas: Resize) -> dict:
    """Numpy material of one episode's figure (see `figures.save_prediction_figure`): the canvas images and masks,
    the canvas prediction, the class-agnostic map (CKMM's, else PFENet's prior, else the foreground probability)
    upsampled to the canvas, and the episode's foreground IoU at the original resolution."""
    label = batch["query_label"][0]
    maps = out.maps
    if "ckmm" in maps:
        name, heat = "CKMM map", maps["ckmm"]
    elif "prior" in maps:
        name, heat = "PFENet prior", maps["prior"]
    else:
        name, heat = "foreground probability", maps["foreground"][:, None]
    size = canvas.size
    heat = F.interpolate(heat[:1].float(), size=(size, size), mode="bilinear", align_corners=True)[0, 0]
    valid = target != IGNORE_INDEX
    inter = int(((pred == 1) & (target == 1) & valid).sum())
    union = int((((pred == 1) | (target == 1)) & valid).sum())
    return {
        "episode": int(batch["episode"][0]),
        "class_id": int(batch["class_id"][0]),
        "query_key": batch["query_key"][0],
        "support_keys": list(batch["support_keys"][0]),
        "query": to_rgb(batch["query_img"][0].cpu()),
        "query_mask": batch["query_mask"][0].cpu().numpy(),
        "region": canvas.region(int(label.shape[0]), int(label.shape[1])),
        "supports": np.stack([to_rgb(s) for s in batch["support_imgs"][0].cpu()]),
        "support_masks": batch["support_masks"][0].cpu().numpy(),
        "prediction": out.logits[0].argmax(0).to(torch.uint8).cpu().numpy(),
        "heat": crop_heat(heat.cpu().numpy(), canvas.region(int(label.shape[0]), int(label.shape[1]))),
        "heat_name": name,
        "iou": 100.0 * inter / max(union, 1),
    }


# --------------------------------------------------------------------------- the command


def default_out(checkpoint: Union[str, os.PathLike], folds: Sequence[Optional[int]] = ()) -> Path:
    """Where the reports go by default: `<run>/eval` for a run folder, `<its folder>/eval` for a model file, and
    for a `{fold}` pattern a folder named for it beside the runs: `runs/coco-f{fold}` evaluated on folds 0-3 ->
    `runs/coco-f0123-eval` (never the working folder)."""
    text = os.fspath(checkpoint)
    if FOLD in text:
        parent = Path(text.split(FOLD)[0] + "x").parent  # the folder above the part that names the fold
        named = os.path.relpath(text.replace(FOLD, "".join(str(f) for f in folds if f is not None)), parent)
        return parent / (named.replace(os.sep, "-") + "-eval")
    path = Path(text)
    return path / "eval" if path.is_dir() else path.parent / "eval"


def check_feasible(cfg: Config, shots: Sequence[int], seeds: Sequence[int], episodes: int) -> None:
    """Every (shot, seed) episode list of this fold can be drawn (enough usable images per class): refused with
    one line before the first episode runs, not after the 1-shot rows (the lists come from the index alone)."""
    shards = open_shards(cfg.data, cfg.data.val_split)
    try:
        for shot in shots:
            data = cfg.data.model_copy(update={"shot": shot})
            for seed in seeds:
                eval_list(data, shards, seed, episodes)
    finally:
        shards.close()


def _train_run_id(path: Path) -> Optional[str]:
    """The MLflow run id of the training run a run folder (or a model file in one) belongs to, if it was tracked."""
    for folder in (path, path.parent):
        summary = folder / "train_summary.json"
        if summary.is_file():
            try:
                return json.loads(summary.read_text()).get("mlflow_run_id")
            except (OSError, ValueError, RecursionError, AttributeError):
                return None
    return None


def evaluate(
    checkpoint: Union[str, os.PathLike],
    configs: Optional[Sequence[Union[str, os.PathLike]]] = None,
    overrides: Iterable[str] = (),
    shots: Sequence[int] = (1, 5),
    folds: Optional[Sequence[int]] = None,
    seeds: Optional[Sequence[int]] = None,
    episodes: Optional[int] = None,
    out: Optional[Union[str, os.PathLike]] = None,
    figures: int = 4,
    progress: bool = True,
    weights: Sequence[str] = ("final",),
) -> dict:
    """Evaluate a trained model per (weights, fold, shot, seed) and write the reports; returns results.json's content.

    Args:
        checkpoint: a model file or run folder; `{fold}` in it is replaced by each fold.
        configs: config files to use instead of the run's (overrides apply last).
        overrides: dotted key=value overrides.
        shots: K of each evaluation (a model trained 1-shot serves any K: decision-level fusion).
        folds: default: all four for a `{fold}` checkpoint, else the checkpoint config's fold.
        seeds: episode lists; default `data.eval_seeds`.
        episodes: episodes per (fold, shot, seed); default `data.eval_episodes`.
        out: report folder; default `default_out(checkpoint)`.
        figures: pictures of the first `figures` episodes of the first (fold, shot, seed).
        progress: the main process's progress bar.
        weights: which weights of a run folder: `final` (model.safetensors, the default), `best` (best/, the best
            validation mIoU; PFENet reports the epoch with the best mIoU on the test episodes), or both.
    """
    from jc2a.runs.figures import save_figures

    # 1. what to run: every checkpoint and every (fold, shot, seed) episode list is checked before anything runs,
    #    and before the report folder exists (a refused evaluation leaves nothing behind)
    setup_logging()
    overrides = list(overrides)
    plan = plan_folds(checkpoint, folds)
    weights = list(dict.fromkeys(weights)) or ["final"]
    shots = [int(k) for k in dict.fromkeys(shots)]
    if min(shots) < 1 or (episodes is not None and episodes < 1) or figures < 0:
        raise UserError(f"--shots must be >= 1, --episodes >= 1 and --figures >= 0 (got {shots}, {episodes}, "
                        f"{figures})")  # fmt: skip
    for w in weights:
        for fold in plan:
            resolve_checkpoint(checkpoint_for(checkpoint, fold), w)
    model, cfg = load_for_fold(checkpoint, plan[0], configs, overrides, weights[0])
    seeds = [int(s) for s in dict.fromkeys(seeds if seeds else cfg.data.eval_seeds)]
    episodes = int(episodes if episodes is not None else cfg.data.eval_episodes)
    for fold in plan:
        fold_overrides = [*overrides, *([f"data.fold={fold}"] if fold is not None else [])]
        check_feasible(trained_config(checkpoint_for(checkpoint, fold), configs, fold_overrides), shots, seeds,
                       episodes)  # fmt: skip
    out = Path(out) if out is not None else default_out(checkpoint, plan)

    # 2. the Accelerator (processes, device, autocast) and tracking, linked to the training run(s)
    run_dir = Path(checkpoint_for(checkpoint, plan[0]))
    tracking = start_tracking(cfg, run_dir if run_dir.is_dir() else out)
    accelerator = make_accelerator(cfg, trackers=tracking.trackers, logging_dir=tracking.logging_dir)
    main, world = accelerator.is_main_process, accelerator.num_processes
    if main:
        out.mkdir(parents=True, exist_ok=True)
        for stale in (out / "figures").glob("episode-*.png"):
            stale.unlink()
    accelerator.wait_for_everyone()
    runlog = RunLog(accelerator, out, tracking)
    folds_text = "".join(str(cfg.data.fold if f is None else f) for f in plan)
    trained = {f: _train_run_id(Path(checkpoint_for(checkpoint, f))) for f in plan}
    trained_ids = [i for i in dict.fromkeys(trained.values()) if i]
    tags = {"jc2a.kind": "eval", "jc2a.checkpoint": os.fspath(checkpoint), "jc2a.processes": str(world),
            "jc2a.weights": ",".join(weights), "jc2a.backbone_weights": model.backbone.weights_source,
            "jc2a.folds": ",".join(folds_text), "jc2a.shots": ",".join(map(str, shots)),
            "jc2a.seeds": ",".join(map(str, seeds)), "jc2a.episodes": str(episodes)}  # fmt: skip
    if trained_ids:
        tags["jc2a.train_run_ids"] = ",".join(trained_ids)
        if len(trained_ids) == 1:  # one training run: the evaluation nests under it in MLflow's UI
            tags["mlflow.parentRunId"] = trained_ids[0]
    params = {k: v for k, v in mlflow_params(cfg).items() if k not in ("data.fold", "data.shot")}
    params.update({"eval.folds": folds_text, "eval.shots": "+".join(map(str, shots)),
                   "eval.seeds": ",".join(map(str, seeds)), "eval.episodes": episodes})  # fmt: skip
    name = (f"eval-{cfg.data.dataset}-f{folds_text}-{'+'.join(map(str, shots))}shot-{cfg.model.backbone.name}-"
            f"{variant(cfg)}")  # fmt: skip
    eval_id = runlog.start(cfg.train.experiment or cfg.data.dataset, name, params, None, tags)
    for train_id in trained_ids:  # the training run points back at its evaluations
        runlog.tag(f"jc2a.eval.{eval_id}", f"folds {folds_text}, shots {'+'.join(map(str, shots))}", train_id)

    # 3. every (weights, fold, shot, seed); the first one's first episodes also become figures. A failure part-way
    #    still writes what was measured (results.json says it is incomplete) and marks the MLflow run FAILED.
    rows, checkpoints, first_cfg = [], {}, cfg
    try:
        title, class_names, panels = _run_all(
            accelerator, checkpoint, configs, overrides, weights, plan, shots, seeds, episodes, figures, progress,
            model, cfg, rows, checkpoints, runlog,
        )  # fmt: skip
    except BaseException as exc:
        if main:
            write_results(out, {"rows": rows, "summary": summarize(rows), "config": to_dict(first_cfg),
                                "checkpoint": os.fspath(checkpoint), "checkpoints": checkpoints, "complete": False,
                                "error": str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__})
        runlog.end_interrupted(exc)
        raise

    # 4. reports (main process): results.json, results.md, figures; the same to MLflow (and the figures to the
    #    training run, when there is one)
    results: dict[str, Any] = {
        "rows": rows,
        "summary": summarize(rows),
        "config": to_dict(first_cfg),
        "checkpoint": os.fspath(checkpoint),
        "checkpoints": checkpoints,
        "shots": shots,
        "seeds": seeds,
        "weights": weights,
        "processes": world,
        "complete": True,
        "mlflow_run_id": eval_id,
        "train_run_ids": trained_ids,
    }
    if main:
        written = save_figures(panels, out / "figures", class_names, title) if panels else []
        results["figures"] = [p.name for p in written]
        for path in write_results(out, results):
            runlog.artifact(path)
        if written:
            runlog.artifact(out / "figures", "figures")
            if len(trained_ids) == 1:
                runlog.artifact(out / "figures", "eval/figures", run_id=trained_ids[0])
        for s in results["summary"]:
            key = f"{s['shot']}shot" + (f"/{s['weights']}" if s["weights"] != "final" else "")
            runlog.log({f"miou/{key}/mean": s["miou_mean"], f"miou/{key}/std": s["miou_std"],
                        f"fbiou/{key}/mean": s["fbiou_mean"], f"fbiou/{key}/std": s["fbiou_std"]}, step=0)  # fmt: skip
    close_accelerator(accelerator)
    return results


def _run_all(accelerator, checkpoint, configs, overrides, weights, plan, shots, seeds, episodes, figures, progress,
             model, cfg, rows: list, checkpoints: dict, runlog) -> tuple[str, dict, list]:
    """Every (weights, fold, shot, seed) of an evaluation, appending its rows to `rows` as they are measured (so a
    failure part-way keeps them); returns the figures' title, class names and panels."""
    from accelerate.utils import gather_object

    main, world = accelerator.is_main_process, accelerator.num_processes
    title, class_names, panels = "", {}, []
    for n, (w, fold) in enumerate((w, fold) for w in weights for fold in plan):
        if n > 0:
            model, cfg = load_for_fold(checkpoint, fold, configs, overrides, w)
        model.to(accelerator.device).eval()
        shards = open_shards(cfg.data, cfg.data.val_split)
        model_file = os.fspath(resolve_checkpoint(checkpoint_for(checkpoint, fold), w)[0])
        checkpoints[str(cfg.data.fold) if w == "final" else f"{cfg.data.fold}-{w}"] = model_file
        for shot in shots:
            for seed in seeds:
                setting = copy.deepcopy(cfg)
                setting.data.shot = shot
                want = figures if not rows else 0
                name = f"fold {setting.data.fold} {shot}-shot seed {seed}" + (f" ({w} weights)" if w != "final" else "")
                result, items = evaluate_episodes(
                    accelerator, model, setting, shards, seed, episodes, want, progress and main, name
                )
                rows.append(_row(setting, seed, result, w, model.backbone.weights_source))
                runlog.log(_row_metrics(rows[-1]), step=0)
                if main:
                    log.info("%s: mIoU %.2f, FB-IoU %.2f (%d episodes)", name, result["miou"], result["fbiou"],
                             result["episodes"])  # fmt: skip
                if want:
                    panels = gather_object(items) if world > 1 else items
                    title, class_names = f"{setting.data.dataset} {name}", dict(shards.class_names)
        shards.close()
        accelerator.free_memory(model)
        model = None
    return title, class_names, panels


def _row(cfg: Config, seed: int, result: dict, weights: str, backbone_weights: str) -> dict:
    """A results.json row: the setting and its numbers (percent)."""
    return {
        "weights": weights,
        "dataset": cfg.data.dataset,
        "fold": cfg.data.fold,
        "shot": cfg.data.shot,
        "seed": seed,
        "episodes": result["episodes"],
        "miou": result["miou"],
        "fbiou": result["fbiou"],
        "class_iou": {str(c): v for c, v in result["class_iou"].items()},
        "missing": result["missing"],
        "backbone": cfg.model.backbone.name,
        "backbone_weights": backbone_weights,
        "method": variant(cfg),
        "image_size": cfg.data.image_size,
        "protocol": cfg.data.protocol,
    }


def _row_metrics(row: dict) -> dict[str, float]:
    where = f"fold{row['fold']}/{row['shot']}shot/seed{row['seed']}" + (
        f"/{row['weights']}" if row["weights"] != "final" else ""
    )
    return {f"miou/{where}": row["miou"], f"fbiou/{where}": row["fbiou"]}


__all__ = ["default_out", "evaluate", "evaluate_episodes", "load_for_fold", "plan_folds", "trained_on"]
