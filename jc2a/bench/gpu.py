"""`jc2a bench gpu`: one prepared command for a CUDA machine: fp16 step, loop, eval, memory, DeepSpeed, NCCL bank.

    jc2a bench gpu          # at most ~5 minutes on a GPU; on a machine without CUDA every item says "skipped: ..."

Items, each a row of the table: (i) the fp16 training step against the backbone floor (`measure_step`); (ii) the
whole `jc2a train` loop's episodes/s with 2 loader workers on generated toy shards, against the step alone;
(iii) evaluation episodes/s at the original size (`jc2a bench eval`'s measurement); (iv) the default training
step's peak memory (`torch.cuda.max_memory_allocated`) against 11 GB; (v) 2 DeepSpeed ZeRO-2 steps through
`accelerate launch`; (vi) with 2 or more GPUs, a 2-process NCCL bank pass against the 1-process bank. Every
subprocess has a timeout cut to what is left of the 5 minutes; the last line is the total wall time.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Callable, Optional

import torch

from jc2a.bench.harness import Report, device_of, machine

ROOT = Path(__file__).resolve().parents[2]
BUDGET_S = 290.0  # the whole command, on a GPU, under 5 minutes
RESERVE_S = 10.0  # kept back from every subprocess's timeout for what follows it
LOOP_STEPS = 40  # (ii): 8 windows of 5 steps, the first not counted
PRECISION = "fp16"  # (ii), (v): the 2080 Ti's training precision
BANK_TOLERANCE = 1e-4  # (vi): max |sums_2 - sums_1| / max |sums_1|, float32 features with TF32 off
# A share of the images lost or counted twice by a rank moves the sums by about 1 / (instances per class) ~ 1e-2 or
# more; float32 features of the same image in another batch differ by ~1e-6 relative (summation order), ~1e-3 with
# TF32, which is why both bank runs set NVIDIA_TF32_OVERRIDE=0.

ITEMS = (
    "(i) fp16 training step / backbone floor",
    "(ii) training loop, 2 workers",
    "(iii) evaluation at the original size",
    "(iv) peak memory, default step",
    "(v) DeepSpeed ZeRO-2, 2 steps",
    "(vi) NCCL bank, 2 processes vs 1",
)


class _Clock:
    """What is left of the command's budget; the timeout a subprocess may have."""

    def __init__(self, budget: float) -> None:
        self.start, self.budget = time.monotonic(), budget

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def timeout(self, cap: float) -> float:
        return max(0.0, min(cap, self.budget - self.elapsed() - RESERVE_S))


class _Skip(Exception):
    """An item that cannot run here; its message is the reason."""


class _Fail(Exception):
    """An item that ran and missed; its message says how."""


def _config(name: str) -> Path:
    """A shipped config file: in the package's `configs/` where it has one, else the checkout's `configs/`."""
    packaged = Path(__file__).resolve().parents[1] / "configs" / name
    return packaged if packaged.is_file() else ROOT / "configs" / name


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(cmd: list, clock: _Clock, cap: float, env: Optional[dict] = None) -> subprocess.CompletedProcess:
    """`cmd` in the checkout with a timeout of at most `cap` s (less if the budget is nearly spent); a failure is a
    `_Fail` naming the exit status, its stderr's tail printed to stderr."""
    timeout = clock.timeout(cap)
    if timeout < 20:
        raise _Skip(f"out of time: {clock.elapsed():.0f} s of the {BUDGET_S:.0f} s budget spent")
    try:
        proc = subprocess.run(
            [str(c) for c in cmd], capture_output=True, text=True, timeout=timeout, cwd=ROOT,
            env={**os.environ, **(env or {})},
        )  # fmt: skip
    except subprocess.TimeoutExpired as exc:
        tail = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else exc.stderr or ""
        print("\n".join(tail.splitlines()[-20:]), file=sys.stderr)
        raise _Fail(f"timed out after {timeout:.0f} s") from None
    if proc.returncode != 0:
        print(f"--- {' '.join(map(str, cmd[:6]))} ...: stderr tail", file=sys.stderr)
        print("\n".join(proc.stderr.splitlines()[-20:]), file=sys.stderr)
        raise _Fail(f"exit status {proc.returncode} (its stderr's tail is printed above)")
    return proc


class _Shards:
    """Toy COCO shards (560 px images), written on first use in a temporary folder."""

    def __init__(self, work: Path) -> None:
        self.work, self.path = work, None

    def get(self) -> Path:
        if self.path is None:
            from jc2a.data.coco import CocoSource
            from jc2a.data.shards import write_shards
            from jc2a.data.toy import write_toy_coco

            write_toy_coco(self.work / "toy", train_images=120, val_images=40, size=560, seed=0)
            for split in ("train", "val"):
                src = CocoSource(
                    self.work / "toy" / f"{split}2014", self.work / "toy/annotations" / f"instances_{split}2014.json"
                )
                write_shards(src, self.work / "shards", split, "coco", src.class_names, progress=False)
            self.path = self.work / "shards"
        return self.path


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]


