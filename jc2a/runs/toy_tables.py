"""The paper's Tables 3, 4 and 6 on toy data, in the demo's regime (launch/toy_tables.sh, issue 17).

Each row of `jc2a.paper.rows(3)`, `rows(4)` and `rows(6)` is trained with its `configs/ablation/` file on top of
configs/demo.yaml (the toy data version 2, the frozen backbone `jc2a pretrain` made, one file for every run as the
paper uses one ImageNet backbone) on fold 0's base classes, once per training seed (Table 3: 5 seeds, Tables 4 and
6: 3), and evaluated 1-shot and 5-shot on the novel classes, on the same episode list for every run (a model trained
1-shot serves both: the paper's decision-level fusion). Rows that are the same model (the full JC2A is Table 3's
`all`, Table 4's `ours`, Table 6's `HPAM add` and `MIA concat`) share their runs. Per row: mean ± sample std over
the seeds, and against the table's reference row of the same seed (Table 3: the baseline; Tables 4 and 6: the full
JC2A) the mean paired difference with its 95% interval (Student's t, n - 1 degrees of freedom). Every row keeps
PFENet's prior mask, as the demo does (without it JC2A did not learn the novel toy classes in the demo's budget,
configs/demo.yaml says how it was measured); `--no-prior` runs the paper's models, none with the prior.

Resumable: every run writes `<out>/<variant>-seed<s>/result.json` when it is done, and a new invocation with the
same steps, episodes and prior reads it back instead of training again (a run stopped before its result is resumed
from its last checkpoint, a quarter of its steps apart; a finished training is only evaluated). `--jobs 2` runs two
trainings at once, one thread each. The tables go between the markers of
docs/RESULTS.md when every planned run is done; every run's numbers go to `<out>/runs.json`.

    python -m jc2a.runs.toy_tables --out runs/toy_tables --jobs 2
    python -m jc2a.runs.toy_tables --tables 3 --seeds3 0 1 --steps 50 --episodes 40 --no-write   # a quick look
    python -m jc2a.runs.toy_tables --reuse docs/toy_tables/runs-500.json --steps 500 --episodes 200   # the tables
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from datetime import date
from pathlib import Path
from typing import Optional, Sequence

from jc2a.atomic import write_text as atomic_write_text
from jc2a.paper import PaperRow, rows
from jc2a.presets import preset
from jc2a.runs.report import mean_std

TABLES = (3, 4, 6)
REFERENCE = {3: "baseline", 4: "jc2a", 6: "jc2a"}  # the variant each table's differences are taken against
SHOTS = (1, 5)
MARKERS = ("<!-- toy-tables:start -->", "<!-- toy-tables:end -->")
RESULTS = Path("docs/RESULTS.md")  # the checkout's, relative to the current folder (launch/toy_tables.sh: its root)
# Two-sided 95% quantiles of Student's t with df = n - 1 (scipy is not a dependency): t_{0.975, df}
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}


def run_dir(out: Path, variant: str, seed: int, prior: bool = True) -> Path:
    return out / f"{variant.replace('+', '_')}{'' if prior else '-noprior'}-seed{seed}"


def plan(
    tables: Sequence[int], seeds3: Sequence[int], seeds: Sequence[int], variants: Optional[Sequence[str]] = None
) -> list[tuple[str, str, int]]:
    """(variant, ablation config stem, seed) of every run the tables need (only `variants` when given), each model
    and seed once, in table order."""
    out: dict[tuple[str, int], str] = {}
    for table in tables:
        for row in rows(table):
            if variants and row.variant not in variants:
                continue
            for seed in seeds3 if table == 3 else seeds:
                out.setdefault((row.variant, seed), row.config or "")
    return [(variant, config, seed) for (variant, seed), config in out.items()]


def run_one(variant: str, config: str, seed: int, shards: str, weights: str, out: str, steps: int, episodes: int,
            threads: int, prior: bool = True) -> dict:  # fmt: skip
    """Train one model (resuming its folder's run, left as it is when finished), evaluate it 1- and 5-shot, write
    its result.json. `prior`
    sets PFENet's prior mask for every row alike (after the row's ablation file, which may say otherwise)."""
    import copy

    import torch

    from jc2a.config import load_config
    from jc2a.data.episodes import open_shards
    from jc2a.runs.checkpoints import checkpoint_dirs
    from jc2a.runs.evaluate import evaluate_episodes
    from jc2a.runs.network import load_trained_model
    from jc2a.runs.session import close_accelerator, make_accelerator, reset_accelerate_state, setup_logging
    from jc2a.runs.train import train

    setup_logging()
    torch.set_num_threads(threads)
    folder = run_dir(Path(out), variant, seed, prior)
    configs = [preset("demo.yaml"), preset(f"ablation/{config}.yaml")]
    overrides = [f"data.shards={shards}", f"model.backbone.weights={weights}", f"train.output_dir={folder}",
                 f"train.seed={seed}", f"train.max_steps={steps}", f"train.save_every={max(1, steps // 4)}",
                 "train.val_every=0", "train.tracking=none", "data.eval_seeds=[0]",
                 f"model.pfenet_prior={str(prior).lower()}"]  # fmt: skip
    cfg = load_config(configs, overrides)
    start = time.perf_counter()
    # resumed from the folder's last checkpoint when there is one (a finished run is left as it is); a folder whose
    # run had another config (steps, prior, ...) is refused by train's own check, naming the key
    reset_accelerate_state()
    train(cfg, progress=False, resume=bool(checkpoint_dirs(folder)))
    trained = time.perf_counter() - start
    reset_accelerate_state()
    accelerator = make_accelerator(cfg)
    model, _ = load_trained_model(folder)
    model.to(accelerator.device)
    params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    val = open_shards(cfg.data, cfg.data.val_split)
    result = {"variant": variant, "seed": seed, "steps": steps, "episodes": episodes, "prior": prior,
              "weights": weights, "trainable_params": params, "miou": {}, "fbiou": {}}  # fmt: skip
    for shot in SHOTS:
        setting = copy.deepcopy(cfg)
        setting.data.shot = shot
        numbers, _ = evaluate_episodes(accelerator, model, setting, val, 0, episodes)
        result["miou"][str(shot)], result["fbiou"][str(shot)] = numbers["miou"], numbers["fbiou"]
    close_accelerator(accelerator)
    result.update(seconds_train=trained, seconds=time.perf_counter() - start, threads=threads)
    atomic_write_text(folder / "result.json", json.dumps(result, indent=1))
    return result


def done(out: Path, variant: str, seed: int, steps: int, episodes: int, prior: bool = True) -> Optional[dict]:
    """The result of an earlier invocation's run with the same steps, episodes and prior, or None."""
    path = run_dir(out, variant, seed, prior) / "result.json"
    if not path.is_file():
        return None
    try:
        result = json.loads(path.read_text())
    except json.JSONDecodeError:
        return None
    return result if isinstance(result, dict) and same_setting(result, steps, episodes, prior) else None


