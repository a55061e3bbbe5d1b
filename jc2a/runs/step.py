"""One optimizer step at a time: forward, loss, the non-finite guard, backward, clipping, the step, its numbers."""

from __future__ import annotations

import contextlib
import json
import logging
import math
from collections import defaultdict
from pathlib import Path

import torch

from jc2a.runs.checkpoints import TrainState, all_ok
from jc2a.runs.session import cpu_fp16_autocast

__all__ = ["Stepper", "mean_over_ranks", "trace"]

log = logging.getLogger("jc2a.runs")


class Stepper:
    """One micro-batch at a time: forward, loss, a guard against non-finite values, backward, and at the end of an
    accumulation window the optimizer step; it keeps the window's numbers for logging."""

    def __init__(
        self, accelerator, model, core, optimizer, scheduler, params: list, clip: float, scaler=None
    ) -> None:
        self.accelerator, self.model, self.core = accelerator, model, core
        self.optimizer, self.scheduler, self.params = optimizer, scheduler, params
        self.clip = clip or math.inf
        self.scaler = scaler  # torch's GradScaler of `train.cpu_fp16` (accelerate keeps its own on a GPU)
        # accelerate's prepared model autocasts on a GPU itself; fp16 on a CPU is torch's autocast, here
        self.cpu_autocast = cpu_fp16_autocast if scaler is not None else contextlib.nullcontext
        self.window: dict[str, list[float]] = defaultdict(list)
        self.micros, self.grads = 0, False

    def micro(self, batch: dict, state: TrainState) -> bool:
        """Train on one micro-batch; True when it ended an optimizer step (taken or skipped)."""
        acc = self.accelerator
        with acc.accumulate(self.model):
            # 1. forward and loss (uint8 images normalised on the device by the backbone)
            with self.cpu_autocast():
                out = self.model(batch["query_img"], batch["support_imgs"], batch["support_masks"])
            loss = self.core.loss(out, batch["query_mask"])
            # 2. a non-finite loss on any rank: no rank takes a backward step on it
            if all_ok(acc, bool(torch.isfinite(loss))):
                acc.backward(self.scaler.scale(loss) if self.scaler is not None else loss)
                self.grads = True
                with torch.no_grad():
                    self.window["loss"].append(float(loss))
                    self.window["aux_loss"].append(float(loss - self.core.loss(out.logits, batch["query_mask"])))
            self.micros += 1
            if not acc.sync_gradients:
                return False
            # 3. the optimizer step, unless nothing finite was accumulated or the gradient is not finite
            #    (fp16: accelerate's loss scaler skips inf steps itself; DeepSpeed clips and steps in backward)
            if self.grads and self.scaler is not None:
                self.scaler.unscale_(self.optimizer)  # true gradients for the norm and the clip
            norm = acc.clip_grad_norm_(self.params, self.clip) if self.grads else math.nan
            norm = 0.0 if norm is None else float(norm)
            if self.grads and (math.isfinite(norm) or acc.scaler is not None):
                if self.scaler is not None:
                    self.scaler.step(self.optimizer)
                else:
                    self.optimizer.step()
                self.window["grad_norm"].append(norm)
            else:
                state.skipped_steps += 1
                log.warning("step %d skipped: non-finite loss or gradient", state.step + 1)
            if self.grads and self.scaler is not None:
                self.scaler.update()  # halves the scale after an overflow, grows it after a run of good steps
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.grads = False
            return True

    def metrics(self, state: TrainState, seconds: float, batch_size: int) -> dict:
        """The window's means over every rank, then a fresh window."""
        acc = self.accelerator
        out = {
            "loss": mean_over_ranks(acc, self.window["loss"]),
            "aux_loss": mean_over_ranks(acc, self.window["aux_loss"]),
            "lr": self.scheduler.get_last_lr()[0],
            "grad_norm": mean_over_ranks(acc, self.window["grad_norm"]),
            "skipped_steps": float(state.skipped_steps),
            "skipped_records": float(state.skipped_records),
            "episodes_per_s": self.micros * batch_size * acc.num_processes / max(seconds, 1e-9),
            "epoch": float(state.epoch),
        }
        scaler = self.scaler if self.scaler is not None else acc.scaler
        if scaler is not None:
            out["loss_scale"] = float(scaler.get_scale())
        self.window.clear()
        self.micros = 0
        return out


def mean_over_ranks(accelerator, values: list[float]) -> float:
    """The mean of `values` over every rank (NaN when no rank has any)."""
    t = torch.tensor([sum(values), float(len(values))], device=accelerator.device, dtype=torch.float64)
    if accelerator.num_processes > 1:
        t = accelerator.reduce(t, "sum")
    return float(t[0] / t[1]) if float(t[1]) > 0 else math.nan


def trace(run_dir: Path, rank: int, step: int, batch: dict, params: list) -> None:
    """One line per step of this rank: its query keys, the sha256 of its trainable parameters (equal on every rank)
    and of its torch RNG state (what dropout and P2B's ties draw from: different on every rank)."""
    import hashlib

    digest = hashlib.sha256()
    for p in params:
        digest.update(p.detach().cpu().contiguous().numpy().tobytes())
    rng = hashlib.sha256(torch.get_rng_state().numpy().tobytes()).hexdigest()
    folder = run_dir / "trace"
    folder.mkdir(parents=True, exist_ok=True)
    line = {"step": step, "queries": list(batch["query_key"]), "params": digest.hexdigest(), "rng": rng}
    with open(folder / f"rank-{rank}.jsonl", "a") as f:
        f.write(json.dumps(line) + "\n")