# --------------------------------------------------------------------------- the items


def _step(ctx: dict) -> str:
    from jc2a.bench.train import STEP_TARGET, measure_step

    s = measure_step("resnet50", 473, 4, ctx["repeats"], ctx["device"], "fp16")
    ctx["step_s"] = s["step"]
    ratio = s["step"] / s["floor"]
    verdict = "PASS" if ratio <= STEP_TARGET else "FAIL"
    text = (f"{ratio:.2f}x (<= {STEP_TARGET}x: {verdict}); step {s['step'] * 1e3:.0f} ms = {4 / s['step']:.1f} "
            f"episodes/s, floor {s['floor'] * 1e3:.0f} ms (ResNet50 473², batch 4, 1-shot, fp16)")  # fmt: skip
    if verdict == "FAIL":
        raise _Fail(text)
    return text


def _loop(ctx: dict) -> str:
    run = ctx["work"] / "loop"
    cmd = [sys.executable, "-m", "jc2a", "train", "--no-progress", "--config", _config("base.yaml"),
           f"data.shards={ctx['shards'].get()}", f"train.output_dir={run}", "model.backbone.pretrained=false",
           "train.tracking=none", f"train.max_steps={LOOP_STEPS}", "train.log_every=5", "train.save_every=0",
           "train.val_every=0", "train.val_episodes=4", "data.eval_episodes=8", "data.num_workers=2",
           f"train.mixed_precision={PRECISION}"]  # fmt: skip
    _run(cmd, ctx["clock"], 150)
    rates = [m["episodes_per_s"] for m in _metrics(run) if "episodes_per_s" in m][1:]  # the first window warms up
    if not rates:
        raise _Fail(f"no episodes/s logged in {run / 'metrics.jsonl'}")
    loop = sum(rates) / len(rates)
    text = f"{loop:.1f} episodes/s (`jc2a train`, default config, {PRECISION}, {LOOP_STEPS} steps, 560-px toy shards)"
    if "step_s" in ctx:
        text += f"; {loop / (4 / ctx['step_s']):.2f}x the step alone (item i)"
    return text


def _eval(ctx: dict) -> str:
    from jc2a.bench.eval import bench_eval

    report = bench_eval(argparse.Namespace(device=str(ctx["device"]), repeats=min(ctx["repeats"], 5)))
    header, *rows = report.table
    shots, precision, rate = header.index("shots"), header.index("precision"), header.index("episodes/s")
    ratio = header.index("ratio")  # the first: against the backbone's four stages on the same canvases
    return "; ".join(f"{r[shots]}-shot {r[precision]}: {r[rate]} episodes/s ({r[ratio]} floor)" for r in rows)


def _memory(ctx: dict) -> str:
    from jc2a.bench.train import MEMORY_BUDGET, measure_memory

    m = measure_memory(ctx["device"])
    gib = 2**30
    ok = m["total"] <= MEMORY_BUDGET
    text = (f"{m['total'] / gib:.2f} GiB allocated at the peak (max_memory_allocated), {m['reserved'] / gib:.2f} "
            f"GiB reserved, against 11e9 bytes = {MEMORY_BUDGET / gib:.2f} GiB: margin "
            f"{(MEMORY_BUDGET - m['total']) / gib:.2f} GiB, {'PASS' if ok else 'FAIL'} (batch 4, 473², "
            "fp16)")  # fmt: skip
    if not ok:
        raise _Fail(text)
    return text


def _deepspeed(ctx: dict) -> str:
    missing = [name for name in ("deepspeed", "transformers") if importlib.util.find_spec(name) is None]
    if missing:
        raise _Skip(f"{' and '.join(missing)} not installed (pip install -e '.[deepspeed]')")
    run, n = ctx["work"] / "deepspeed", min(2, torch.cuda.device_count())
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           _config("accelerate/deepspeed_zero2.yaml"), "--num_processes", n, "--main_process_port", _free_port(),
           "--mixed_precision", PRECISION,
           "-m", "jc2a", "train", "--no-progress", "--config", _config("toy.yaml"),
           f"data.shards={ctx['shards'].get()}", f"train.output_dir={run}", "train.max_steps=2", "train.log_every=1",
           "train.tracking=none", "train.val_every=0", "train.val_episodes=2", "data.eval_episodes=4",
           f"train.mixed_precision={PRECISION}", "model.backbone.frozen=true"]  # fmt: skip
    _run(cmd, ctx["clock"], 150)
    steps = json.loads((run / "train_summary.json").read_text())["step"]
    losses = [m["loss"] for m in _metrics(run) if "loss" in m]
    text = f"{n} process(es), {steps} steps, losses {', '.join(f'{x:.4f}' for x in losses)} (toy config, {PRECISION})"
    if steps != 2 or len(losses) != 2 or not all(x == x and abs(x) != float("inf") for x in losses):
        raise _Fail(text)
    return "PASS: " + text