def same_setting(result: dict, steps: int, episodes: int, prior: bool) -> bool:
    """Whether a run's result was computed with these steps, episodes and prior (what makes runs comparable)."""
    return (result.get("steps"), result.get("episodes"), result.get("prior")) == (steps, episodes, prior)


def reused(files: Sequence[Path], steps: int, episodes: int, prior: bool) -> dict[tuple[str, int], dict]:
    """The runs of earlier invocations' `runs.json` files (e.g. another session's, committed) with the same steps,
    episodes and prior, by (variant, seed): a long table can be run in parts on different days or machines. Only
    numbers are read from them; a record that is not a run's result is refused naming the file and the record."""
    found: dict[tuple[str, int], dict] = {}
    for path in files:
        try:
            records = json.loads(Path(path).read_text())
        except (OSError, ValueError) as exc:
            raise SystemExit(f"--reuse {path}: not readable as JSON ({type(exc).__name__}: {exc})") from None
        if not isinstance(records, list):
            raise SystemExit(f"--reuse {path}: a runs.json holds a list of runs, this holds a {type(records).__name__}")
        for i, r in enumerate(records):
            try:
                key = (str(r["variant"]), int(r["seed"]))
                scores = [float(r[m][shot]) for m in ("miou", "fbiou") for shot in ("1", "5")]
                float(r["trainable_params"])
            except (TypeError, KeyError, ValueError):
                raise SystemExit(f"--reuse {path}: record {i} is not a run's result (variant, seed, miou and fbiou "
                                 "for shots 1 and 5, trainable_params)") from None  # fmt: skip
            if not all(0.0 <= v <= 100.0 for v in scores):
                raise SystemExit(f"--reuse {path}: record {i} ({key[0]} seed {key[1]}) has a score outside 0-100")
            if same_setting(r, steps, episodes, prior):
                found[key] = r
    return found


