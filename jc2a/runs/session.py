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


class StopSignals:
    """While active (a `with` block in the main thread), SIGTERM and SIGUSR1 set `signal` instead of killing the
    process: the loop finishes its step, writes a checkpoint and raises `Preempted` (SLURM sends SIGTERM before it
    preempts or times out a job, and SIGUSR1 with `--signal`). The previous handlers come back on exit."""

    SIGNALS = ("SIGTERM", "SIGUSR1")

    def __init__(self) -> None:
        self.signal: Optional[str] = None
        self._previous: dict = {}

    def _handle(self, number, frame) -> None:  # signal's handler signature
        import signal

        self.signal = signal.Signals(number).name
        log.warning("%s received: stopping after this step with a checkpoint", self.signal)

    def __enter__(self) -> StopSignals:
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():
            for name in self.SIGNALS:
                if hasattr(signal, name):
                    self._previous[name] = signal.signal(getattr(signal, name), self._handle)
        return self

    def __exit__(self, *exc) -> None:
        import signal

        for name, handler in self._previous.items():
            signal.signal(getattr(signal, name), handler)


def broadcaster(accelerator):
    """The main process's value on every process (the identity for one process)."""
    if accelerator.num_processes == 1:
        return lambda value: value
    from accelerate.utils import broadcast_object_list

    return lambda value: broadcast_object_list([value])[0]


def rank_seed(seed: int, rank: int) -> int:
    """The torch seed of `rank` once the initial weights are built (the same on every rank): distinct per (seed,
    rank), so Dropout2d masks and P2B's training tie orders differ across ranks as they would within one big
    batch, and never equal to another run's seed (SeedSequence, not `seed + rank`)."""
    import numpy as np

    return int(np.random.SeedSequence([seed, 0x72616E6B, rank]).generate_state(1, np.uint64)[0] >> 1)
