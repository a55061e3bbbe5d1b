"""The paper's Table 3 on toy data: each ablation row trained and evaluated with several seeds (launch/toy_table3.sh).

Rows: baseline, +P2P, +P2B, +P2P+P2B, +CKMM, all (configs/ablation/table3_*.yaml on top of configs/demo.yaml);
each trained on fold 0's base classes with `--seeds` training seeds and evaluated 1-shot on the novel classes
(the same episode list for every run). The table of mean ± std mIoU, with the paper's numbers beside it, is
written between the markers of docs/RESULTS.md; every run's numbers go to `<out>/table3.json`.

    python -m jc2a.runs.toy_table3 --out runs/toy_table3 --seeds 0 1 2 --steps 500
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import time
from datetime import date
from pathlib import Path

from jc2a.paper import rows
from jc2a.presets import preset

TABLE3 = {r.variant: r for r in rows(3)}  # variant key -> the paper's row (its config, its numbers)
ROWS = tuple(TABLE3)
MARKERS = ("<!-- toy-table3:start -->", "<!-- toy-table3:end -->")


def _run_dir(out: Path, row: str, seed: int) -> Path:
    return out / f"{row.replace('+', '_')}-seed{seed}"


def run_row(row: str, seed: int, shards: Path, out: Path, steps: int, episodes: int) -> dict:
    """Train one row with one seed, then its 1-shot mIoU / FB-IoU on the novel classes."""
    from jc2a.config import load_config
    from jc2a.data.episodes import open_shards
    from jc2a.runs.evaluate import evaluate_episodes
    from jc2a.runs.network import load_trained_model
    from jc2a.runs.session import close_accelerator, make_accelerator, reset_accelerate_state
    from jc2a.runs.train import train

    run_dir = _run_dir(out, row, seed)
    configs = [preset("demo.yaml"), preset(f"ablation/{TABLE3[row].config}.yaml")]
    overrides = [f"data.shards={shards}", f"train.output_dir={run_dir}", f"train.seed={seed}",
                 f"train.max_steps={steps}", f"train.save_every={steps}", "train.val_every=0", "train.tracking=none",
                 "data.eval_seeds=[0]"]  # fmt: skip
    cfg = load_config(configs, overrides)
    start = time.perf_counter()
    if not (run_dir / "model.safetensors").is_file():
        reset_accelerate_state()
        train(cfg, progress=False)
    reset_accelerate_state()
    accelerator = make_accelerator(cfg)
    model, _ = load_trained_model(run_dir)
    params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    val = open_shards(cfg.data, "val")
    result, _ = evaluate_episodes(accelerator, model.to(accelerator.device), cfg, val, 0, episodes)
    close_accelerator(accelerator)
    return {"row": row, "seed": seed, "miou": result["miou"], "fbiou": result["fbiou"],
            "trainable_params": params, "seconds": time.perf_counter() - start}  # fmt: skip


def previous_runs(path: Path, steps: int, episodes: int) -> dict[tuple[str, int], dict]:
    """Results of an earlier invocation (table3.json) with the same steps and episodes, by (row, seed): an
    interrupted table resumes where it stopped. A run whose weights are gone is run again."""
    if not path.is_file():
        return {}
    try:
        runs = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise SystemExit(f"{path}: not JSON ({exc}); delete it to start the table again") from None
    kept = {}
    for r in runs:
        same = r.get("steps", steps) == steps and r.get("episodes", episodes) == episodes
        if same and (_run_dir(path.parent, r["row"], r["seed"]) / "model.safetensors").is_file():
            kept[(r["row"], r["seed"])] = r
    return kept


def table(runs: list[dict], steps: int, episodes: int, seeds: list[int], seconds: float, command: str) -> str:
    lines = [
        f"Run {date.today().isoformat()} on {platform.machine()} ({platform.processor() or 'CPU'}), {os.cpu_count()} "
        f"cores, no GPU; {len(runs)} runs, {seconds / 60:.0f} minutes of training and evaluation in all. "
        f"Command: `{command}`.",
        "",
        f"Toy COCO-20i fold 0, configs/demo.yaml ({steps} steps each, trainable mobilenetv3_small_050 at 129 px), "
        f"training seeds {seeds}; 1-shot mIoU on the 20 novel classes, {episodes} episodes (the same list for every "
        "run); mean ± sample std over the seeds. The paper's column is PASCAL-5i, ResNet50, mean over 4 folds.",
        "",
        "| row | P2P | P2B | CKMM | trainable params | toy 1-shot mIoU | toy FB-IoU | paper 1-shot mIoU "
        "| paper params |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in ROWS:
        mine = [r for r in runs if r["row"] == row]
        if not mine:
            continue
        miou = [r["miou"] for r in mine]
        fb = [r["fbiou"] for r in mine]
        std = statistics.stdev(miou) if len(miou) > 1 else 0.0
        std_fb = statistics.stdev(fb) if len(fb) > 1 else 0.0
        p2p, p2b, ckmm = ("p2p" in row or row == "jc2a"), ("p2b" in row or row == "jc2a"), row in ("ckmm", "jc2a")
        params, paper_1 = TABLE3[row].params_m, TABLE3[row].shots[1].miou
        ticks = " | ".join("✓" if on else "" for on in (p2p, p2b, ckmm))
        lines.append(
            f"| {row} | {ticks} | {mine[0]['trainable_params'] / 1e6:.3f} M | {statistics.mean(miou):.1f} ± {std:.1f} "
            f"| {statistics.mean(fb):.1f} ± {std_fb:.1f} | {paper_1:.1f} | {params:.2f} M |"
        )
    return "\n".join(lines) + "\n"


def write_results(text: str, path: Path = Path("docs/RESULTS.md")) -> Path:
    """Put `text` between the toy-table3 markers of docs/RESULTS.md (the rest of the file is kept)."""
    doc = path.read_text()
    start, end = MARKERS
    pattern = re.compile(re.escape(start) + ".*?" + re.escape(end), re.S)
    doc = pattern.sub(lambda m: f"{start}\n{text}{end}", doc)
    path.write_text(doc)
    return path


def main(argv=None) -> int:
    from jc2a.runs.demo import toy_shards
    from jc2a.runs.session import setup_logging

    parser = argparse.ArgumentParser(prog="python -m jc2a.runs.toy_table3", description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("runs/toy_table3"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--episodes", type=int, default=300)
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=ROWS)
    parser.add_argument("--no-write", action="store_true", help="do not touch docs/RESULTS.md")
    args = parser.parse_args(argv)
    setup_logging()
    shards = toy_shards(args.out, 600, 240, 160, progress=False)
    done = previous_runs(args.out / "table3.json", args.steps, args.episodes)
    runs = []
    for row in args.rows:
        for seed in args.seeds:
            key = (row, seed)
            runs.append(done.get(key) or run_row(row, seed, shards, args.out, args.steps, args.episodes))
            runs[-1].update(steps=args.steps, episodes=args.episodes)
            print(json.dumps(runs[-1]), flush=True)
            merged = {**done, **{(r["row"], r["seed"]): r for r in runs}}
            (args.out / "table3.json").write_text(json.dumps(list(merged.values()), indent=1))
    command = "bash launch/toy_table3.sh" + (f" {' '.join(argv)}" if argv else "")
    text = table(runs, args.steps, args.episodes, args.seeds, sum(r["seconds"] for r in runs), command)
    print(text)
    if not args.no_write:
        print(f"written to {write_results(text)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
