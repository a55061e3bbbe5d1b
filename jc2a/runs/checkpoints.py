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
import logging
import os
import shutil
from pathlib import Path
from typing import Optional

import torch

from jc2a.config import RESUME_FREE_KEYS, Config, ConfigError, flatten, load_config
from jc2a.errors import UserError, WriteError

log = logging.getLogger("jc2a.runs")

__all__ = [
    "STATE_FILE",
    "TrainState",
    "all_ok",
    "check_resume_config",
    "config_digest",
    "checkpoint_dirs",
    "find_resume",
    "finished",
    "resume_config",
    "load_checkpoint",
    "save_checkpoint",
    "verify_checkpoint",
]

STATE_FILE = "trainer_state.json"


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
    config: str = ""  # config_digest of the run's config: what the checkpoint was computed with
    files: Optional[dict] = None  # relative path -> sha256 of every file the checkpoint holds (its manifest)

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(dataclasses.asdict(self), indent=1))

    @classmethod
    def load(cls, path: Path) -> TrainState:
        try:
            data = json.loads(path.read_text())
            return cls(**{f.name: data[f.name] for f in dataclasses.fields(cls) if f.name in data})
        except (OSError, ValueError, TypeError, RecursionError) as exc:  # RecursionError: JSON nested too deep
            raise UserError(f"{path}: unreadable trainer state ({type(exc).__name__}: {str(exc)[:200]})") from None


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


def config_digest(cfg: Config) -> str:
    """sha256 of the config's keys that change what a run computes (all but `RESUME_FREE_KEYS`)."""
    import hashlib

    values = {k: v for k, v in flatten(cfg).items() if k not in RESUME_FREE_KEYS}
    return hashlib.sha256(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()


def _manifest(folder: Path) -> dict[str, str]:
    """relative path -> sha256 of every file under `folder` but the trainer state itself."""
    from jc2a.runs.files import file_sha256

    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != STATE_FILE)
    return {p.relative_to(folder).as_posix(): file_sha256(p) for p in files}


def verify_checkpoint(checkpoint: Path, cfg: Config) -> TrainState:
    """The trainer state of `checkpoint` once the checkpoint has proved itself: its folder's step is the state's, it
    was computed with this config (`config_digest`), and every file it lists is there with its sha256 (nothing
    missing, nothing changed). One UserError naming the checkpoint and the first disagreement otherwise."""
    state = TrainState.load(checkpoint / STATE_FILE)
    name = checkpoint.name
    if name.startswith("step-") and name[len("step-") :] != str(state.step):
        raise UserError(f"{checkpoint}: its trainer state says step {state.step}, its folder says {name}: refused")
    if state.files is None or not state.config:
        raise UserError(f"{checkpoint}: no manifest in {STATE_FILE} (not written by this jc2a): refused")
    if state.config != config_digest(cfg):
        raise UserError(f"{checkpoint}: computed with another config than this run's (config digest differs)")
    found = _manifest(checkpoint)
    for rel, digest in state.files.items():
        if rel not in found:
            raise UserError(f"{checkpoint}: {rel} is missing (listed in its manifest)")
        if found[rel] != digest:
            raise UserError(f"{checkpoint}: {rel} differs from what was written (sha256 {found[rel][:12]}...)")
    extra = sorted(set(found) - set(state.files))
    if extra:
        raise UserError(f"{checkpoint}: {extra[0]} is not one of the files it was written with")
    return state


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


def save_checkpoint(
    accelerator, target: Path, state: TrainState, keep: Optional[int] = None, cfg: Optional[Config] = None
) -> Path:
    """`accelerator.save_state` + RNG + trainer state into a temporary folder, renamed to `target` when every
    rank is done; with `keep`, only the newest `keep` step folders stay. The trainer state, written last, holds the
    config's digest (`cfg`) and the sha256 of every file: `verify_checkpoint` checks them before a resume.

    A failure on any rank (a full disk, an unwritable folder: an OSError, or the SafetensorError safetensors raises
    for them) removes the temporary folder, leaves the earlier checkpoints as they were and raises WriteError (an
    OSError) naming the folder, with the space the checkpoint needs and the space free."""
    tmp = target.with_name(f".{target.name}.tmp")
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    error: Optional[BaseException] = None
    try:
        accelerator.save_state(os.fspath(tmp))
        save_rng(tmp, accelerator.process_index)
    except Exception as exc:  # ENOSPC as OSError, RuntimeError ("file write failed") or SafetensorError
        error = exc
    written = all_ok(accelerator, error is None)
    if written and accelerator.is_main_process:
        try:
            state.config = config_digest(cfg) if cfg is not None else state.config
            state.files = _manifest(tmp)
            state.save(tmp / STATE_FILE)
        except OSError as exc:
            error, written = exc, False
    written = all_ok(accelerator, written)
    if not written:
        needed = _space_needed(accelerator, model_bytes(accelerator))
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        free = shutil.disk_usage(target.parent if target.parent.exists() else target.parent.parent).free
        reason = f"{type(error).__name__}: {error}" if error else "another process failed to write its part"
        raise WriteError(
            f"{target}: checkpoint not written ({_one_line(reason)}); it needs about {needed / 2**20:.0f} MiB, "
            f"{free / 2**20:.0f} MiB are free; the earlier checkpoints are intact"
        ) from error
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


