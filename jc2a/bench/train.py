"""`jc2a bench train`: a training step against the frozen-backbone floor, split by stage; the whole loop's rate;
`jc2a bench memory`: the default training step's peak memory against an 11 GB GPU."""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from jc2a.bench.harness import (
    MEMORY_METHOD,
    Report,
    busy_note,
    device_of,
    environment,
    load_average,
    peak_memory,
    quiet_stderr,
    time_interleaved,
)

STEP_TARGET = 1.2  # training step / backbone forward of the same images, at most (CPU)
LOOP_TARGET = 0.9  # whole loop episodes/s / step-only episodes/s, at least
# The RTX 2080 Ti's 11 GB, as decimal bytes (10.24 GiB): below what CUDA reports for the card (11554717696 bytes,
# 11019 MiB; newer nvidia-smi prints the nominal 11264 MiB), leaving ~0.5 GB for the CUDA context and libraries.
MEMORY_BUDGET = 11 * 10**9
ROOT = Path(__file__).resolve().parents[2]


def _model(name: str, size: int, device: torch.device):
    """JC2A with a randomly initialised `name` backbone at input `size`, a random CKMM bank, in train mode."""
    from jc2a.bench.eval import fill_bank_at_random
    from jc2a.config import load_config
    from jc2a.model import build_model

    torch.manual_seed(0)
    cfg = load_config(
        None, [f"model.backbone.name={name}", "model.backbone.pretrained=false", f"data.image_size={size}"]
    )
    return fill_bank_at_random(build_model(cfg)).to(device).train(), cfg


def _batch(batch: int, size: int, shot: int, device: torch.device) -> dict:
    g = torch.Generator().manual_seed(0)
    masks = torch.zeros(batch, shot, size, size, dtype=torch.uint8)
    masks[..., size // 4 : 3 * size // 4, size // 3 : 2 * size // 3] = 1
    qmask = torch.zeros(batch, size, size, dtype=torch.uint8)
    qmask[:, size // 3 : 2 * size // 3, size // 4 : 3 * size // 4] = 1
    return {
        "query_img": torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, generator=g).to(device),
        "support_imgs": torch.randint(0, 256, (batch, shot, 3, size, size), dtype=torch.uint8, generator=g).to(device),
        "support_masks": masks.to(device),
        "query_mask": qmask.to(device),
    }


def channels_last_batch(data: dict) -> dict:
    """`data` (a `_batch`) with its images in channels_last, the supports `[B, K, 3, H, W]` laid out so that the
    model's `flatten(0, 1)` gives channels_last images: fp16 convolutions on a CPU without AVX512-FP16 run ~10x
    faster so (model.to(memory_format=torch.channels_last) too)."""
    out = dict(data)
    out["query_img"] = data["query_img"].contiguous(memory_format=torch.channels_last)
    s = data["support_imgs"]
    out["support_imgs"] = s.flatten(0, 1).contiguous(memory_format=torch.channels_last).unflatten(0, s.shape[:2])
    return out


def measure_step(name: str, size: int, batch: int, repeats: int, device: torch.device, precision: str) -> dict:
    """Seconds of: the floor (the backbone's forward of the batch's query and support images, no grad), a whole
    training step (forward, loss, backward, SGD step), and the forward split by stage (profiler)."""
    model, cfg = _model(name, size, device)
    data = _batch(batch, size, 1, device)
    images = torch.cat([data["query_img"], data["support_imgs"].flatten(0, 1)])
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=1e-4, momentum=0.9, weight_decay=1e-4)
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision)

    def autocast():
        return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)

    @torch.no_grad()
    def floor() -> None:
        with autocast():
            model.backbone(model.backbone.normalize(images))

    def step() -> None:
        with autocast():
            loss = model.loss(model(data["query_img"], data["support_imgs"], data["support_masks"]), data["query_mask"])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    seconds = time_interleaved({"floor": floor, "step": step}, repeats, device)
    seconds["stages"] = _stages(model, data, autocast, device)
    return seconds


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def measure_memory(device: torch.device, batch: int = 4, size: int = 473) -> dict:
    """Bytes of the default training step (ResNet50 frozen, random init, HPAM + CKMM with a random bank, 1-shot,
    fp16 autocast): forward, loss, backward, SGD step, measured by `jc2a.bench.harness.peak_memory` on one
    steady-state step (the momentum buffers made beforehand by a step on zero gradients, as every step after the
    first finds them).

    Returns the bytes live before the step (`weights`: the model's parameters and buffers, backbone and CKMM bank
    included; `optimizer`; `batch`), `step_peak` (the peak above them during the step), `total`, and on CUDA
    `reserved` (the caching allocator's peak). On a CPU the model and images are channels_last (speed only).
    """
    model, _ = _model("resnet50", size, device)
    data = _batch(batch, size, 1, device)
    if device.type == "cpu":
        model.to(memory_format=torch.channels_last)
        data = channels_last_batch(data)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=1e-4, momentum=0.9, weight_decay=1e-4)
    for p in params:
        p.grad = torch.zeros_like(p)
    opt.step()
    opt.zero_grad(set_to_none=True)

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.float16):
            loss = model.loss(model(data["query_img"], data["support_imgs"], data["support_masks"]), data["query_mask"])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    out = {
        "weights": _nbytes([*model.parameters(), *model.buffers()]),
        "optimizer": _nbytes([v for s in opt.state.values() for v in s.values() if torch.is_tensor(v)]),
        "batch": _nbytes(data.values()),
    }
    before = torch.cuda.memory_allocated(device) if device.type == "cuda" else sum(out.values())
    start = time.perf_counter()
    out["step_peak"] = peak_memory(step, device)
    out["seconds"] = time.perf_counter() - start
    out["total"] = before + out["step_peak"]
    if device.type == "cuda":
        out["reserved"] = torch.cuda.max_memory_reserved(device)
    return out


