"""`jc2a train`: one training loop for CPU, 1 GPU (fp16, default), N GPUs, N nodes and DeepSpeed.

Launch (the same code path everywhere; only the accelerate config changes):

    jc2a train --config configs/coco20i.yaml                                       # 1 process, this machine
    accelerate launch --config_file accelerate_config.yaml -m jc2a train --config configs/coco20i.yaml   # 1 GPU fp16
    accelerate launch --config_file configs/accelerate/ddp_1node.yaml -m jc2a train --config ...       # 1 node x N
    srun launch/slurm.sh                                                       # N nodes x G GPUs (SLURM)
    accelerate launch --config_file configs/accelerate/deepspeed_zero2.yaml -m jc2a train --config ...  # ZeRO-2
    torchrun --nproc_per_node 4 -m jc2a train --config configs/coco20i.yaml
    jc2a train --config ... --resume                 # the latest complete checkpoint in train.output_dir

What it writes under `train.output_dir`: config.yaml (resolved), bank.safetensors (CKMM), checkpoints/step-<N>/
(`jc2a.runs.checkpoints`: written under a temporary name and renamed; the newest `train.keep_checkpoints` kept),
best/ (the best validation mIoU), metrics.jsonl, and at the end model.safetensors.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
from accelerate.utils import send_to_device

from jc2a.config import Config, ConfigError, save_config
from jc2a.data.episodes import open_shards, train_loader
from jc2a.errors import Preempted
from jc2a.lock import shared_lock
from jc2a.progress import progress
from jc2a.runs.bank import bank_fingerprint, build_bank, ensure_bank
from jc2a.runs.checkpoints import (
    TrainState,
    all_ok,
    check_resume_config,
    find_resume,
    finished,
    load_checkpoint,
    save_checkpoint,
    verify_checkpoint,
)
from jc2a.runs.figures import training_curve
from jc2a.runs.files import BANK_FILE, CONFIG_FILE, MODEL_FILE, save_bank, save_model_file
from jc2a.runs.report import variant
from jc2a.runs.schedule import BatchPlan, batch_plan, poly
from jc2a.runs.session import (
    StopSignals,
    broadcaster,
    close_accelerator,
    make_accelerator,
    rank_seed,
    setup_logging,
    uses_cpu_fp16,
)
from jc2a.runs.step import Stepper, trace
from jc2a.runs.tracking import RunLog, Tracking, mlflow_params, run_name, start_tracking

log = logging.getLogger("jc2a.runs")


def train(cfg: Config, resume=None, progress: bool = True) -> dict:
    """Train JC2A as `cfg` says; returns the last validation metrics and where the files are.

    Args:
        cfg: the resolved config.
        resume: None (a fresh run), True (the latest checkpoint in train.output_dir) or a checkpoint/run path.
        progress: show the main process's progress bar.
    """
    from accelerate.utils import set_seed

    from jc2a.runs.network import build_network

    # 1. what to resume (a finished run is left as it is), tracking, the Accelerator, the launch's arithmetic
    setup_logging()
    run_dir = Path(cfg.train.output_dir)
    checkpoint = find_resume(cfg, resume)
    if checkpoint is not None:
        check_resume_config(cfg, run_dir / CONFIG_FILE)
        done = finished(run_dir, checkpoint)
        if done is not None:
            return done
    tracking = start_tracking(cfg, run_dir)
    accelerator = _accelerator(cfg, tracking)
    plan = batch_plan(cfg.train, accelerator.num_processes)

    # 2. identical initial weights on every rank, then each rank's own randomness (dropout, P2B's ties); the data.
    #    Everything is checked before the run folder exists: a refused run leaves nothing behind.
    rank = accelerator.process_index
    set_seed(cfg.train.seed)
    model = build_network(cfg)
    torch.manual_seed(rank_seed(cfg.train.seed, rank))
    shards = open_shards(cfg.data, cfg.data.train_split), open_shards(cfg.data, cfg.data.val_split)
    existed = run_dir.is_dir()
    lock = shared_lock(run_dir, f"jc2a train (train.output_dir={run_dir})", accelerator.is_main_process,
                       broadcaster(accelerator))  # fmt: skip  # one writer per run folder; the ranks share it
    try:
        return _locked(cfg, accelerator, plan, model, shards, run_dir, checkpoint, tracking, progress)
    finally:
        lock.release()
        if accelerator.is_main_process and not existed and run_dir.is_dir() and not any(run_dir.iterdir()):
            run_dir.rmdir()  # made for this run, which wrote nothing: gone again


def _locked(cfg: Config, accelerator, plan: BatchPlan, model, shards: tuple, run_dir: Path, checkpoint, tracking,
            progress: bool) -> dict:  # fmt: skip
    """The rest of `train`, once the run folder is this run's alone."""
    rank, world = accelerator.process_index, accelerator.num_processes
    if accelerator.is_main_process:
        log.info("%s", plan.describe())
        if getattr(model, "init_note", None):
            log.info("init_from: %s", model.init_note)
        save_config(cfg, run_dir / CONFIG_FILE)
    accelerator.wait_for_everyone()
    loader = train_loader(cfg.data, cfg.train.seed, cfg.train.batch_size, model.backbone.mean, rank, world, shards[0])
    loader.pin_memory = accelerator.device.type == "cuda"
    total_steps = cfg.train.max_steps or cfg.train.epochs * max(1, len(loader) // cfg.train.grad_accum)

    # 3. the CKMM bank (before the first step), SGD at the effective lr, PFENet's poly schedule
    model.to(accelerator.device)
    state = TrainState(total_steps=total_steps)
    if model.prototype_bank is not None and checkpoint is None:
        state.bank = ensure_bank(accelerator, model, cfg, shards[0], run_dir / BANK_FILE, progress)
        log.info("CKMM bank: %s", state.bank)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=plan.effective_lr, momentum=cfg.train.momentum,
                                weight_decay=cfg.train.weight_decay)  # fmt: skip
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, poly(total_steps, cfg.train.power))
    weights_source = model.backbone.weights_source
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    scaler = torch.amp.GradScaler("cpu") if uses_cpu_fp16(accelerator, cfg) else None  # accelerate's on a GPU

    # 4. resume: weights, optimizer, scheduler, scaler, RNG, data position, step, bank
    if checkpoint is not None:
        state = _resume(accelerator, checkpoint, cfg, total_steps, scaler)

    # 5. the tracked run, then the loop; an interrupted run ends its MLflow run before the error goes on
    runlog = RunLog(accelerator, run_dir, tracking)
    state.mlflow_run_id = runlog.start(
        cfg.train.experiment or cfg.data.dataset,
        run_name(cfg, variant(cfg)),
        {**mlflow_params(cfg), **plan.params()},
        state.mlflow_run_id,
        {"jc2a.variant": variant(cfg), "jc2a.processes": str(world), "jc2a.backbone_weights": weights_source},
    )  # fmt: skip
    runlog.artifact(run_dir / CONFIG_FILE)
    loop = Loop(cfg, accelerator, model, loader, shards, runlog, run_dir, state, plan,
                Stepper(accelerator, model, accelerator.unwrap_model(model), optimizer, scheduler, params,
                        cfg.train.clip_grad, scaler), progress)  # fmt: skip
    try:
        with StopSignals() as loop.stop:  # SIGTERM / SIGUSR1: finish the step, checkpoint, exit to be requeued
            loop.run()
        summary = loop.finish()
    except BaseException as exc:  # Ctrl-C, a preemption, an error: the MLflow run must not stay open
        runlog.end_interrupted(exc)
        raise
    close_accelerator(accelerator, model, optimizer, scheduler)
    return summary