# --------------------------------------------------------------------------- statistics and tables


def paired_interval(differences: Sequence[float]) -> tuple[float, float]:
    """(mean, half-width of its 95% interval) of paired differences over n seeds: t_{0.975, n-1} x sd / sqrt(n);
    the half-width is NaN for one seed (no spread to measure) or more than 11 (outside the t table)."""
    mean, sd = mean_std(differences)
    n = len(differences)
    if n < 2 or n - 1 not in T975:
        return mean, math.nan
    return mean, T975[n - 1] * sd / math.sqrt(n)


def _delta(mean: float, half: float) -> str:
    if math.isnan(half):
        return f"{mean:+.1f}"
    return f"{mean:+.1f} [{mean - half:+.1f}, {mean + half:+.1f}]"


def table_markdown(table: int, results: dict[tuple[str, int], dict], seeds: Sequence[int]) -> str:
    """One table: per row mean ± std over `seeds` (1- and 5-shot mIoU, 1-shot FB-IoU), the paired difference
    against the reference row with its 95% interval, the parameters and the paper's numbers."""
    reference = REFERENCE[table]
    ref_name = next(r.label for r in rows(table) if r.variant == reference)
    head = (f"| row | toy 1-shot mIoU | Δ vs {ref_name}, 95% CI | toy 5-shot mIoU | Δ vs {ref_name}, 95% CI "
            "| toy 1-shot FB-IoU | trainable params | paper 1-shot | paper 5-shot |")  # fmt: skip
    lines = [head, "|---|---|---|---|---|---|---|---|---|"]
    for row in rows(table):
        mine = [results[(row.variant, s)] for s in seeds if (row.variant, s) in results]
        if not mine:
            continue
        cells = [row.label]
        for shot in ("1", "5"):
            m, sd = mean_std([r["miou"][shot] for r in mine])
            cells.append(f"{m:.1f} ± {sd:.1f}")
            if row.variant == reference:
                cells.append("(reference)")
            else:
                pairs = [(r, results.get((reference, r["seed"]))) for r in mine]
                diffs = [r["miou"][shot] - ref["miou"][shot] for r, ref in pairs if ref is not None]
                cells.append(_delta(*paired_interval(diffs)) if diffs else "—")
        fb, fb_sd = mean_std([r["fbiou"]["1"] for r in mine])
        cells += [f"{fb:.1f} ± {fb_sd:.1f}", f"{mine[0]['trainable_params'] / 1e6:.3f} M"]
        cells += [_paper(row, 1), _paper(row, 5)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _paper(row: PaperRow, shot: int) -> str:
    n = row.shots.get(shot)
    if n is None:
        return "—"
    return f"{n.miou:.1f}" + (f" ({n.fbiou:.1f})" if n.fbiou is not None else "")


def report(results: dict[tuple[str, int], dict], tables: Sequence[int], seeds3: Sequence[int],
           seeds: Sequence[int], steps: int, episodes: int, command: str, hours: float,
           prior: bool = True) -> str:  # fmt: skip
    """The three tables with their heading (date, machine, command, setting)."""
    runs = len({k for k in results})
    lines = [
        f"Run finished {date.today().isoformat()} on {platform.machine()} ({platform.processor() or 'CPU'}), "
        f"{os.cpu_count()} cores, no GPU; {runs} runs, {hours:.1f} CPU-hours of training and evaluation in all "
        f"(the sum of the runs' own times). Command: `{command}`.",
        "",
        f"Toy COCO-20i (version 2) fold 0, configs/demo.yaml plus each row's configs/ablation/ file: {steps} "
        f"training steps of batch 4 on the base classes on the frozen pretrained backbone; 1- and 5-shot mIoU on the "
        f"20 novel classes over the same {episodes} episodes for every run (5-shot from the same 1-shot-trained "
        "model); mean ± sample std over the training seeds; Δ: the mean over seeds of (row − reference row of the "
        "same seed), with its 95% interval (t with n − 1 degrees of freedom). The paper's columns: PASCAL-5i, "
        "ResNet50, mean over 4 folds (FB-IoU in brackets).",
        "",
        (
            "Every row keeps PFENet's prior mask (`model.pfenet_prior=true`), as the demo does: the rows differ only "
            "in HPAM, CKMM and MIA, so Table 3's baseline is PFENet (the paper's Table 5) and its CKMM row PFENet + "
            "CKMM. The paper's rows have no prior (its JC2A replaces the prior by CKMM); on the toy data that model "
            "did not learn the novel classes in the demo's budget (configs/demo.yaml), `--no-prior` runs it."
        )
        if prior
        else "No row has PFENet's prior mask (`--no-prior`: the paper's models, its JC2A replacing the prior by CKMM).",
    ]
    for table in tables:
        seeds_t = seeds3 if table == 3 else seeds
        lines += ["", f"**Table {table}** (training seeds {list(seeds_t)})", ""]
        lines.append(table_markdown(table, results, seeds_t))
    return "\n".join(lines)


def write_results(text: str, path: Path = RESULTS) -> Path:
    """Put `text` between the toy-tables markers of docs/RESULTS.md (the rest of the file is kept)."""
    if not path.is_file():
        raise SystemExit(f"{path}: not here to write the tables into (run from a jc2a checkout's root, or --no-write)")
    doc = path.read_text()
    start, end = MARKERS
    pattern = re.compile(re.escape(start) + ".*?" + re.escape(end), re.S)
    if not pattern.search(doc):
        raise SystemExit(f"{path}: no {start} ... {end} markers to write the tables between")
    atomic_write_text(path, pattern.sub(lambda m: f"{start}\n{text}{end}", doc))
    return path


# --------------------------------------------------------------------------- command line


def main(argv: Optional[Sequence[str]] = None) -> int:
    from jc2a.runs.demo import TOY_VERSION, pretrained_backbone, toy_shards
    from jc2a.runs.session import setup_logging

    parser = argparse.ArgumentParser(prog="python -m jc2a.runs.toy_tables", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--out", type=Path, default=Path("runs/toy_tables"))
    parser.add_argument("--tables", type=int, nargs="+", default=list(TABLES), choices=TABLES)
    parser.add_argument("--seeds3", type=int, nargs="+", default=[0, 1, 2, 3, 4], help="Table 3's training seeds")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="Tables 4 and 6's training seeds")
    parser.add_argument("--variants", nargs="+", default=None, help="only these rows (jc2a.paper variant names)")
    parser.add_argument("--steps", type=int, default=None, help="training steps per run (default: the demo's)")
    parser.add_argument("--episodes", type=int, default=300, help="evaluation episodes per shot")
    parser.add_argument("--train-images", type=int, default=600)
    parser.add_argument("--val-images", type=int, default=240)
    parser.add_argument("--pretrain-steps", type=int, default=None, help="(default: jc2a pretrain's)")
    parser.add_argument("--jobs", type=int, default=1, help="runs at once, each in its own process")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per run (default: cores / jobs)")
    parser.add_argument(
        "--no-prior",
        dest="prior",
        action="store_false",
        help="no row has PFENet's prior mask, as the paper's (default: every row has it, as the demo)",
    )
    parser.add_argument("--reuse", type=Path, nargs="+", default=[], metavar="RUNS_JSON",
                        help="count the runs of earlier runs.json files with the same steps, episodes and prior as "
                        "done (a table run in parts)")  # fmt: skip
    parser.add_argument("--no-write", action="store_true", help="do not touch docs/RESULTS.md")
    args = parser.parse_args(argv)
    known = {r.variant for t in args.tables for r in rows(t)}
    unknown = sorted(set(args.variants or ()) - known)
    if unknown:
        parser.error(f"--variants {' '.join(unknown)}: not a row of tables {args.tables} ({', '.join(sorted(known))})")
    if not args.no_write and not RESULTS.is_file():  # found now, not after the hours of runs
        parser.error(f"{RESULTS}: not here to write the tables into (run from a jc2a checkout's root, or --no-write)")
    setup_logging()
    from jc2a.config import load_config

    steps = args.steps or load_config(preset("demo.yaml")).train.max_steps
    threads = args.threads or max(1, (os.cpu_count() or 1) // args.jobs)
    todo = plan(args.tables, args.seeds3, args.seeds, args.variants)
    results: dict[tuple[str, int], dict] = {}
    pending = []
    earlier = reused(args.reuse, steps, args.episodes, args.prior)
    for variant, config, seed in todo:
        previous = done(args.out, variant, seed, steps, args.episodes, args.prior) or earlier.get((variant, seed))
        if previous is not None:
            results[(variant, seed)] = previous
        else:
            pending.append((variant, config, seed))
    print(f"{len(todo)} runs planned, {len(results)} done earlier, {len(pending)} to run", flush=True)

    def record(result: dict) -> None:
        results[(result["variant"], result["seed"])] = result
        print(json.dumps({k: result[k] for k in ("variant", "seed", "miou", "fbiou", "seconds")}), flush=True)
        atomic_write_text(args.out / "runs.json", json.dumps(list(results.values()), indent=1))

    if pending:  # the data and the backbone only when something is to train (not for tables from --reuse alone)
        shards = toy_shards(args.out, args.train_images, args.val_images, 160, progress=False, version=TOY_VERSION)
        weights, _ = pretrained_backbone(args.out / "pretrain", args.pretrain_steps, 0, progress=False)
        common = (str(shards), str(weights), str(args.out), steps, args.episodes, threads, args.prior)
        if args.jobs > 1:
            import multiprocessing

            with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
                futures = [pool.submit(run_one, v, c, s, *common) for v, c, s in pending]
                for future in futures:
                    record(future.result())
        else:
            for v, c, s in pending:
                record(run_one(v, c, s, *common))
    given = list(sys.argv[1:] if argv is None else argv)  # what the user typed after the script, for the report
    command = "bash launch/toy_tables.sh" + (f" {' '.join(given)}" if given else "")
    hours = sum(r.get("seconds", 0.0) * r.get("threads", 1) for r in results.values()) / 3600
    text = report(results, args.tables, args.seeds3, args.seeds, steps, args.episodes, command, hours, args.prior)
    print(text)
    if not args.no_write:
        print(f"written to {write_results(text)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


__all__ = ["MARKERS", "REFERENCE", "T975", "main", "paired_interval", "plan", "report", "reused", "run_one",
           "same_setting", "table_markdown", "write_results"]  # fmt: skip
