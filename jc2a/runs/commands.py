"""The command-line halves of the runs: each command's arguments and its `run(args)`, importing the run it drives
only when it runs, so that `jc2a COMMAND --help` answers at once (no torch, no timm)."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from jc2a.config import RESUME_FREE_KEYS
from jc2a.labels import MASK_HELP

__all__ = ["Bank", "ConvertWeights", "Demo", "Eval", "Predict", "Preview", "Summary", "Train"]



def _config(parser: argparse.ArgumentParser, help_text: str = "YAML config (repeat to compose)") -> None:
    parser.add_argument("--config", action="append", default=None, help=help_text)


def _overrides(parser: argparse.ArgumentParser, example: str = "data.fold=1") -> None:
    parser.add_argument("overrides", nargs="*", help=f"dotted key=value overrides, e.g. {example}")


def _main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


class Train:
    """`jc2a train` (jc2a/runs/train.py)."""

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        _config(parser)
        parser.add_argument(
            "--resume",
            nargs="?",
            const=True,
            default=None,
            metavar="DIR",
            help="continue a run: DIR (a run folder or one of its checkpoints) with DIR's own config.yaml, or "
            "without DIR the latest checkpoint of train.output_dir; 'auto' starts a new run when there is no "
            "checkpoint yet (what a requeued SLURM job runs). On resume --config and key=value may change only "
            + ", ".join(RESUME_FREE_KEYS) + "; any other key is refused, naming it",
        )
        parser.add_argument("--no-progress", action="store_true")
        _overrides(parser, "data.fold=1 train.max_steps=100")

    @staticmethod
    def run(args: argparse.Namespace) -> int:
        from jc2a.runs.checkpoints import resume_config
        from jc2a.runs.train import train

        cfg, resume = resume_config(args.config, args.overrides, args.resume)
        summary = train(cfg, resume=resume, progress=not args.no_progress)
        if _main_process():
            print(json.dumps({k: v for k, v in summary.items() if isinstance(v, (int, float, str))}, indent=1))
        return 0


class Eval:
    """`jc2a eval` (jc2a/runs/evaluate.py)."""

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        _config(parser, "YAML config instead of the run's (repeat)")
        parser.add_argument(
            "--checkpoint",
            required=True,
            help="model.safetensors or a run folder (its model.safetensors and config.yaml); {fold} is replaced by "
            "each fold, e.g. runs/coco-f{fold}",
        )
        parser.add_argument("--shots", type=int, nargs="+", default=[1, 5], help="K supports (default: 1 5)")
        parser.add_argument(
            "--folds",
            type=int,
            nargs="+",
            default=None,
            help="folds (default: the checkpoint's own; all four for a {fold} checkpoint); several need {fold}",
        )
        parser.add_argument("--seeds", type=int, nargs="+", default=None, help="episode lists (data.eval_seeds)")
        parser.add_argument("--episodes", type=int, default=None, help="episodes per fold, seed (data.eval_episodes)")
        parser.add_argument(
            "--out",
            type=Path,
            default=None,
            help="report folder (default <run>/eval; <folder>/eval for a model file; runs/x-f0123-eval for "
            "runs/x-f{fold})",
        )
        parser.add_argument("--figures", type=int, default=4, help="figures of the first N episodes (default 4)")
        parser.add_argument(
            "--weights",
            nargs="+",
            choices=["final", "best"],
            default=["final"],
            help="a run's final model.safetensors (default) and/or best/ (the best validation mIoU; PFENet reports "
            "the epoch with the best mIoU on the test episodes themselves): --weights final best scores both",
        )
        parser.add_argument("--no-progress", action="store_true")
        _overrides(parser, "data.shards=/data/coco")

    @staticmethod
    def run(args: argparse.Namespace) -> int:
        from jc2a.runs.evaluate import default_out, evaluate, plan_folds

        results = evaluate(args.checkpoint, configs=args.config, overrides=args.overrides, shots=args.shots,
                           folds=args.folds, seeds=args.seeds, episodes=args.episodes, out=args.out,
                           figures=args.figures, progress=not args.no_progress, weights=args.weights)  # fmt: skip
        if _main_process():
            for s in results["summary"]:
                print(f"{s['dataset']} {s['backbone']} {s['shot']}-shot ({s['weights']} weights), folds {s['folds']}, "
                      f"seeds {s['seeds']}: mIoU {s['miou_mean']:.2f} ± {s['miou_std']:.2f}, FB-IoU "
                      f"{s['fbiou_mean']:.2f} ± {s['fbiou_std']:.2f}")  # fmt: skip
            out = args.out or default_out(args.checkpoint, plan_folds(args.checkpoint, args.folds))
            figures = len(results.get("figures", []))
            print(f"wrote {out / 'results.json'}, {out / 'results.md'} and {figures} figure(s) in {out / 'figures'}")
        return 0


class Bank:
    """`jc2a bank` (jc2a/runs/bank.py)."""

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        _config(parser)
        parser.add_argument("--out", type=Path, required=True, help="the bank file to write (safetensors)")
        parser.add_argument("--no-progress", action="store_true")
        _overrides(parser)

    @staticmethod
    def run(args: argparse.Namespace) -> int:
        from jc2a.runs.bank import bank_main

        return bank_main(args.config, args.overrides, args.out, not args.no_progress)


class Preview:
    """`jc2a preview` (jc2a/runs/preview.py)."""

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        _config(parser)
        parser.add_argument("--episodes", type=int, default=4, help="episodes of each split to draw")
        parser.add_argument("--out", type=Path, default=None, help="picture folder (<train.output_dir>/preview)")
        _overrides(parser)

    @staticmethod
    def run(args: argparse.Namespace) -> int:
        from jc2a.config import load_config, save_config
        from jc2a.runs.preview import preview

        cfg = load_config(args.config, args.overrides)
        out = args.out or Path(cfg.train.output_dir) / "preview"
        saved = save_config(cfg, out / "config.yaml")
        paths = preview(cfg, args.episodes, out)
        print(f"resolved config: {saved}")
        print(f"{len(paths)} episode pictures in {out}")
        return 0


class Summary:
    """`jc2a summary` (jc2a/runs/summary.py)."""

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "--config",
            action="append",
            default=None,
            metavar="YAML",
            help="config file(s) applied in order on top of the defaults (default: the paper's settings, 473 input)",
        )
        parser.add_argument("--backbone", default=None, help="timm backbone name (default: the config's)")

    @staticmethod
    def run(args: argparse.Namespace) -> int:
        from jc2a.runs.summary import explain, format_table, summarize

        cfg, counts = summarize(args.config, args.backbone)
        print(format_table(cfg, counts))
        print()
        for sentence in explain(cfg, counts):
            print(f"- {sentence}")
        return 0


class ConvertWeights:
    """`jc2a convert-weights` (jc2a/runs/convert_weights.py)."""

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("src", metavar="IN.pth", help="PFENet's ResNet weights, e.g. initmodel/resnet50_v2.pth")
        parser.add_argument("dst", metavar="OUT.safetensors", help="the converted file (timm keys, safetensors)")
        parser.add_argument(
            "--arch",
            choices=("pfenet_resnet50", "pfenet_resnet101"),
            default=None,
            help="target backbone (default: from the number of layer3 blocks)",
        )

    @staticmethod
    def run(args: argparse.Namespace) -> int:
        from jc2a.runs.convert_weights import convert

        arch, dst, count = convert(args.src, args.dst, args.arch)
        print(f"wrote {dst}: {count} tensors of {arch} from {args.src} (fc.* dropped); "
              f"use model.backbone.name={arch} model.backbone.weights={dst}")  # fmt: skip
        return 0


class Predict:
    """`jc2a predict` (jc2a/runs/predict.py)."""

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        parser.formatter_class = argparse.RawDescriptionHelpFormatter
        parser.epilog = (
            MASK_HELP + "\n\nImages are read ignoring EXIF orientation (as the training shards): a photo is segmented "
            "as stored, and each output has the query's stored size and orientation."
        )
        parser.add_argument("--checkpoint", required=True, help="model.safetensors or a run folder")
        _config(parser, "YAML config instead of the run's (repeat)")
        parser.add_argument(
            "--support",
            action="append",
            required=True,
            metavar="IMG:MASK",
            help="a support image and its mask (repeat for K shots; all go into one forward). " + MASK_HELP,
        )
        parser.add_argument("--query", action="append", required=True, metavar="IMG", help="a query image (repeat)")
        parser.add_argument("--out", type=Path, default=Path("predictions"), help="output folder (./predictions)")
        parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")
        parser.add_argument("overrides", nargs="*", help="dotted key=value overrides")

    @staticmethod
    def run(args: argparse.Namespace) -> int:
        from jc2a.runs.predict import (
            Predictor,
            check_device,
            output_names,
            pixel_limit,
            read_image,
            read_mask,
            save_prediction,
            split_support,
        )

        # 1. the device and every input are checked (images from their headers first) before the model is loaded
        check_device(args.device)
        limit = pixel_limit(args.config, args.overrides)
        pairs = [split_support(text) for text in args.support]
        supports = [read_image(image, limit) for image, _ in pairs]
        masks = [read_mask(mask, limit) for _, mask in pairs]
        queries = [Path(q) for q in args.query]
        images = [read_image(q, limit) for q in queries]
        predictor = Predictor.from_checkpoint(args.checkpoint, args.device, args.config, args.overrides)
        names = [os.fspath(image) for image, _ in pairs]
        prepared = predictor.prepare_supports(supports, masks, names, [os.fspath(mask) for _, mask in pairs])
        # 2. one query at a time (their sizes differ), the supports prepared once
        for query, image, name in zip(queries, images, output_names(queries)):
            result = predictor.predict_one(image, prepared, os.fspath(query))
            save_prediction(args.out, name, image, result)
            share = float(result.mask.mean()) * 100
            print(f"{query} -> {args.out / name}_mask.png ({image.shape[1]}x{image.shape[0]}, {share:.1f}% object)")
        return 0


class Demo:
    """`jc2a demo` (jc2a/runs/demo.py): the main job on the built-in toy data."""

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        add = parser.add_argument
        add("--out", type=Path, default=Path("runs/demo"), help="everything goes here (default runs/demo)")
        add("--train-images", type=int, default=600)
        add("--val-images", type=int, default=240)
        add("--size", type=int, default=160, help="toy image side")
        add("--steps", type=int, default=None, help="training steps (default: configs/demo.yaml's)")
        add("--episodes", type=int, default=None, help="evaluation episodes per shot (default: config)")
        add("--seed", type=int, default=None, help="train.seed of JC2A and the baseline (default: config)")
        add("--pretrain-steps", type=int, default=None, help="pretraining steps (default: jc2a pretrain's)")
        add("--pretrain-seed", type=int, default=0)
        add("--pretrain-cache", type=Path, default=None, help="pretrained backbones (default OUT/pretrain)")
        add("--threads", type=int, default=None, help="torch threads (default: one per core)")
        add("--toy-version", type=int, default=None, choices=(1, 2),
            help="toy data version (default: jc2a.runs.demo.TOY_VERSION, the one the demo's settings were tuned "
            "on; 1: the flat set of before issue 17)")  # fmt: skip
        add("--no-progress", action="store_true")
        _overrides(parser, "train.max_steps=400")

    @staticmethod
    def run(args: argparse.Namespace) -> int:
        from jc2a.runs.demo import demo

        result = demo(args.out, args.train_images, args.val_images, args.size, args.steps, args.episodes,
                      tuple(args.overrides), not args.no_progress, args.seed, args.pretrain_steps, args.pretrain_seed,
                      args.pretrain_cache, args.threads, args.toy_version)  # fmt: skip
        return 0 if result["passed"] else 1
