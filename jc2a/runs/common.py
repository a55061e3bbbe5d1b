"""What the runs share: the Accelerator, model files (safetensors), run folders, the bank fingerprint, tracking."""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence, Union

import torch
import yaml
from torch import nn

from jc2a.config import Config, ConfigError, flatten, load_config, to_dict

log = logging.getLogger("jc2a.runs")

MODEL_FORMAT = "jc2a-model/1"
MODEL_FILE = "model.safetensors"
BANK_FILE = "bank.safetensors"
CONFIG_FILE = "config.yaml"


def setup_logging() -> None:
    """One line per message on stderr, once per process."""
    if not logging.getLogger("jc2a").handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s: %(message)s", "%H:%M:%S"))
        logging.getLogger("jc2a").addHandler(handler)
        logging.getLogger("jc2a").setLevel(logging.INFO)


# --------------------------------------------------------------------------- the Accelerator


def make_accelerator(cfg: Config, *, tracking: bool = False, logging_dir: Optional[Path] = None, **kwargs: Any):
    """One Accelerator for every setting: CPU (gloo), one GPU, DDP on N GPUs and nodes, DeepSpeed.

    Mixed precision is `train.mixed_precision`; fp16 needs a GPU (accelerate would silently run fp32 on a CPU), so
    on a CPU it falls back to fp32 with a warning (bf16 works on CPUs). DeepSpeed on a CPU needs the gloo backend
    chosen before the Accelerator (ENV.md).
    """
    from accelerate import Accelerator, PartialState
    from accelerate.utils import ProjectConfiguration

    cuda = torch.cuda.is_available()
    precision = cfg.train.mixed_precision
    if precision == "fp16" and not cuda:
        if cfg.train.cpu_fp16:
            log.info("fp16 on the CPU: torch's float16 autocast and GradScaler (train.cpu_fp16=true; slow)")
        else:
            log.warning("train.mixed_precision=fp16 needs a GPU: this CPU run uses fp32 (bf16 works on CPUs)")
        precision = "no"
    deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    if not cuda and deepspeed:
        PartialState(backend="gloo")  # DeepSpeed's CPU accelerator, over gloo (ENV.md); `cpu=True` would drop it
    project = ProjectConfiguration(project_dir=cfg.train.output_dir, logging_dir=logging_dir)
    return Accelerator(
        cpu=not cuda and not deepspeed,
        mixed_precision=precision,
        log_with="mlflow" if tracking else None,
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
    """Release models and optimizers, then end: gloo aborted at exit in 2-4 runs of 10 without this (ENV.md)."""
    import gc

    accelerator.free_memory(*objects)
    gc.collect()
    accelerator.wait_for_everyone()
    accelerator.end_training()


def to_device(batch: Mapping[str, Any], device: torch.device) -> dict:
    """Tensors of a batch moved to `device` (non-blocking); lists and strings as they are."""
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


# --------------------------------------------------------------------------- model files


def save_model_file(path: Union[str, os.PathLike], model: nn.Module, cfg: Config, **meta: Any) -> Path:
    """Every tensor the evaluator needs (trainable weights, frozen backbone, buffers, CKMM bank) as safetensors,
    written atomically; the resolved config and `meta` go into the file's metadata."""
    from jc2a.runs.files import write_safetensors

    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    metadata = {"format": MODEL_FORMAT, "config": yaml.safe_dump(to_dict(cfg), sort_keys=False)}
    metadata.update({k: json.dumps(v) for k, v in meta.items()})
    return write_safetensors(path, tensors, metadata)


def read_model_file(path: Union[str, os.PathLike]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a model file; only safetensors is read, nothing is unpickled.

    Raises FileNotFoundError or ValueError naming the file when it is missing or not a jc2a model file.
    """
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: model file not found")
    try:
        with safe_open(os.fspath(path), framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            if metadata.get("format") != MODEL_FORMAT:
                raise ValueError(f"{path}: not a jc2a model file (no safetensors metadata format={MODEL_FORMAT!r})")
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except SafetensorError as exc:
        raise ValueError(f"{path}: not a safetensors jc2a model file ({str(exc).splitlines()[0]})") from None
    return tensors, metadata


WEIGHTS = ("final", "best")  # a run's model.safetensors, or best/model.safetensors (the best validation mIoU)


def resolve_checkpoint(path: Union[str, os.PathLike], weights: str = "final") -> tuple[Path, Optional[Path]]:
    """(model file, config file or None) of `path`: a model file, or a run folder holding model.safetensors
    (`weights="final"`) or best/model.safetensors (`weights="best"`); the config is the run's config.yaml."""
    if weights not in WEIGHTS:
        raise ValueError(f"weights {weights!r}: expected one of {', '.join(WEIGHTS)}")
    path = Path(path)
    if path.is_dir():
        model = path / "best" / MODEL_FILE if weights == "best" else path / MODEL_FILE
        if not model.is_file():
            why = "was it ever validated?" if weights == "best" else "has the training finished?"
            raise FileNotFoundError(f"{path}: no {model.relative_to(path)} in this run folder ({why})")
        config = path / CONFIG_FILE
        return model, config if config.is_file() else None
    if not path.exists():
        raise FileNotFoundError(f"{path}: checkpoint not found")
    if weights == "best":
        raise ValueError(f"{path}: the best weights are a run folder's best/{MODEL_FILE}; give the run folder")
    config = path.parent / CONFIG_FILE
    return path, config if config.is_file() else None


def load_trained_model(
    checkpoint: Union[str, os.PathLike],
    configs: Optional[Sequence[Union[str, os.PathLike]]] = None,
    overrides: Iterable[str] = (),
    weights: str = "final",
) -> tuple[nn.Module, Config]:
    """A trained JC2A and its config from a model file or run folder.

    The config is `configs` when given (e.g. another fold's data settings), else the run folder's config.yaml,
    else the one stored in the model file; `overrides` apply last. The backbone is built without downloading
    anything (its weights are in the file). A file from an incompatible config is refused with one line naming
    the first tensor that does not fit. `weights`: a run folder's final model or its best/ one.
    """
    from jc2a.model import build_model

    model_file, config_file = resolve_checkpoint(checkpoint, weights)
    tensors, metadata = read_model_file(model_file)
    overrides = list(overrides)
    if configs:
        cfg = load_config(list(configs), overrides)
    elif config_file is not None:
        cfg = load_config(config_file, overrides)
    else:
        stored = model_file.with_name(f".{model_file.stem}.config.yaml")
        try:
            stored.write_text(metadata["config"])
            cfg = load_config(stored, overrides)
        finally:
            stored.unlink(missing_ok=True)
    cfg.model.backbone.pretrained, cfg.model.backbone.weights = False, None  # the file holds the weights
    cfg.model.ckmm.bank_file = None  # and the bank
    model = build_model(cfg)
    load_model_state(model, tensors, model_file)
    return model, cfg


def load_model_state(model: nn.Module, tensors: Mapping[str, torch.Tensor], source: Union[str, Path]) -> None:
    """`model.load_state_dict(tensors)`, strictly, with one line naming the first tensor that does not fit."""
    own = model.state_dict()
    missing = [k for k in own if k not in tensors]
    extra = [k for k in tensors if k not in own]
    if missing or extra:
        what = f"lacks {missing[0]}" if missing else f"has {extra[0]}, which this model does not"
        raise ConfigError(
            f"{source}: checkpoint from an incompatible config: it {what} ({len(missing)} missing, {len(extra)} "
            f"unexpected tensors); evaluate it with the config it was trained with"
        )
    for k, v in own.items():
        if tuple(v.shape) != tuple(tensors[k].shape):
            raise ConfigError(
                f"{source}: checkpoint from an incompatible config: {k} is {tuple(tensors[k].shape)} in the file, "
                f"{tuple(v.shape)} in this model"
            )
    model.load_state_dict(dict(tensors), strict=True)


# --------------------------------------------------------------------------- CKMM bank fingerprint


def bank_fingerprint(cfg: Config, model: nn.Module, index_checksum: str) -> dict[str, str]:
    """What a prototype bank depends on: a bank file is reused only when all of it matches."""
    backbone = model.backbone
    return {
        "backbone": cfg.model.backbone.name,
        "weights": backbone.weights_digest(),
        "dataset": cfg.data.dataset,
        "fold": str(cfg.data.fold),
        "image_size": str(cfg.data.image_size),
        "canvas": cfg.data.eval_resize,
        "min_pixels": str(cfg.data.min_pixels),
        "train_index": index_checksum,
    }


# --------------------------------------------------------------------------- tracking


def tracking_uri(output_dir: Union[str, os.PathLike]) -> str:
    """`MLFLOW_TRACKING_URI` when set, else a local sqlite store beside the run folder (no server)."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path(output_dir).resolve().parent / 'mlflow.db'}"


class RunLog:
    """Metrics of a run: always appended to `<run>/metrics.jsonl`, and to MLflow through accelerate's tracker when
    tracking is on. An MLflow store that cannot be reached costs a warning, never the run: the metrics stay in
    the run folder. Only the main process writes.
    """

    def __init__(self, accelerator, run_dir: Path, tracking: bool) -> None:
        self.accelerator = accelerator
        self.path = Path(run_dir) / "metrics.jsonl"
        self.mlflow = tracking
        self.warned = False

    def _failed(self, what: str, exc: Exception) -> None:
        if not self.warned:
            log.warning("MLflow %s failed (%s); tracking off, metrics stay in %s", what, exc, self.path)
        self.warned, self.mlflow = True, False

    def end_interrupted(self, exc: BaseException) -> None:
        """End the MLflow run of a run that did not finish: KILLED for Ctrl-C (or a test's timeout), FAILED for an
        error. The store then does not show it running forever, and this process can start another run (an
        active run left behind makes the next `mlflow.start_run` fail). Resuming continues the same run id."""
        if not self.mlflow:
            return
        try:
            import mlflow

            if mlflow.active_run() is not None:
                mlflow.end_run(status="FAILED" if isinstance(exc, Exception) else "KILLED")
        except Exception as err:  # the store may be what failed: the run's own error matters more
            log.warning("MLflow end_run failed (%s) while stopping on %s", err, type(exc).__name__)

    def start(self, experiment: str, run_name: str, params: dict, run_id: Optional[str], tags: dict) -> Optional[str]:
        """Open (or continue, with `run_id`) the MLflow run; its id, or None when tracking is off or failed."""
        if not self.mlflow:
            return None
        try:
            self.accelerator.init_trackers(
                experiment,
                config=params,
                init_kwargs={"mlflow": {"run_name": run_name, "run_id": run_id, "tags": tags}},
            )
            if self.accelerator.is_main_process:
                return self.accelerator.get_tracker("mlflow", unwrap=True).info.run_id
        except Exception as exc:  # an unreachable or broken store: the run goes on
            self._failed("start", exc)
        return None

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        if not self.accelerator.is_main_process:
            return
        values = {k: float(v) for k, v in metrics.items() if v is not None and math.isfinite(float(v))}
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, "time": time.time(), **values}) + "\n")
        if self.mlflow:
            try:
                self.accelerator.log(values, step=step)
            except Exception as exc:
                self._failed("logging", exc)

    def artifact(self, path: Union[str, os.PathLike], folder: Optional[str] = None) -> None:
        if not (self.mlflow and self.accelerator.is_main_process):
            return
        try:
            import mlflow

            if Path(path).is_dir():
                mlflow.log_artifacts(os.fspath(path), artifact_path=folder)
            else:
                mlflow.log_artifact(os.fspath(path), artifact_path=folder)
        except Exception as exc:
            self._failed(f"artifact upload of {path}", exc)

    def tag(self, key: str, value: str) -> None:
        if not (self.mlflow and self.accelerator.is_main_process):
            return
        try:
            import mlflow

            mlflow.set_tag(key, value)
        except Exception as exc:
            self._failed("tag", exc)


def mlflow_params(cfg: Config) -> dict:
    """The flat config as MLflow params (lists as text)."""
    return {k: (json.dumps(v) if isinstance(v, (list, dict)) else v) for k, v in flatten(cfg).items()}


def run_name(cfg: Config, row: str = "") -> str:
    """`coco20i-f0-1shot-resnet50[-row]`: the run's name in MLflow."""
    name = f"{cfg.data.dataset}-f{cfg.data.fold}-{cfg.data.shot}shot-{cfg.model.backbone.name}"
    return f"{name}-{row}" if row else name