# --------------------------------------------------------------------------- the loop


@dataclasses.dataclass
class Loop:
    """The training loop's parts and what it does at each optimizer step: log, validate, keep the best, save."""

    cfg: Config
    accelerator: Any
    model: torch.nn.Module
    loader: Any
    shards: tuple  # (training, validation)
    runlog: RunLog
    run_dir: Path
    state: TrainState
    plan: BatchPlan
    stepper: Stepper
    progress: bool

    def __post_init__(self) -> None:
        self.core = self.accelerator.unwrap_model(self.model)
        self.metrics: dict = {}
        self.tick = time.perf_counter()
        self.stop: Optional[StopSignals] = None

    def run(self) -> None:
        """Micro-batches until the planned number of optimizer steps is done."""
        state = self.state
        show = self.progress and self.accelerator.is_main_process
        self.bar = progress(total=state.total_steps, initial=state.step, desc="train", unit="step", disable=not show)
        self.model.train()
        batches = self.batches()
        while state.step < state.total_steps:
            batch = send_to_device(next(batches), self.accelerator.device, non_blocking=True)
            if self.stepper.micro(batch, state):  # forward, backward; at a window's end, the optimizer step
                state.step += 1
                self.after_step(batch)
        self.bar.close()

    def batches(self) -> Iterator[dict]:
        """The stream of batches across epochs, keeping the data position in the state; at each epoch's end a bank
        that training moves is rebuilt."""
        state = self.state
        while True:
            self.loader.set_epoch(state.epoch, start=state.batch)
            for batch in self.loader:
                state.batch += 1
                yield batch
            state.epoch, state.batch = state.epoch + 1, 0
            if self.core.prototype_bank is not None and self.core.backbone.moves:
                self.rebuild_bank()

    def after_step(self, batch: dict) -> None:
        """1. trace, 2. float metrics with an explicit step, 3. validations and best/, 4. a checkpoint, 5. a stop
        asked for by a signal on any rank: this step's checkpoint, then `Preempted`."""
        cfg, state = self.cfg.train, self.state
        last = state.step == state.total_steps
        self.bar.update(1)
        if cfg.trace_ranks:
            trace(self.run_dir, self.accelerator.process_index, state.step, batch, self.stepper.params)
        if state.step % cfg.log_every == 0 or last:
            state.skipped_records += self.loader.skipped_records
            self.loader.skipped_records = 0
            self.metrics = self.stepper.metrics(state, time.perf_counter() - self.tick, cfg.batch_size)
            self.runlog.log(self.metrics, state.step)
            m = self.metrics
            self.bar.set_postfix(loss=f"{m['loss']:.4f}", lr=f"{m['lr']:.2e}", episodes_s=f"{m['episodes_per_s']:.1f}")
            self.tick = time.perf_counter()
        if (cfg.val_every and state.step % cfg.val_every == 0) or last:
            self.metrics.update(self.validate(full=False))
        if cfg.val_full_every and (state.step % cfg.val_full_every == 0 or last):
            self.metrics.update(self.validate(full=True))
        saved = (cfg.save_every and state.step % cfg.save_every == 0) or last
        if saved:
            self.save(self.run_dir / "checkpoints" / f"step-{state.step}", cfg.keep_checkpoints)
        if self.stop is not None and not last and not all_ok(self.accelerator, self.stop.signal is None):
            target = self.run_dir / "checkpoints" / f"step-{state.step}"
            if not saved:
                self.save(target, cfg.keep_checkpoints)
            name = self.stop.signal or "a signal on another rank"
            raise Preempted(f"{self.run_dir}: stopped by {name} at step {state.step} of {state.total_steps}; "
                            f"checkpoint {target}; continue with `jc2a train --resume {self.run_dir}`")  # fmt: skip

    def save(self, target: Path, keep: Optional[int] = None) -> None:
        """A checkpoint of the run as it stands (the CPU fp16 scaler's state inside the trainer state)."""
        if self.stepper.scaler is not None:
            self.state.loss_scale = {k: float(v) for k, v in self.stepper.scaler.state_dict().items()}
        save_checkpoint(self.accelerator, target, self.state, keep, self.cfg)

    def validate(self, full: bool) -> dict:
        """Validation on the fold's evaluation list (the evaluation's own scoring); a new best mIoU is saved as best/.

        `full`: on the whole list (`data.eval_episodes`, as PFENet selects its best epoch), logged as `val_full_*`;
        when `train.val_full_every` is on, best/ is chosen on these and not on the short validations between.
        """
        from jc2a.runs.evaluate import evaluate_episodes

        cfg, state = self.cfg, self.state
        episodes = cfg.data.eval_episodes if full else cfg.train.val_episodes
        seed = cfg.data.eval_seeds[0]
        result, _ = evaluate_episodes(self.accelerator, self.core, cfg, self.shards[1], seed, episodes)
        self.model.train()
        prefix = "val_full" if full else "val"
        numbers = {f"{prefix}_miou": result["miou"], f"{prefix}_fbiou": result["fbiou"]}
        self.runlog.log(numbers, state.step)
        log.info("step %d: validation (%d episodes) mIoU %.2f, FB-IoU %.2f", state.step, episodes, result["miou"],
                 result["fbiou"])  # fmt: skip
        if (full or not cfg.train.val_full_every) and result["miou"] > state.best_miou:
            state.best_miou, state.best_step = result["miou"], state.step
            self.save(self.run_dir / "best")
            if self.accelerator.is_main_process:
                best = self.run_dir / "best" / MODEL_FILE
                save_model_file(best, self.core, cfg, step=state.step, miou=result["miou"])
        return numbers

    def rebuild_bank(self) -> None:
        """A backbone that training moves (trainable weights, or BatchNorm statistics) moves layer4, so the bank goes
        stale: rebuilt at each epoch's end and at the end."""
        accelerator, core, state, out = self.accelerator, self.core, self.state, self.run_dir / BANK_FILE
        build_bank(accelerator, core, self.cfg, self.shards[0], self.progress)
        if accelerator.is_main_process:
            save_bank(core.prototype_bank, out, bank_fingerprint(self.cfg, core, self.shards[0].checksum))
        accelerator.wait_for_everyone()
        state.bank = f"rebuilt at epoch {state.epoch}, step {state.step} (the backbone moves in training)"
        log.info("CKMM bank %s -> %s", state.bank, out)
        self.runlog.log({"ckmm_bank_rebuilt": float(state.epoch)}, state.step)
        self.runlog.tag("jc2a.ckmm_bank", state.bank)

    def finish(self) -> dict:
        """The final files (model.safetensors: weights, buffers, the bank; train_summary.json) and their artifacts."""
        accelerator, state, run_dir = self.accelerator, self.state, self.run_dir
        if self.core.prototype_bank is not None and self.core.backbone.moves:
            self.rebuild_bank()
        state.skipped_records += self.loader.skipped_records
        if accelerator.is_main_process:
            save_model_file(run_dir / MODEL_FILE, self.core, self.cfg, step=state.step,
                            skipped_steps=state.skipped_steps)  # fmt: skip
            (run_dir / "train_summary.json").write_text(
                json.dumps({**dataclasses.asdict(state), "last": self.metrics}, indent=1)
            )
            training_curve(run_dir / "metrics.jsonl", run_dir / "training_curve.png", run_name(self.cfg))
        accelerator.wait_for_everyone()
        for name in (CONFIG_FILE, BANK_FILE, MODEL_FILE, "metrics.jsonl", "training_curve.png"):
            if (run_dir / name).exists():
                self.runlog.artifact(run_dir / name)
        if self.cfg.train.register_model:
            self.runlog.register(run_dir / MODEL_FILE, self.cfg.train.register_model)
        return {**self.metrics, "step": state.step, "skipped_steps": state.skipped_steps, "run_dir": str(run_dir),
                "mlflow_run_id": state.mlflow_run_id}  # fmt: skip


