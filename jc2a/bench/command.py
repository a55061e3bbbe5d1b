"""The `jc2a bench [SECTION]` command: benchmarks that print ratios measured in one run, one section per subsystem.

Each section lives in a module of its own (`jc2a/bench/hpam.py`, `data.py`, `train.py` (train and memory),
`eval.py`, `gpu.py`), imported when it runs, so that the command's start-up stays quick; the measuring tools they
share are in `jc2a/bench/harness.py`.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Dict

from jc2a.errors import UserError

if TYPE_CHECKING:
    from jc2a.bench.harness import Report

__all__ = ["SECTIONS", "add_arguments", "run"]


def bench_hpam(args: argparse.Namespace) -> Report:
    """One HPAM level, ours (linear_relu) against normal attention (softmax), at 60x60 and 81x81 (hpam.py)."""
    from jc2a.bench.hpam import bench_hpam as measure

    return measure(args)


def bench_data(args: argparse.Namespace) -> Report:
    """Shard writing and the episode loaders against the decode floor of the same records (data.py)."""
    from jc2a.bench.data import bench_data as measure

    return measure(args)


def bench_train(args: argparse.Namespace) -> Report:
    """A training step against the backbone floor (ResNet50, 473, batch 4, 1-shot), by stage; the loop (train.py)."""
    from jc2a.bench.train import bench_train as measure

    return measure(args)


def bench_eval(args: argparse.Namespace) -> Report:
    """Evaluation episodes/s at the original resolution against the backbone floor (eval.py)."""
    from jc2a.bench.eval import bench_eval as measure

    return measure(args)


def bench_memory(args: argparse.Namespace) -> Report:
    """Peak memory of the default training step (batch 4, 473, fp16) against an 11 GB GPU (train.py)."""
    from jc2a.bench.train import bench_memory as measure

    return measure(args)


def bench_gpu(args: argparse.Namespace) -> Report:
    """The prepared CUDA checks, each skipped without CUDA (gpu.py)."""
    from jc2a.bench.gpu import bench_gpu as measure

    return measure(args)


# --------------------------------------------------------------------------- sections and command

# name -> section, a function `(args) -> Report`. A section measures its variants side by side in the same
# process and judges their ratios against targets, so a slower or busier machine moves both sides.
#   jc2a bench                                  # every section
#   jc2a bench hpam --repeats 15 --out hpam.md  # one section, tables also written as markdown
SECTIONS: Dict[str, Callable[[argparse.Namespace], Report]] = {
    "hpam": bench_hpam,
    "data": bench_data,
    "train": bench_train,
    "eval": bench_eval,
    "memory": bench_memory,
    "gpu": bench_gpu,
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("section", nargs="?", default="all", choices=["all", *SECTIONS], help="section to run")
    parser.add_argument("--repeats", type=int, default=15, help="timed repeats per variant (median reported)")
    parser.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda, cuda:1")
    parser.add_argument("--out", type=Path, default=None, help="also write the tables as markdown to this file")


def run(args: argparse.Namespace) -> int:
    """Run the chosen sections, print their tables; exit status 1 if any target was missed."""
    from jc2a.bench.harness import Report, machine

    if args.repeats < 1:
        raise UserError(f"--repeats must be >= 1, got {args.repeats}")
    names = list(SECTIONS) if args.section == "all" else [args.section]
    reports = []
    for name in names:
        report = SECTIONS[name](args)
        reports.append(report)
        print(report.text() + "\n", flush=True)
    if len(reports) > 1:  # one table of every ratio this run measured
        summary = Report("Summary: ratios measured in this run", [["measure", "ratio", "target", "verdict"]])
        for report in reports:
            summary.table += report.ratios
        summary.notes.append(machine())
        reports.append(summary)
        print(summary.text() + "\n", flush=True)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("\n".join(report.markdown() for report in reports))
        print(f"wrote {args.out}")
    failed = [r.title for r in reports if not r.passed]
    print("all targets met" if not failed else "targets missed: " + "; ".join(failed))
    return 1 if failed else 0