def bench_memory(args: argparse.Namespace) -> Report:
    """Section `memory` of `jc2a bench`: the default training step's peak memory against the 2080 Ti's 11 GB."""
    device = device_of(args.device)
    m = measure_memory(device)
    gib = 2**30
    ok = m["total"] <= MEMORY_BUDGET
    rows = [["what", "GiB"]]
    rows += [
        ["weights and buffers (ResNet50, head, CKMM bank)", f"{m['weights'] / gib:.3f}"],
        ["optimizer state (SGD momentum of the head)", f"{m['optimizer'] / gib:.3f}"],
        ["batch (uint8 images and masks)", f"{m['batch'] / gib:.3f}"],
        ["step peak above those (activations, gradients, casts, scratch)", f"{m['step_peak'] / gib:.3f}"],
        ["total", f"{m['total'] / gib:.3f}"],
    ]
    if "reserved" in m:
        rows.append(["CUDA caching allocator, peak reserved", f"{m['reserved'] / gib:.3f}"])
    margin = MEMORY_BUDGET - m["total"]
    rows.append(["budget: 11 GB = 11e9 bytes (RTX 2080 Ti)", f"{MEMORY_BUDGET / gib:.2f}"])
    rows.append(["margin", f"{margin / gib:.2f} ({m['total'] / MEMORY_BUDGET:.1%} used: {'PASS' if ok else 'FAIL'})"])
    where = "CUDA" if device.type == "cuda" else "CPU fp16 autocast, channels_last"
    notes = [
        f"the default training step: ResNet50 frozen (random init), 473², batch 4, 1-shot, HPAM + CKMM (random "
        f"bank), fp16 autocast, forward + loss + backward + SGD (momentum) step; {where}; one step, "
        f"{m['seconds']:.0f} s",
        MEMORY_METHOD[device.type],
        "the total counts the weights themselves (the frozen backbone's, fp32, ~90 MiB, and the head's), the head's "
        "gradients and momentum buffers, and the fp16 copies of the weights autocast makes during the step",
    ]
    if device.type == "cpu":
        notes.append(
            "what a CPU estimate cannot see: cuDNN's workspaces (per algorithm; large with cudnn.benchmark), the CUDA "
            "caching allocator's rounding and fragmentation (its reserved memory, typically 10-30% above the "
            "allocated peak), the CUDA context and cuBLAS/cuDNN handles (~0.3-0.5 GB, outside PyTorch's counters), "
            "DDP's gradient buckets and NCCL buffers; and it counts what a GPU would not allocate: the im2col "
            "buffers of the CPU's fp16 convolutions. `jc2a bench gpu` measures it with torch.cuda.max_memory_allocated"
        )
    summary = [["memory: default training step / 11 GB", f"{m['total'] / MEMORY_BUDGET:.2f}x", "<= 1x",
                "PASS" if ok else "FAIL"]]  # fmt: skip
    return Report("Memory: the default training step against an 11 GB GPU", rows, notes, ok, summary)


