"""Benchmarks that print ratios measured in one run: `jc2a bench [SECTION]`, one section per subsystem."""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import platform
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterator, List

import torch

from jc2a.model.hpam import HPAM

__all__ = ["SECTIONS", "Report", "add_arguments", "run"]


@dataclass
class Report:
    """What a section measured: a table (header row first), notes, and whether every target was met."""

    title: str
    table: List[List[str]]
    notes: List[str] = field(default_factory=list)
    passed: bool = True
    ratios: List[List[str]] = field(default_factory=list)  # [measure, ratio, target, verdict] for the summary

    def markdown(self) -> str:
        header, *rows = self.table
        lines = [f"## {self.title}", ""]
        lines.append("| " + " | ".join(header) + " |")
        lines.append("|" + "|".join("---" for _ in header) + "|")
        lines += ["| " + " | ".join(row) + " |" for row in rows]
        lines.append("")
        lines += [f"- {note}" for note in self.notes]
        return "\n".join(lines) + "\n"

    def text(self) -> str:
        widths = [max(len(row[i]) for row in self.table) for i in range(len(self.table[0]))]
        lines = [self.title, "=" * len(self.title)]
        for n, row in enumerate(self.table):
            lines.append("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
            if n == 0:
                lines.append("  ".join("-" * width for width in widths))
        lines += [f"* {note}" for note in self.notes]
        return "\n".join(lines)


# --------------------------------------------------------------------------- measuring


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(fns: Dict[str, Callable[[], object]], repeats: int, device: torch.device) -> Dict[str, float]:
    """Median wall time (s) of each function: two warm-up calls each, then `repeats` rounds that call every
    function once, in alternating order, so drifts in machine load fall on all of them alike."""
    for fn in fns.values():
        for _ in range(2):
            fn()
    times: Dict[str, List[float]] = {name: [] for name in fns}
    names = list(fns)
    for r in range(repeats):
        for name in names if r % 2 == 0 else names[::-1]:
            _sync(device)
            start = time.perf_counter()
            fns[name]()
            _sync(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Silence file descriptor 2 (the profiler's C++ start/stop chatter)."""
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def peak_memory(fn: Callable[[], object], device: torch.device) -> int:
    """Peak bytes of tensor memory allocated by one call of `fn`, above what was live before it.

    CUDA: `torch.cuda.max_memory_allocated` after a reset, minus the allocation before the call. CPU: the
    allocation and free events that `torch.profiler` records from PyTorch's CPU allocator during the call,
    replayed in time order; the peak of the running sum of live bytes.
    """
    if device.type == "cuda":
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        _sync(device)
        return torch.cuda.max_memory_allocated(device) - base
    activities = [torch.profiler.ProfilerActivity.CPU]
    with _quiet_stderr(), torch.profiler.profile(activities=activities, profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


MEMORY_METHOD = {
    "cuda": "peak memory: `torch.cuda.max_memory_allocated` after a reset, minus what was allocated before the call",
    "cpu": (
        "peak memory: the peak of live tensor bytes during one call, replaying the allocation and free events "
        "that `torch.profiler` (profile_memory=True) records from PyTorch's CPU allocator"
    ),
}


def _environment(device: torch.device, repeats: int) -> str:
    if device.type == "cuda":
        where = torch.cuda.get_device_name(device)
    else:
        where = f"CPU ({platform.processor() or platform.machine()}), {torch.get_num_threads()} threads"
    return f"{where}, torch {torch.__version__}, median of {repeats} interleaved repeats after 2 warm-ups"


def _machine() -> str:
    """The machine in one line: CPU, cores, memory, GPU."""
    memory = ""
    try:
        memory = f", {os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB"
    except (ValueError, OSError, AttributeError):
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores{memory}, {gpu}; "
        f"Python {platform.python_version()}, torch {torch.__version__}"
    )


def _load() -> float:
    """One-minute load average (0 where the platform has none)."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return 0.0


def _busy_note(load: float, effect: str = "CPU timings suffer") -> str:
    """The load before a measurement (the benchmark's own threads raise it later), with a warning when other
    work was sharing the CPU cores."""
    cores = os.cpu_count() or 1
    note = f"load average {load:.2f} on {cores} cores before the run"
    if load > 0.5 * cores:
        note += f" -- WARNING: the machine was busy; {effect}"
    return note


# --------------------------------------------------------------------------- section: hpam

HPAM_SIZES = ((473, 60), (641, 81))  # input size -> finest bin, (size - 1) / 8 + 1
HPAM_FORMS = (("ours", "linear_relu"), ("NA", "softmax"))
HPAM_SPEED_TARGET = {60: 6.0, 81: 10.0}  # NA time / ours time, at least
HPAM_MEMORY_TARGET = {60: 6.0}  # NA peak / ours peak, at least


def _hpam_inputs(b: int, dim: int, batch: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """Query feature, masked support `[B, C, b, b]` and the support mask `[B, 1, b, b]` (a disc on a third)."""
    g = torch.Generator().manual_seed(0)
    f_q = torch.randn(batch, dim, b, b, generator=g)
    f_s = torch.randn(batch, dim, b, b, generator=g)
    yy, xx = torch.meshgrid(torch.arange(b), torch.arange(b), indexing="ij")
    centres = torch.rand(batch, 2, generator=g) * b * 0.4 + b * 0.3
    dist2 = (yy[None] - centres[:, 0, None, None]) ** 2 + (xx[None] - centres[:, 1, None, None]) ** 2
    mask = (dist2 < (0.33 * b) ** 2).float()[:, None]
    return f_q.to(device), (f_s * mask).to(device), mask.to(device)  # HPAM takes the masked support


def bench_hpam(args: argparse.Namespace) -> Report:
    """One HPAM level at the finest bin (C = 256, batch 4, projections included, P2P + P2B at k = 60, m = 4):
    ours (linear_relu) against normal attention (softmax), at 60x60 (473 input) and 81x81 (641 input)."""
    device, dim, batch, topk, block = _device(args.device), 256, 4, 60, 4
    rows = [["size", "form", "time ms", "peak MiB", "speed NA/ours", "memory NA/ours", "targets"]]
    notes, passed, ratios, summary = [], True, {}, []
    load_before = _load()
    for size, b in HPAM_SIZES:
        f_q, f_s, mask = _hpam_inputs(b, dim, batch, device)
        fns = {}
        for label, form in HPAM_FORMS:
            torch.manual_seed(0)
            hpam = HPAM(dim, [b], [topk], [block], attention=form).to(device).eval()
            fns[label] = functools.partial(hpam, 0, f_q, f_s, mask)
        with torch.inference_mode():
            seconds = time_interleaved(fns, args.repeats, device)
            peaks = {label: peak_memory(fn, device) for label, fn in fns.items()}
        speed, memory = seconds["NA"] / seconds["ours"], peaks["NA"] / peaks["ours"]
        ratios[b] = (speed, memory)
        verdicts = []
        if b in HPAM_SPEED_TARGET:
            ok = speed >= HPAM_SPEED_TARGET[b]
            passed &= ok
            verdicts.append(f"speed >= {HPAM_SPEED_TARGET[b]:g}x: {'PASS' if ok else 'FAIL'}")
        if b in HPAM_MEMORY_TARGET:
            ok = memory >= HPAM_MEMORY_TARGET[b]
            passed &= ok
            verdicts.append(f"memory >= {HPAM_MEMORY_TARGET[b]:g}x: {'PASS' if ok else 'FAIL'}")
        for label, form in HPAM_FORMS:
            is_na = label == "NA"
            rows.append(
                [
                    f"{b}x{b} ({size} input)",
                    f"{label} ({form})",
                    f"{seconds[label] * 1e3:.1f}",
                    f"{peaks[label] / 2**20:.1f}",
                    f"{speed:.2f}x" if is_na else "",
                    f"{memory:.2f}x" if is_na else "",
                    "; ".join(verdicts) if is_na else "",
                ]
            )
    for b, (speed, memory) in ratios.items():
        for what, value, targets in (("speed", speed, HPAM_SPEED_TARGET), ("memory", memory, HPAM_MEMORY_TARGET)):
            target = targets.get(b)
            verdict = "" if target is None else ("PASS" if value >= target else "FAIL")
            summary.append(
                [f"HPAM {what} NA/ours at {b}x{b}", f"{value:.2f}x", f">= {target:g}x" if target else "", verdict]
            )
    (s60, m60), (s81, m81) = ratios[60], ratios[81]
    grow = s81 > s60 and m81 > m60
    passed &= grow
    notes.append(
        f"ratios grow from 60x60 to 81x81: speed {s60:.2f}x -> {s81:.2f}x, memory {m60:.2f}x -> {m81:.2f}x: "
        + ("PASS" if grow else "FAIL")
    )
    notes.append(
        f"one HPAM level, C={dim}, batch {batch}, W_Q/W_K/W_V projections included, P2P + P2B (k={topk}, m={block}), "
        "merge add, position embeddings on, `torch.inference_mode()`"
    )
    notes.append(_environment(device, args.repeats))
    if device.type == "cpu":
        notes.append(_busy_note(load_before, "CPU timings suffer, ours most (many short parallel ops)"))
    notes.append(MEMORY_METHOD[device.type])
    return Report("HPAM: linear (ours) vs normal attention", rows, notes, passed, summary)


def bench_data(args: argparse.Namespace) -> Report:
    """Shard writing (images/s) and the episode loaders (episodes/s; 1- and 5-shot, 0 and 2 workers) on 560-px toy
    images at S=473, against the decode floor (JPEG + PNG decoding of the same records)."""
    import logging

    from jc2a.data.bench import bench_data as measure
    from jc2a.data.bench import judge

    logging.getLogger("jc2a.data").setLevel(logging.ERROR)  # toy classes without enough 5-shot images
    load = _load()
    measured = measure()
    rows = [["what", "setting", "throughput"]]
    rows += [[r["what"], r["setting"], f"{r['value']:.1f} {r['unit']}"] for r in measured]
    verdicts = judge(measured)
    rows += [
        [what, "ratio", f"{ratio:.2f}x ({target}: {'PASS' if ok else 'FAIL'})"] for what, ratio, target, ok in verdicts
    ]
    summary = [
        [f"data: {what}", f"{ratio:.2f}x", target, "PASS" if ok else "FAIL"] for what, ratio, target, ok in verdicts
    ]
    notes = [
        "toy COCO (320 + 320 images, 560 px) written as shards, then streamed at S=473 in batches of 4; loader "
        "rates are steady-state (the batches workers prefetch at start-up are not timed); the decode floor is "
        "1 / (the time to decode one record's JPEG and label PNG x (1 + K)), in one process",
        f"CPU ({platform.processor() or platform.machine()}), {os.cpu_count()} cores, one pass per setting; "
        + _busy_note(load),
    ]
    return Report("Data: shard writing and episode loaders", rows, notes, all(v[3] for v in verdicts), summary)


def bench_train(args: argparse.Namespace) -> Report:
    """A training step against the backbone floor (ResNet50, 473, batch 4, 1-shot), split by stage; the loop."""
    from jc2a.runs.bench_train import bench_train as measure

    return measure(args)


def bench_eval(args: argparse.Namespace) -> Report:
    """Evaluation episodes/s at the original resolution against the backbone floor (jc2a/runs/bench_eval.py)."""
    from jc2a.runs.bench_eval import bench_eval as measure

    return measure(args)


def bench_memory(args: argparse.Namespace) -> Report:
    """Peak memory of the default training step (batch 4, 473, fp16) against an 11 GB GPU (jc2a/runs/bench_train.py)."""
    from jc2a.runs.bench_train import bench_memory as measure

    return measure(args)


def bench_gpu(args: argparse.Namespace) -> Report:
    """The prepared CUDA checks, each skipped without CUDA (jc2a/runs/bench_gpu.py)."""
    from jc2a.runs.bench_gpu import bench_gpu as measure

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
    if args.repeats < 1:
        raise ValueError(f"--repeats must be >= 1, got {args.repeats}")
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
        summary.notes.append(_machine())
        reports.append(summary)
        print(summary.text() + "\n", flush=True)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("\n".join(report.markdown() for report in reports))
        print(f"wrote {args.out}")
    failed = [r.title for r in reports if not r.passed]
    print("all targets met" if not failed else "targets missed: " + "; ".join(failed))
    return 1 if failed else 0
