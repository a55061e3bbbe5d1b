"""The measuring tools of `jc2a bench`: the report a section returns, interleaved timing, peak memory, the machine."""

from __future__ import annotations

import contextlib
import os
import platform
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, List

import torch

__all__ = [
    "MEMORY_METHOD",
    "Report",
    "busy_note",
    "device_of",
    "environment",
    "load_average",
    "machine",
    "peak_memory",
    "quiet_stderr",
    "sync",
    "time_interleaved",
]


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


def device_of(name: str) -> torch.device:
    """The device `--device NAME` names: `auto` is cuda where available, else cpu."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA); nothing on a CPU."""
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
            sync(device)
            start = time.perf_counter()
            fns[name]()
            sync(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


@contextlib.contextmanager
def quiet_stderr() -> Iterator[None]:
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
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        sync(device)
        return torch.cuda.max_memory_allocated(device) - base
    activities = [torch.profiler.ProfilerActivity.CPU]
    with quiet_stderr(), torch.profiler.profile(activities=activities, profile_memory=True) as prof:
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


def environment(device: torch.device, repeats: int) -> str:
    """Where and how a section measured, in one line: the device, torch, the repeats."""
    if device.type == "cuda":
        where = torch.cuda.get_device_name(device)
    else:
        where = f"CPU ({platform.processor() or platform.machine()}), {torch.get_num_threads()} threads"
    return f"{where}, torch {torch.__version__}, median of {repeats} interleaved repeats after 2 warm-ups"


def machine() -> str:
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


def load_average() -> float:
    """One-minute load average (0 where the platform has none)."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return 0.0


def busy_note(load: float, effect: str = "CPU timings suffer") -> str:
    """The load before a measurement (the benchmark's own threads raise it later), with a warning when other
    work was sharing the CPU cores."""
    cores = os.cpu_count() or 1
    note = f"load average {load:.2f} on {cores} cores before the run"
    if load > 0.5 * cores:
        note += f" -- WARNING: the machine was busy; {effect}"
    return note