def model_bytes(accelerator) -> int:
    """Bytes of the prepared models' and optimizers' tensors: about what a checkpoint holds."""
    total = 0
    for model in accelerator._models:
        total += sum(t.numel() * t.element_size() for t in model.state_dict().values())
    for optimizer in accelerator._optimizers:
        for values in optimizer.state_dict().get("state", {}).values():
            total += sum(t.numel() * t.element_size() for t in values.values() if isinstance(t, torch.Tensor))
    return total


def _space_needed(accelerator, tensors: int) -> int:
    """The space a checkpoint takes: its tensors plus each rank's RNG file (a few KiB) and the trainer state."""
    return tensors + accelerator.num_processes * 16_384 + 65_536


def _one_line(text: str) -> str:
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    return lines[0] if lines else ""


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


def resume_config(configs: Optional[list], overrides: list, resume) -> tuple[Config, object]:
    """The config and the `resume` argument of `jc2a train [--config ...] [k=v ...] --resume [DIR|auto]`.

    With DIR (a run folder, or a checkpoint inside one): DIR's own `config.yaml` is the config, its
    `train.output_dir` DIR itself; `--config` files and overrides may change only `RESUME_FREE_KEYS` (one line
    naming the first other key they change). Without DIR: the config as given, resumed from its output folder.
    `auto`: as without DIR, but a run with no checkpoint yet starts afresh (a requeued job's first start).

    Raises:
        UserError: DIR holds no config.yaml; ConfigError: a key that may not change on resume.
    """
    if resume in (None, True, "auto"):
        cfg = load_config(configs, overrides)
        if resume == "auto":
            resume = True if checkpoint_dirs(Path(cfg.train.output_dir)) else None
        return cfg, resume
    path = Path(resume)
    run_dir = next((p for p in (path, path.parent, path.parent.parent) if (p / "config.yaml").is_file()), None)
    if run_dir is None:
        raise UserError(f"{path}: no config.yaml here or above: not a jc2a run folder (or a checkpoint of one)")
    saved = run_dir / "config.yaml"
    cfg = load_config(saved, [f"train.output_dir={run_dir}"])
    if configs or overrides:
        asked = load_config([saved, *(configs or [])], [*overrides, f"train.output_dir={run_dir}"])
        base, new = flatten(cfg), flatten(asked)
        for key in sorted(new):
            if key not in RESUME_FREE_KEYS and base.get(key) != new[key]:
                raise ConfigError(
                    f"{saved}: resuming keeps the run's own {key}={base.get(key)!r}, the command says {new[key]!r}; "
                    f"only {', '.join(RESUME_FREE_KEYS)} may change on resume (a new run: another train.output_dir)"
                )
        cfg = asked
    return cfg, path


def finished(run_dir: Path, checkpoint: Path) -> Optional[dict]:
    """The summary of a run whose last checkpoint is its final step and whose model file is written (resuming it
    has nothing to do), else None."""
    state = TrainState.load(checkpoint / STATE_FILE)
    summary = run_dir / "train_summary.json"
    if state.step < state.total_steps or not (run_dir / "model.safetensors").is_file() or not summary.is_file():
        return None
    log.info("%s: finished at step %d of %d (%s written): nothing to resume", run_dir, state.step, state.total_steps,
             run_dir / "model.safetensors")  # fmt: skip
    try:
        done = json.loads(summary.read_text())
    except (OSError, ValueError, RecursionError) as exc:
        raise UserError(f"{summary}: unreadable ({type(exc).__name__}); delete it to resume the run") from None
    return {**done.get("last", {}), "step": state.step, "skipped_steps": state.skipped_steps, "run_dir": str(run_dir),
            "mlflow_run_id": state.mlflow_run_id, "finished": True}  # fmt: skip
