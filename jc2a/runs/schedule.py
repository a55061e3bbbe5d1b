"""The optimisation schedule: the global batch, the learning rate scaled with it, PFENet's poly decay."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

from jc2a.config import TrainConfig

__all__ = ["BatchPlan", "batch_plan", "poly", "world_size"]


@dataclass(frozen=True)
class BatchPlan:
    """How many episodes one optimizer step sees, and the learning rate that follows from it.

    PFENet's `poly_learning_rate` multiplies every parameter group's lr by `scale_lr=10` (`index_split=-1`): its
    PASCAL config's `base_lr: 0.0025` trains at 0.025 for a batch of 4, and its COCO config (0.02 at batch 32)
    follows the same linear rule. jc2a writes the effective figure, `train.lr` per `train.lr_batch` episodes, and
    scales it linearly with the global batch (Goyal et al.'s rule) unless `train.scale_lr` is false.
    """

    processes: int
    batch_size: int  # per process
    grad_accum: int
    lr: float  # as configured, per `lr_batch` episodes
    lr_batch: int
    scaled: bool

    @property
    def global_batch(self) -> int:
        """Episodes per optimizer step over every process: processes x batch_size x grad_accum."""
        return self.processes * self.batch_size * self.grad_accum

    @property
    def effective_lr(self) -> float:
        """The lr the optimizer starts at: `lr x global_batch / lr_batch`, or `lr` when scaling is off."""
        return self.lr * self.global_batch / self.lr_batch if self.scaled else self.lr

    def describe(self) -> str:
        """One line for the run's log: the batch arithmetic and the lr it gives."""
        rule = (
            f"lr {self.lr:g} per {self.lr_batch} episodes x {self.global_batch}/{self.lr_batch}"
            if self.scaled
            else f"lr {self.lr:g} (train.scale_lr=false: not scaled)"
        )
        return (
            f"{self.processes} process(es) x batch {self.batch_size} x accumulation {self.grad_accum} = global batch "
            f"{self.global_batch} episodes per step; {rule} = effective lr {self.effective_lr:g}"
        )

    def params(self) -> dict[str, float]:
        """What a tracker logs beside the config (its own keys: they depend on the launch, not the file)."""
        return {
            "run.processes": self.processes,
            "run.batch_size_per_process": self.batch_size,
            "run.grad_accum": self.grad_accum,
            "run.global_batch": self.global_batch,
            "run.effective_lr": self.effective_lr,
        }


def batch_plan(train: TrainConfig, processes: int) -> BatchPlan:
    """The plan of `train` (the config's train section) run on `processes` processes."""
    if processes < 1:
        raise ValueError(f"processes must be >= 1, got {processes}")
    return BatchPlan(processes, train.batch_size, train.grad_accum, train.lr, train.lr_batch, train.scale_lr)


def world_size() -> int:
    """The number of processes of the launch this process belongs to (WORLD_SIZE from accelerate/torchrun), else 1."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


def poly(total_steps: int, power: float) -> Callable[[int], float]:
    """PFENet's poly decay as a LambdaLR factor: `(1 - min(step, total) / total) ** power` over optimizer steps."""
    return lambda step: (1.0 - min(step, total_steps) / total_steps) ** power
