"""A run's process-level set-up: its log lines, the one Accelerator of every setting, and how it ends."""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from jc2a.config import Config

log = logging.getLogger("jc2a.runs")


def setup_logging() -> None:
    """One line per message on stderr, once per process: INFO from the main process (rank 0), warnings and errors
    only from the others, so N processes do not print every line N times (the rank: `RANK`, as accelerate launch
    and torchrun set it, else SLURM's `SLURM_PROCID`)."""
    jc2a = logging.getLogger("jc2a")
    if not jc2a.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s: %(message)s", "%H:%M:%S"))
        jc2a.addHandler(handler)
    rank = os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0"))
    jc2a.setLevel(logging.INFO if rank in ("", "0") else logging.WARNING)


def make_accelerator(
    cfg: Config, *, trackers: Sequence[str] = (), logging_dir: Optional[Path] = None, **kwargs: Any
):
    """One Accelerator for every setting: CPU (gloo), one GPU, DDP on N GPUs and nodes, DeepSpeed.

    Mixed precision is `train.mixed_precision`; fp16 needs a GPU (accelerate would silently run fp32 on a CPU), so
    on a CPU it falls back to fp32 with a warning (bf16 works on CPUs). DeepSpeed on a CPU needs the gloo backend
    chosen before the Accelerator (measured on 2-core CPU machines).
    """
    from accelerate import Accelerator, PartialState
    from accelerate.utils import ProjectConfiguration

    cuda = torch.cuda.is_available()
    if not cuda:  # DeepSpeed's accelerator detection would print "Setting accelerator to CPU" on every run
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    precision = cfg.train.mixed_precision
    if precision == "fp16" and not cuda:
        if cfg.train.cpu_fp16:
            log.info("fp16 on the CPU: torch's float16 autocast and GradScaler (train.cpu_fp16=true; slow)")
        else:
            log.warning("train.mixed_precision=fp16 needs a GPU: this CPU run uses fp32 (bf16 works on CPUs)")
        precision = "no"
    deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    if not cuda and deepspeed:
        PartialState(backend="gloo")  # DeepSpeed's CPU accelerator over gloo; `cpu=True` would drop it
    project = ProjectConfiguration(project_dir=cfg.train.output_dir, logging_dir=logging_dir)
    return Accelerator(
        cpu=not cuda and not deepspeed,
        mixed_precision=precision,
        log_with=list(trackers) or None,
        project_config=project,
        **kwargs,
    )


def reset_accelerate_state() -> None:
    """Forget accelerate's process-wide state, so that a new Accelerator (other precision, other plugin) can be
    made in this process after an earlier one ended (the demo's successive runs, the tests)."""
    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()


def close_accelerator(accelerator, *objects: Any) -> None:
    """Release models and optimizers, then end: gloo aborted at exit in 2-4 runs of 10 without this (2-core CPUs)."""
    import gc

    accelerator.free_memory(*objects)
    gc.collect()
    accelerator.wait_for_everyone()
    accelerator.end_training()


def cpu_fp16_autocast() -> contextlib.AbstractContextManager:
    """torch's float16 autocast on the CPU (`train.cpu_fp16`: accelerate enables fp16 on accelerators only)."""
    return torch.autocast("cpu", dtype=torch.float16)


def uses_cpu_fp16(accelerator, cfg: Config) -> bool:
    """Whether this run computes in float16 on a CPU through torch's own autocast and GradScaler."""
    return accelerator.device.type == "cpu" and cfg.train.mixed_precision == "fp16" and cfg.train.cpu_fp16


def autocast(accelerator, cfg: Config) -> contextlib.AbstractContextManager:
    """The forward's precision for evaluation and validation: float16 on a CPU with `train.cpu_fp16`, else
    accelerate's autocast (fp16/bf16 as the Accelerator was made)."""
    return cpu_fp16_autocast() if uses_cpu_fp16(accelerator, cfg) else accelerator.autocast()
