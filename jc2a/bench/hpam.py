"""`jc2a bench hpam`: one HPAM level, linear attention (ours) against normal attention, time and peak memory."""

from __future__ import annotations

import argparse
import functools

import torch

from jc2a.bench.harness import (
    MEMORY_METHOD,
    Report,
    busy_note,
    device_of,
    environment,
    load_average,
    peak_memory,
    time_interleaved,
)
from jc2a.model.hpam import HPAM

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
    device, dim, batch, topk, block = device_of(args.device), 256, 4, 60, 4
    rows = [["size", "form", "time ms", "peak MiB", "speed NA/ours", "memory NA/ours", "targets"]]
    notes, passed, ratios, summary = [], True, {}, []
    load_before = load_average()
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
    notes.append(environment(device, args.repeats))
    if device.type == "cpu":
        notes.append(busy_note(load_before, "CPU timings suffer, ours most (many short parallel ops)"))
    notes.append(MEMORY_METHOD[device.type])
    return Report("HPAM: linear (ours) vs normal attention", rows, notes, passed, summary)