def _stages(model, data: dict, autocast, device: torch.device) -> dict[str, float]:
    """Forward time per module family of one training step (torch.profiler, self + children of each top module)."""
    from torch.profiler import ProfilerActivity, profile, record_function

    families = {
        "backbone": model.backbone,
        "reductions": torch.nn.ModuleList([model.down_query, model.down_supp]),
        "HPAM": model.hpam,
        "decoder (MIA + FEM)": model.decoder,
    }
    handles = []
    for label, module in families.items():
        if module is None:
            continue
        scope = {}

        def pre(mod, inp, label=label, scope=scope):
            scope["ctx"] = record_function(f"stage::{label}")
            scope["ctx"].__enter__()

        def post(mod, inp, out, scope=scope):
            scope["ctx"].__exit__(None, None, None)

        handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    try:
        with quiet_stderr(), profile(activities=activities) as prof:
            with record_function("stage::forward"), autocast():
                out = model(data["query_img"], data["support_imgs"], data["support_masks"])
                loss = model.loss(out, data["query_mask"])
            with record_function("stage::backward + step"):
                loss.backward()
    finally:
        for h in handles:
            h.remove()
    model.zero_grad(set_to_none=True)
    out_times: dict[str, float] = {}
    for event in prof.key_averages():
        if event.key.startswith("stage::"):
            out_times[event.key[len("stage::") :]] = event.cpu_time_total / 1e6
    return out_times


