"""`jc2a train`: one training loop for CPU, 1 GPU (fp16, default), N GPUs, N nodes and DeepSpeed (SPEC §3).

Launch (the same code path everywhere; only the accelerate config changes):

    jc2a train --config configs/coco20i.yaml                                       # 1 process, this machine
    accelerate launch --config_file accelerate_config.yaml -m jc2a train --config configs/coco20i.yaml   # 1 GPU fp16
    accelerate launch --config_file configs/accelerate/ddp_1node.yaml -m jc2a train --config ...       # 1 node x N
    srun launch/slurm.sh                                                       # N nodes x G GPUs (SLURM)
    accelerate launch --config_file configs/accelerate/deepspeed_zero2.yaml -m jc2a train --config ...  # ZeRO-2
    torchrun --nproc_per_node 4 -m jc2a train --config configs/coco20i.yaml
    jc2a train --config ... --resume                 # the latest complete checkpoint in train.output_dir

What it writes under `train.output_dir`: config.yaml (resolved), bank.safetensors (CKMM), checkpoints/step-<N>/
(accelerate's save_state, written under a temporary name and renamed; the newest `train.keep_checkpoints` kept),
best/ (the best validation mIoU), metrics.jsonl, and at the end model.safetensors.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import shutil
import time
from collections import defaultdict
from pathlib import Path
from typing import Optional

import torch

from jc2a.config import Config, ConfigError, flatten, load_config, save_config
from jc2a.data.episodes import eval_loader, open_shards, train_loader
from jc2a.folds import novel_classes
from jc2a.metrics import FewShotIoU, score_at_original_size
from jc2a.runs.bank import build_bank, ensure_bank
from accelerate.utils import send_to_device
from jc2a.runs.bank import bank_fingerprint
from jc2a.runs.files import BANK_FILE, CONFIG_FILE, MODEL_FILE, save_model_file
from jc2a.runs.session import close_accelerator, make_accelerator, setup_logging
from jc2a.runs.tracking import RunLog, mlflow_params, run_name, tracking_uri
from jc2a.runs.files import save_bank
from jc2a.runs.report import variant
from jc2a.runs.schedule import batch_plan, poly

log = logging.getLogger("jc2a.runs")

STATE_FILE = "trainer_state.json"
# keys that may differ between a run and its resumption: they change no number the run computes
RESUME_FREE_KEYS = {"train.tracking", "train.experiment", "train.log_every"}


@dataclasses.dataclass
class TrainState:
    """Where a run stands, saved with every checkpoint (the rest is accelerate's save_state)."""

    step: int = 0  # optimizer steps done
    epoch: int = 0  # the epoch being drawn
    batch: int = 0  # batches of `epoch` already consumed
    total_steps: int = 0
    skipped_steps: int = 0  # non-finite losses or gradients that never reached the weights
    skipped_records: int = 0  # unreadable records the stream passed over
    best_miou: float = -1.0
    best_step: int = -1
    bank: str = ""
    mlflow_run_id: Optional[str] = None

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(dataclasses.asdict(self), indent=1))

    @classmethod
    def load(cls, path: Path) -> TrainState:
        try:
            data = json.loads(path.read_text())
            return cls(**{f.name: data[f.name] for f in dataclasses.fields(cls) if f.name in data})
        except (OSError, ValueError, TypeError) as exc:
            raise ValueError(f"{path}: unreadable trainer state ({exc})") from None


# --------------------------------------------------------------------------- checkpoints


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    """The complete checkpoints of a run, oldest first (a complete one has been renamed from its temporary name)."""
    root = Path(run_dir) / "checkpoints"
    found = []
    for path in root.glob("step-*") if root.is_dir() else []:
        number = path.name[len("step-") :]
        if number.isdigit() and (path / STATE_FILE).is_file():
            found.append((int(number), path))
    return [p for _, p in sorted(found)]