# --------------------------------------------------------------------------- set-up helpers


def _accelerator(cfg: Config, tracking: Tracking):
    """The Accelerator of a training run; DeepSpeed takes the batch, accumulation and clipping from the config."""
    from accelerate.utils import DistributedDataParallelKwargs

    ddp = DistributedDataParallelKwargs(find_unused_parameters=cfg.model.aux_weight == 0)
    accelerator = make_accelerator(cfg, trackers=tracking.trackers, logging_dir=tracking.logging_dir,
                                   gradient_accumulation_steps=cfg.train.grad_accum,
                                   step_scheduler_with_optimizer=False, kwargs_handlers=[ddp])  # fmt: skip
    plugin = accelerator.state.deepspeed_plugin
    if plugin is not None:
        plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = cfg.train.batch_size
        plugin.deepspeed_config["gradient_accumulation_steps"] = cfg.train.grad_accum
        plugin.deepspeed_config["gradient_clipping"] = cfg.train.clip_grad
    if cfg.train.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    return accelerator


def _resume(accelerator, checkpoint: Path, cfg: Config, total_steps: int, scaler) -> TrainState:
    """The run's state from `checkpoint` once it has proved itself (`verify_checkpoint`: its step, its config, the
    sha256 of every file), then the weights, optimizer, scheduler and RNG through `load_checkpoint`."""
    state = verify_checkpoint(checkpoint, cfg)
    load_checkpoint(accelerator, checkpoint, accelerator.process_index)
    if state.total_steps != total_steps:
        raise ConfigError(f"{checkpoint}: planned for {state.total_steps} steps, this config plans {total_steps}")
    if scaler is not None and state.loss_scale:
        scaler.load_state_dict(state.loss_scale)
    log.info("resumed from %s at step %d (epoch %d, batch %d)", checkpoint, state.step, state.epoch, state.batch)
    return state


# --------------------------------------------------------------------------- command line


__all__ = ["Loop", "rank_seed", "train"]