def measure_loop(steps: int = 24, workers: int = 2) -> dict:
    """Episodes/s of the whole toy training loop (loader, step, logging, a checkpoint) and of the same model's
    step alone on one batch, measured in this process one after the other."""
    from jc2a.bench.eval import fill_bank_at_random
    from jc2a.config import load_config
    from jc2a.data.coco import CocoSource
    from jc2a.data.episodes import train_loader
    from jc2a.data.shards import write_shards
    from jc2a.data.toy import write_toy_coco
    from jc2a.runs.session import reset_accelerate_state
    from jc2a.runs.train import train

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        write_toy_coco(work / "toy", train_images=200, val_images=60, size=128, seed=0)
        for split in ("train", "val"):
            src = CocoSource(work / "toy" / f"{split}2014", work / "toy/annotations" / f"instances_{split}2014.json")
            write_shards(src, work / "shards", split, "coco", src.class_names, progress=False)
        overrides = [
            f"data.shards={work / 'shards'}", f"train.output_dir={work / 'run'}", "train.tracking=none",
            f"train.max_steps={steps}", f"train.save_every={steps // 2}", "train.val_every=0", "train.val_episodes=2",
            "data.eval_episodes=4", f"data.num_workers={workers}", "model.backbone.frozen=true", "train.log_every=4",
        ]  # fmt: skip
        cfg = load_config(ROOT / "configs/toy.yaml", overrides)
        train(cfg, progress=False)
        reset_accelerate_state()
        lines = [json.loads(x) for x in (work / "run/metrics.jsonl").read_text().splitlines()]
        rates = [m["episodes_per_s"] for m in lines if "episodes_per_s" in m][1:]  # the first window warms up
        loop = sum(rates) / len(rates)
        # the step alone, same model and batch size, one batch drawn once
        from jc2a.model import build_model

        torch.manual_seed(cfg.train.seed)
        model = fill_bank_at_random(build_model(cfg)).train()
        batch = next(iter(train_loader(cfg.data, cfg.train.seed, cfg.train.batch_size, model.backbone.mean, 0, 1)))
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.SGD(params, lr=cfg.train.lr, momentum=0.9)
        times = []
        for i in range(steps // 2 + 2):
            start = time.perf_counter()
            loss = model.loss(
                model(batch["query_img"], batch["support_imgs"], batch["support_masks"]), batch["query_mask"]
            )
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if i >= 2:
                times.append(time.perf_counter() - start)
        step = cfg.train.batch_size / (sorted(times)[len(times) // 2])
    return {"loop": loop, "step": step, "batch": cfg.train.batch_size, "workers": workers, "steps": steps}


def bench_train(args: argparse.Namespace) -> Report:
    """Section `train` of `jc2a bench`."""
    device = device_of(args.device)
    load = load_average()
    repeats = max(2, min(args.repeats, 3))
    rows = [["measure", "setting", "time / rate", "ratio", "target"]]
    summary: list[list[str]] = []
    passed = True
    precisions = ["no"] + (["fp16"] if device.type == "cuda" else [])
    notes = []
    for precision in precisions:
        s = measure_step("resnet50", 473, 4, repeats, device, precision)
        ratio = s["step"] / s["floor"]
        ok = ratio <= STEP_TARGET if device.type == "cpu" or precision == "fp16" else True
        passed &= ok
        tag = "fp32" if precision == "no" else precision
        rows.append(["backbone forward (floor)", f"ResNet50 473², 8 images, {tag}", f"{s['floor']:.2f} s", "1.00x", ""])
        verdict = f"<= {STEP_TARGET}x: {'PASS' if ok else 'FAIL'}"
        summary.append([f"train: step / backbone floor ({tag})", f"{ratio:.2f}x", f"<= {STEP_TARGET}x", verdict[-4:]])
        rows.append(
            ["training step", f"ResNet50 473², batch 4, 1-shot, {tag}", f"{s['step']:.2f} s", f"{ratio:.2f}x", verdict]
        )
        for stage, sec in s["stages"].items():
            rows.append([f"  stage: {stage}", "one profiled step", f"{sec:.2f} s", f"{sec / s['floor']:.2f}x", ""])
    for workers in (0, 2):  # the toy config's own setting (0 workers) is judged; 2 workers are reported
        loop = measure_loop(workers=workers)
        ratio = loop["loop"] / loop["step"]
        judged = workers == 0
        ok = ratio >= LOOP_TARGET
        passed &= ok or not judged
        verdict = f">= {LOOP_TARGET}x: {'PASS' if ok else 'FAIL'}" if judged else "(reported)"
        rows.append(
            ["training loop", f"toy config, {workers} workers, checkpoint + logging", f"{loop['loop']:.2f} episodes/s",
             f"{ratio:.2f}x", verdict]
        )  # fmt: skip
        summary.append(
            [f"train: loop / step-only episodes/s ({workers} workers)", f"{ratio:.2f}x",
             f">= {LOOP_TARGET}x" if judged else "", ("PASS" if ok else "FAIL") if judged else ""]
        )  # fmt: skip
    rows.append(["step only", "toy config, same batch size", f"{loop['step']:.2f} episodes/s", "1.00x", ""])
    notes.append(
        "floor: the backbone's forward (no grad) of the step's 4 query + 4 support images; the step: forward, "
        "loss, backward and an SGD step of JC2A with the frozen backbone (random init, CKMM bank filled at random); "
        "the supports' layer4 is not computed (only PFENet's prior needs it)"
    )
    notes.append(
        "stages: torch.profiler CPU time of one step's forward per module family (children included) and of the "
        "backward with the optimizer's gradient pass; they overlap the floor's work, so they need not sum to the step"
    )
    notes.append(f"loop: `jc2a train` on toy shards ({loop['steps']} steps, a checkpoint halfway), episodes/s logged "
                 "per window after the first, against the same model stepping one fixed batch (each measured after "
                 "the other, so machine load moves them apart); judged at the toy config's 0 workers")  # fmt: skip
    notes.append(environment(device, repeats))
    notes.append(busy_note(load))
    return Report("Training: step against the backbone floor; the whole loop", rows, notes, passed, summary)