def find_resume(cfg: Config, resume) -> Optional[Path]:
    """The checkpoint folder `--resume` means: True -> the latest in train.output_dir; a path -> that checkpoint,
    or the latest of that run folder."""
    if not resume:
        return None
    if resume is True:
        found = checkpoint_dirs(Path(cfg.train.output_dir))
        if not found:
            raise FileNotFoundError(f"{cfg.train.output_dir}: no complete checkpoint to resume from")
        return found[-1]
    path = Path(resume)
    if (path / STATE_FILE).is_file():
        return path
    found = checkpoint_dirs(path)
    if not found:
        raise FileNotFoundError(f"{path}: neither a checkpoint nor a run folder holding one")
    return found[-1]


def _all_ok(accelerator, ok: bool) -> bool:
    """True on every rank when `ok` is true on every rank (so that a failure on one rank stops them all)."""
    if accelerator.num_processes == 1:
        return ok
    flag = torch.tensor([0.0 if ok else 1.0], device=accelerator.device)
    return float(accelerator.reduce(flag, "sum")) == 0.0


def _rng_file(path: Path, rank: int) -> Path:
    return path / f"rng-{rank}.safetensors"


def save_rng(path: Path, rank: int) -> None:
    """This rank's torch RNG states (CPU and CUDA) as safetensors: dropout and P2B's training ties draw from them."""
    from safetensors.torch import save_file

    states = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        states.update({f"cuda{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    save_file(states, os.fspath(_rng_file(path, rank)))


def load_rng(path: Path, rank: int) -> None:
    from safetensors.torch import load_file

    file = _rng_file(path, rank)
    if not file.is_file():
        raise FileNotFoundError(f"{file}: RNG state of rank {rank} missing (was the run resumed with another world?)")
    states = load_file(os.fspath(file))
    torch.set_rng_state(states["cpu"])
    cuda = [states[k] for k in sorted(k for k in states if k.startswith("cuda"))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


def save_checkpoint(accelerator, target: Path, state: TrainState, keep: Optional[int] = None) -> Path:
    """`accelerator.save_state` + RNG + trainer state into a temporary folder, renamed to `target` when every
    rank is done; with `keep`, only the newest `keep` step folders stay. A failure (disk full, unwritable) on
    any rank leaves the earlier checkpoints as they were and raises OSError naming the folder."""
    tmp = target.with_name(f".{target.name}.tmp")
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    error: Optional[BaseException] = None
    try:
        accelerator.save_state(os.fspath(tmp))
        save_rng(tmp, accelerator.process_index)
        if accelerator.is_main_process:
            state.save(tmp / STATE_FILE)
    except (OSError, RuntimeError) as exc:  # ENOSPC, EACCES, torch's "file write failed"
        error = exc
    if not _all_ok(accelerator, error is None):
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        reason = f"{type(error).__name__}: {error}" if error else "another process failed to write its part"
        raise OSError(f"{target}: checkpoint not written ({reason}); the earlier checkpoints are intact")
    if accelerator.is_main_process:
        old = target.with_name(f".{target.name}.old")
        if target.exists():
            os.replace(target, old)
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
        if keep is not None:
            for stale in checkpoint_dirs(target.parent.parent)[:-keep]:
                shutil.rmtree(stale, ignore_errors=True)
    accelerator.wait_for_everyone()
    return target


def load_checkpoint(accelerator, checkpoint: Path, rank: int) -> None:
    """`accelerator.load_state` (torch.load with weights_only=True: a checkpoint is data, a pickle that would run
    code is refused; safetensors for the weights) and this rank's RNG (jc2a's own `rng-<rank>.safetensors`: the
    torch RNG that dropout and P2B's ties draw from). Anything unreadable is one ValueError naming the checkpoint.
    (accelerate's `random_states_<rank>.pkl` holds Python's and NumPy's global RNG, which jc2a does not use:
    accelerate skips that file with a log line when it cannot read it weights-only.)"""
    import pickle

    from safetensors import SafetensorError

    try:
        accelerator.load_state(os.fspath(checkpoint))
        load_rng(checkpoint, rank)
    except (pickle.UnpicklingError, SafetensorError, RuntimeError, EOFError, KeyError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(
            f"{checkpoint}: checkpoint refused ({type(exc).__name__}: {reason}); it holds something other than "
            f"plain tensors and numbers, or is damaged: resume from another checkpoint"
        ) from None


# --------------------------------------------------------------------------- validation


@torch.no_grad()
def validate(accelerator, model, cfg: Config, shards, episodes: int, seed: int) -> dict:
    """mIoU and FB-IoU on the first `episodes` episodes of the fold's evaluation list (novel classes), each rank
    on its share, the sums all-reduced: the same numbers for any number of processes."""
    was_training = model.training
    model.eval()
    meter = FewShotIoU(novel_classes(cfg.data.dataset, cfg.data.fold))
    loader = eval_loader(
        cfg.data, seed, accelerator.process_index, accelerator.num_processes, shards=shards, episodes=episodes
    )
    for batch in loader:
        batch = send_to_device(batch, accelerator.device, non_blocking=True)
        with autocast(accelerator, cfg):
            logits = model(batch["query_img"], batch["support_imgs"], batch["support_masks"])
        pred, target = score_at_original_size(logits[0], batch["query_label"][0])
        meter.update(pred, target, batch["class_id"])
    meter.all_reduce()
    model.train(was_training)
    return meter.compute()


# --------------------------------------------------------------------------- seeds and precision


def rank_seed(seed: int, rank: int) -> int:
    """The torch seed of `rank` once the initial weights are built (the same on every rank): distinct per (seed,
    rank), so Dropout2d masks and P2B's training tie orders differ across ranks as they would within one big
    batch, and never equal to another run's seed (SeedSequence, not `seed + rank`)."""
    import numpy as np

    return int(np.random.SeedSequence([seed, 0x72616E6B, rank]).generate_state(1, np.uint64)[0] >> 1)


def cpu_fp16_scaler(accelerator, cfg: Config):
    """torch's own GradScaler for `train.cpu_fp16` on a CPU (accelerate runs fp16 only on an accelerator), else
    None: accelerate's scaler (fp16 on a GPU), or no scaling (fp32, bf16)."""
    if accelerator.device.type != "cpu" or cfg.train.mixed_precision != "fp16" or not cfg.train.cpu_fp16:
        return None
    return torch.amp.GradScaler("cpu")


def autocast(accelerator, cfg: Config):
    """The forward's precision: float16 autocast on a CPU with `train.cpu_fp16`, else accelerate's autocast."""
    if accelerator.device.type == "cpu" and cfg.train.mixed_precision == "fp16" and cfg.train.cpu_fp16:
        return torch.autocast("cpu", dtype=torch.float16)
    return accelerator.autocast()


# --------------------------------------------------------------------------- the loop


def _check_resume_config(cfg: Config, saved: Path) -> None:
    """A resumed run must compute what the original computed: refuse a config that differs in any other key."""
    if not saved.is_file():
        return
    old = flatten(load_config(saved))
    new = flatten(cfg)
    for key in sorted(new):
        if key not in RESUME_FREE_KEYS and old.get(key) != new[key]:
            raise ConfigError(
                f"{saved}: the run was trained with {key}={old.get(key)!r}, this command says {new[key]!r}; "
                f"resume with the run's own config ({saved}) or start a new train.output_dir"
            )


def train(cfg: Config, resume=None, progress: bool = True) -> dict:
    """Train JC2A as `cfg` says; returns the last validation metrics and where the files are.

    Args:
        cfg: the resolved config.
        resume: None (a fresh run), True (the latest checkpoint in train.output_dir) or a checkpoint/run path.
        progress: show the main process's progress bar.
    """
    from accelerate.utils import DistributedDataParallelKwargs, set_seed
    from tqdm import tqdm

    from jc2a.runs.network import build_network

    # 1. set-up: the Accelerator, seeds, the run folder and its config
    setup_logging()
    run_dir = Path(cfg.train.output_dir)
    checkpoint = find_resume(cfg, resume)
    if checkpoint is not None:
        _check_resume_config(cfg, run_dir / CONFIG_FILE)
    tracking = cfg.train.tracking == "mlflow"
    if tracking:
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
        import mlflow

        mlflow.set_tracking_uri(tracking_uri(run_dir))
    artifacts = None if os.environ.get("MLFLOW_TRACKING_URI") else run_dir.resolve().parent / "mlartifacts"
    ddp = DistributedDataParallelKwargs(find_unused_parameters=cfg.model.aux_weight == 0)
    accelerator = make_accelerator(
        cfg,
        tracking=tracking,
        logging_dir=artifacts,
        gradient_accumulation_steps=cfg.train.grad_accum,
        step_scheduler_with_optimizer=False,
        kwargs_handlers=[ddp],
    )
    plugin = accelerator.state.deepspeed_plugin
    if plugin is not None:  # DeepSpeed takes the batch, accumulation and clipping from its own config
        plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = cfg.train.batch_size
        plugin.deepspeed_config["gradient_accumulation_steps"] = cfg.train.grad_accum
        plugin.deepspeed_config["gradient_clipping"] = cfg.train.clip_grad
    if cfg.train.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    set_seed(cfg.train.seed)  # the same on every rank: identical initial weights
    rank, world = accelerator.process_index, accelerator.num_processes
    plan = batch_plan(cfg.train, world)
    if accelerator.is_main_process:
        log.info("%s", plan.describe())
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / CONFIG_FILE)
    accelerator.wait_for_everyone()

    # 2. data: this rank's share of the training stream; the validation split
    model = build_network(cfg)
    torch.manual_seed(rank_seed(cfg.train.seed, rank))  # then dropout and P2B's ties differ across ranks
    train_shards = open_shards(cfg.data, cfg.data.train_split)
    val_shards = open_shards(cfg.data, cfg.data.val_split)
    loader = train_loader(
        cfg.data, cfg.train.seed, cfg.train.batch_size, model.backbone.mean, rank=rank, world=world, shards=train_shards
    )
    loader.pin_memory = accelerator.device.type == "cuda"
    steps_per_epoch = max(1, len(loader) // cfg.train.grad_accum)
    total_steps = cfg.train.max_steps or cfg.train.epochs * steps_per_epoch

    # 3. model, CKMM bank (before the first step), optimizer, poly schedule
    model.to(accelerator.device)
    state = TrainState(total_steps=total_steps)
    bank_out = run_dir / BANK_FILE
    if model.prototype_bank is not None and checkpoint is None:
        state.bank = ensure_bank(accelerator, model, cfg, train_shards, bank_out, progress)
        log.info("CKMM bank: %s", state.bank)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(
        params, lr=plan.effective_lr, momentum=cfg.train.momentum, weight_decay=cfg.train.weight_decay
    )
    # PFENet's poly: lr = effective lr x (1 - step / total)^power, over optimizer steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, poly(total_steps, cfg.train.power))
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    core = accelerator.unwrap_model(model)
    scaler = cpu_fp16_scaler(accelerator, cfg)
    if scaler is not None:
        accelerator.register_for_checkpointing(scaler)  # its scale resumes with the run

    # 4. resume: weights, optimizer, scheduler, scaler, RNG, data position, step, bank
    if checkpoint is not None:
        load_checkpoint(accelerator, checkpoint, rank)
        state = TrainState.load(checkpoint / STATE_FILE)
        if state.total_steps != total_steps:
            raise ConfigError(f"{checkpoint}: planned for {state.total_steps} steps, this config plans {total_steps}")
        log.info("resumed from %s at step %d (epoch %d, batch %d)", checkpoint, state.step, state.epoch, state.batch)
    runlog = RunLog(accelerator, run_dir, tracking)
    state.mlflow_run_id = runlog.start(
        cfg.train.experiment or cfg.data.dataset,
        run_name(cfg, variant(cfg)),
        {**mlflow_params(cfg), **plan.params()},
        state.mlflow_run_id,
        {
            "jc2a.variant": variant(cfg),
            "jc2a.processes": str(world),
            "jc2a.backbone_weights": core.backbone.weights_source,
        },
    )
    runlog.artifact(run_dir / CONFIG_FILE)

    try:
        # 5. the loop: micro-batches; at each optimizer step: log, validate, keep the best, checkpoint
        model.train()
        stepper = Stepper(accelerator, model, core, optimizer, scheduler, params, cfg.train.clip_grad, scaler)
        show = progress and accelerator.is_main_process
        bar = tqdm(total=total_steps, initial=state.step, desc="train", unit="step", disable=not show)
        tick, metrics = time.perf_counter(), {}
        while state.step < total_steps:
            loader.set_epoch(state.epoch, start=state.batch)
            for batch in loader:
                state.batch += 1
                if not stepper.micro(send_to_device(batch, accelerator.device, non_blocking=True), state):  # 5a. forward, backward, step
                    continue
                state.step += 1
                bar.update(1)
                if cfg.train.trace_ranks:
                    _trace(run_dir, rank, state.step, batch, params)
                last = state.step == total_steps
                if state.step % cfg.train.log_every == 0 or last:  # 5b. float metrics with an explicit step
                    state.skipped_records += loader.skipped_records
                    loader.skipped_records = 0
                    metrics = stepper.metrics(state, time.perf_counter() - tick, cfg.train.batch_size)
                    runlog.log(metrics, state.step)
                    eps = metrics["episodes_per_s"]
                    bar.set_postfix(loss=f"{metrics['loss']:.4f}", lr=f"{metrics['lr']:.2e}", episodes_s=f"{eps:.1f}")
                    tick = time.perf_counter()
                if (cfg.train.val_every and state.step % cfg.train.val_every == 0) or last:  # 5c. validation
                    metrics.update(_validate_and_keep_best(accelerator, core, cfg, val_shards, state, runlog, run_dir))
                if cfg.train.val_full_every and (state.step % cfg.train.val_full_every == 0 or last):
                    metrics.update(
                        _validate_and_keep_best(accelerator, core, cfg, val_shards, state, runlog, run_dir, full=True)
                    )
                if (cfg.train.save_every and state.step % cfg.train.save_every == 0) or last:  # 5d. checkpoint
                    target = run_dir / "checkpoints" / f"step-{state.step}"
                    save_checkpoint(accelerator, target, state, cfg.train.keep_checkpoints)
                if last:
                    break
            else:  # the epoch is over
                state.epoch, state.batch = state.epoch + 1, 0
                if core.prototype_bank is not None and core.backbone.moves and state.step < total_steps:
                    _rebuild_bank(accelerator, core, cfg, train_shards, bank_out, state, runlog, progress)
                continue
            break
        bar.close()

        # 6. final files: model.safetensors (weights, buffers, bank), bank.safetensors; MLflow artifacts
        if core.prototype_bank is not None and core.backbone.moves:
            _rebuild_bank(accelerator, core, cfg, train_shards, bank_out, state, runlog, progress)
        state.skipped_records += loader.skipped_records
        if accelerator.is_main_process:
            save_model_file(run_dir / MODEL_FILE, core, cfg, step=state.step, skipped_steps=state.skipped_steps)
            (run_dir / "train_summary.json").write_text(
                json.dumps({**dataclasses.asdict(state), "last": metrics}, indent=1)
            )
        accelerator.wait_for_everyone()
        for name in (CONFIG_FILE, BANK_FILE, MODEL_FILE, "metrics.jsonl"):
            if (run_dir / name).exists():
                runlog.artifact(run_dir / name)
        summary = {**metrics, "step": state.step, "skipped_steps": state.skipped_steps, "run_dir": str(run_dir)}
        summary["mlflow_run_id"] = state.mlflow_run_id
    except BaseException as exc:  # Ctrl-C, a scheduler's timeout, an error: the MLflow run must not stay open
        runlog.end_interrupted(exc)
        raise
    close_accelerator(accelerator, model, optimizer, scheduler)
    return summary


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
        self.cpu_autocast = (
            (lambda: torch.autocast("cpu", dtype=torch.float16)) if scaler is not None else contextlib.nullcontext
        )
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
            if _all_ok(acc, bool(torch.isfinite(loss))):
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
            "loss": _mean(acc, self.window["loss"]),
            "aux_loss": _mean(acc, self.window["aux_loss"]),
            "lr": self.scheduler.get_last_lr()[0],
            "grad_norm": _mean(acc, self.window["grad_norm"]),
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


def _validate_and_keep_best(
    accelerator, core, cfg: Config, shards, state: TrainState, runlog, run_dir: Path, full: bool = False
) -> dict:
    """Validation metrics; a new best mIoU is saved as best/ (a full checkpoint plus model.safetensors).

    `full`: on the whole evaluation list (`data.eval_episodes`, as PFENet selects its best epoch), logged as
    `val_full_*`; when `train.val_full_every` is on, best/ is chosen on these and not on the short validations.
    """
    episodes = cfg.data.eval_episodes if full else cfg.train.val_episodes
    result = validate(accelerator, core, cfg, shards, episodes, cfg.data.eval_seeds[0])
    prefix = "val_full" if full else "val"
    runlog.log({f"{prefix}_miou": result["miou"], f"{prefix}_fbiou": result["fbiou"]}, state.step)
    log.info("step %d: validation (%d episodes) mIoU %.2f, FB-IoU %.2f", state.step, episodes, result["miou"],
             result["fbiou"])  # fmt: skip
    picks_best = full or not cfg.train.val_full_every
    if picks_best and result["miou"] > state.best_miou:
        state.best_miou, state.best_step = result["miou"], state.step
        save_checkpoint(accelerator, run_dir / "best", state)
        if accelerator.is_main_process:
            save_model_file(run_dir / "best" / MODEL_FILE, core, cfg, step=state.step, miou=result["miou"])
    return {f"{prefix}_miou": result["miou"], f"{prefix}_fbiou": result["fbiou"]}


def _trace(run_dir: Path, rank: int, step: int, batch: dict, params: list) -> None:
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


def _mean(accelerator, values: list[float]) -> float:
    """The mean of `values` over every rank (NaN when no rank has any)."""
    t = torch.tensor([sum(values), float(len(values))], device=accelerator.device, dtype=torch.float64)
    if accelerator.num_processes > 1:
        t = accelerator.reduce(t, "sum")
    return float(t[0] / t[1]) if float(t[1]) > 0 else math.nan


def _rebuild_bank(accelerator, core, cfg, shards, out: Path, state: TrainState, runlog: RunLog, progress) -> None:
    """A trainable backbone moves layer4, so the bank goes stale: rebuilt (epoch end, and at the end)."""
    build_bank(accelerator, core, cfg, shards, progress)
    if accelerator.is_main_process:
        save_bank(core.prototype_bank, out, bank_fingerprint(cfg, core, shards.checksum))
    accelerator.wait_for_everyone()
    state.bank = f"rebuilt at epoch {state.epoch}, step {state.step} (trainable backbone)"
    log.info("CKMM bank %s -> %s", state.bank, out)
    runlog.log({"ckmm_bank_rebuilt": float(state.epoch)}, state.step)
    runlog.tag("jc2a.ckmm_bank", state.bank)


# --------------------------------------------------------------------------- command line


def add_arguments(parser) -> None:
    parser.add_argument("--config", action="append", default=None, help="YAML config (repeat to compose)")
    parser.add_argument(
        "--resume",
        nargs="?",
        const=True,
        default=None,
        metavar="DIR",
        help="continue from the latest complete checkpoint of train.output_dir, or of DIR (a run or checkpoint)",
    )
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. data.fold=1 train.max_steps=100")


def run(args) -> int:
    cfg = load_config(args.config, args.overrides)
    summary = train(cfg, resume=args.resume, progress=not args.no_progress)
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps({k: v for k, v in summary.items() if isinstance(v, (int, float, str))}, indent=1))
    return 0


__all__ = [
    "TrainState",
    "add_arguments",
    "checkpoint_dirs",
    "find_resume",
    "load_checkpoint",
    "run",
    "train",
    "validate",
]