def _bank(ctx: dict) -> str:
    if torch.cuda.device_count() < 2:
        raise _Skip(f"needs 2 GPUs, {torch.cuda.device_count()} visible")
    from safetensors.torch import load_file

    args = ["--no-progress", "--config", _config("toy.yaml"), f"data.shards={ctx['shards'].get()}",
            "model.backbone.frozen=true"]  # fmt: skip
    one, two, env = ctx["work"] / "one.safetensors", ctx["work"] / "two.safetensors", {"NVIDIA_TF32_OVERRIDE": "0"}
    _run([sys.executable, "-m", "jc2a", "bank", "--out", one, *args], ctx["clock"], 90, env)
    ddp = _config("accelerate/ddp_1node.yaml")
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", ddp, "--num_processes", 2,
              "--main_process_port", _free_port()]  # fmt: skip
    _run([*launch, "-m", "jc2a", "bank", "--out", two, *args], ctx["clock"], 90, env)
    a, b = load_file(str(one)), load_file(str(two))
    if not torch.equal(a["counts"], b["counts"]):
        raise _Fail(f"instance counts differ: {int(a['counts'].sum())} (1 process) vs {int(b['counts'].sum())}")
    rel = float((a["sums"] - b["sums"]).abs().max() / a["sums"].abs().max().clamp_min(1e-30))
    text = f"{int(a['counts'].sum())} instances in both; max |sums_2 - sums_1| / max |sums_1| = {rel:.1e}"
    if rel > BANK_TOLERANCE:
        raise _Fail(f"{text} > {BANK_TOLERANCE:g}")
    return f"PASS: {text} (<= {BANK_TOLERANCE:g})"


RUNNERS: tuple[Callable[[dict], str], ...] = (_step, _loop, _eval, _memory, _deepspeed, _bank)


# --------------------------------------------------------------------------- the section


def bench_gpu(args: argparse.Namespace) -> Report:
    """Section `gpu` of `jc2a bench`: the six items on the CUDA device, each "skipped: <reason>" where it cannot
    run; passed unless an item that ran failed."""
    clock = _Clock(BUDGET_S)
    device = device_of(args.device)
    reason = None  # why nothing can run here
    if not torch.cuda.is_available():
        reason = "no CUDA device (torch.cuda.is_available() is False)"
    elif device.type != "cuda":
        reason = f"--device {args.device} is not a CUDA device"
    rows, passed = [["item", "result"]], True
    with tempfile.TemporaryDirectory(prefix="jc2a-bench-gpu-") as tmp:
        ctx = {"device": device, "repeats": max(2, min(args.repeats, 10)), "clock": clock, "work": Path(tmp)}
        ctx["shards"] = _Shards(Path(tmp))
        for label, runner in zip(ITEMS, RUNNERS):
            started = time.monotonic()
            try:
                if reason:
                    raise _Skip(reason)
                print(f"bench gpu: {label} ...", file=sys.stderr, flush=True)
                result = runner(ctx)
            except _Skip as exc:
                result = f"skipped: {exc}"
            except _Fail as exc:
                result, passed = f"FAIL: {exc}", False
            except Exception as exc:  # an item's error is its row; the others still run
                traceback.print_exc()
                result, passed = f"FAIL: {type(exc).__name__}: {exc}", False
            if not result.startswith("skipped"):
                result += f" [{time.monotonic() - started:.0f} s]"
            rows.append([label, result])
            gc.collect()  # what an item built is gone before the next one (iv counts what is allocated)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    notes = [
        "(i) `measure_step` of `jc2a bench train` at fp16; (ii) `jc2a train` (configs/base.yaml, random init, 2 "
        f"workers, {LOOP_STEPS} steps, the CKMM bank built first) on toy shards, episodes/s per logged window after "
        "the first; (iii) `jc2a bench eval`'s measurement (fp32 and fp16 autocast, 1 and 5 shots); (iv) "
        "`measure_memory` of `jc2a bench memory`; (v) `accelerate launch --config_file "
        "configs/accelerate/deepspeed_zero2.yaml` of `jc2a train` (toy config, 2 steps); (vi) `jc2a bank` in 1 "
        "process and through `accelerate launch --config_file configs/accelerate/ddp_1node.yaml --num_processes 2`",
        machine(),
        f"total wall time {clock.elapsed():.1f} s (budget {BUDGET_S:.0f} s; subprocess timeouts cut to fit)",
    ]
    return Report("GPU: fp16 step, loop, eval, memory, DeepSpeed, NCCL bank", rows, notes, passed)
