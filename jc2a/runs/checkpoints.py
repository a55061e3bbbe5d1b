"""A run's checkpoints: accelerate's save_state written under a temporary name and renamed, the torch RNG of every
rank as safetensors, the trainer state as JSON; found, rotated and loaded without unpickling anything.

Why not accelerate's own conveniences: `ProjectConfiguration(automatic_checkpoint_naming=True, total_limit=N)`
deletes the oldest checkpoint *before* it writes the new one, in place, so a crash while writing leaves a
half-written folder and one complete checkpoint fewer (none with `total_limit=1`); and `register_for_checkpointing`
stores custom state as a pickle that accelerate loads with `weights_only=False` (it would run code a checkpoint
holds). The trainer state (`TrainState`, plain numbers) is JSON instead.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path
from typing import Optional

import torch

from jc2a.config import Config, ConfigError, flatten, load_config
from jc2a.errors import UserError, WriteError

__all__ = [
    "STATE_FILE",
    "TrainState",
    "all_ok",
    "check_resume_config",
    "checkpoint_dirs",
    "find_resume",
    "load_checkpoint",
    "save_checkpoint",
]

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
    loss_scale: Optional[dict] = None  # torch's GradScaler state under `train.cpu_fp16` (numbers only: JSON)

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(dataclasses.asdict(self), indent=1))

    @classmethod
    def load(cls, path: Path) -> TrainState:
        try:
            data = json.loads(path.read_text())
            return cls(**{f.name: data[f.name] for f in dataclasses.fields(cls) if f.name in data})
        except (OSError, ValueError, TypeError) as exc:
            raise UserError(f"{path}: unreadable trainer state ({exc})") from None


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


def all_ok(accelerator, ok: bool) -> bool:
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
    any rank leaves the earlier checkpoints as they were and raises WriteError (an OSError) naming the folder."""
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
    if not all_ok(accelerator, error is None):
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        reason = f"{type(error).__name__}: {error}" if error else "another process failed to write its part"
        raise WriteError(f"{target}: checkpoint not written ({reason}); the earlier checkpoints are intact") from error
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
    torch RNG that dropout and P2B's ties draw from). Anything unreadable is one UserError naming the checkpoint.
    (accelerate's `random_states_<rank>.pkl` holds Python's and NumPy's global RNG, which jc2a does not use:
    accelerate skips that file with a log line when it cannot read it weights-only.)"""
    import pickle

    from safetensors import SafetensorError

    try:
        accelerator.load_state(os.fspath(checkpoint))
        load_rng(checkpoint, rank)
    except (pickle.UnpicklingError, SafetensorError, RuntimeError, EOFError, KeyError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(
            f"{checkpoint}: checkpoint refused ({type(exc).__name__}: {reason}); it holds something other than "
            f"plain tensors and numbers, or is damaged: resume from another checkpoint"
        ) from None


def check_resume_config(cfg: Config, saved: Path) -> None:
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
