"""Tracking: metrics always in the run folder, and in the trackers `train.tracking` names through accelerate's
`log_with` (MLflow by default; tensorboard, wandb... when installed), with the links that make runs comparable."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import subprocess
import time
from pathlib import Path
from typing import Mapping, Optional, Union

from jc2a.config import Config, flatten
from jc2a.errors import UserError

log = logging.getLogger("jc2a.runs")

# tracker -> the package that provides it (what to install)
PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "comet_ml": "comet_ml", "aim": "aim",
            "clearml": "clearml", "dvclive": "dvclive", "swanlab": "swanlab", "trackio": "trackio",
            "mlflow": "mlflow"}  # fmt: skip


def tracking_uri(output_dir: Union[str, os.PathLike]) -> str:
    """`MLFLOW_TRACKING_URI` when set, else a local sqlite store beside the run folder (no server)."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path(output_dir).resolve().parent / 'mlflow.db'}"


@dataclasses.dataclass
class Tracking:
    """What a run tracks to: accelerate tracker names, where MLflow keeps artifacts (None: the server decides), and
    the folder of file-based trackers (tensorboard's event files)."""

    trackers: list[str]
    artifacts: Optional[Path] = None
    logging_dir: Optional[Path] = None

    @property
    def mlflow(self) -> bool:
        return "mlflow" in self.trackers


def start_tracking(cfg: Config, run_dir: Union[str, os.PathLike]) -> Tracking:
    """The tracking set-up of every run (training, evaluation).

    Each tracker of `train.tracking` must be installed (one line naming the package otherwise). MLflow: the store
    is `tracking_uri(run_dir)`; HTTP stores get bounded retries and timeouts (an unreachable server costs a
    warning, not the run); a local store keeps its artifacts beside it (`<store folder>/mlartifacts`), never in the
    working folder; a server (`MLFLOW_TRACKING_URI`) keeps its own. tensorboard writes under `<run>/tensorboard`.
    """
    import importlib.util

    names = [] if cfg.train.tracking == "none" else cfg.train.tracking.split(",")
    for name in names:
        if importlib.util.find_spec(PACKAGES[name]) is None:
            package = PACKAGES[name]
            raise UserError(f"train.tracking={cfg.train.tracking}: {name} is not installed (pip install {package})")
    tracking = Tracking(names, logging_dir=Path(run_dir) / "tensorboard")
    if tracking.mlflow:
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
        import mlflow

        mlflow.set_tracking_uri(tracking_uri(run_dir))
        if not os.environ.get("MLFLOW_TRACKING_URI"):
            tracking.artifacts = Path(run_dir).resolve().parent / "mlartifacts"
    return tracking


def git_commit() -> Optional[str]:
    """The commit of the checkout jc2a runs from (an editable install or a clone), however it was started (console
    script, `-m`, a notebook); None for an installed wheel. MLflow's own detection reads the entry point's folder,
    which is the venv's bin/ for the console script."""
    folder = Path(__file__).resolve().parents[2]
    try:
        out = subprocess.run(["git", "-C", os.fspath(folder), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=5)  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return None
    commit = out.stdout.strip()
    return commit if out.returncode == 0 and len(commit) == 40 else None


class RunLog:
    """Metrics of a run: always appended to `<run>/metrics.jsonl`, and to every tracker of the run through
    accelerate. A store that cannot be reached costs a warning, never the run: the metrics stay in the run folder.
    Only the main process writes.
    """

    def __init__(self, accelerator, run_dir: Path, tracking: Tracking) -> None:
        self.accelerator = accelerator
        self.path = Path(run_dir) / "metrics.jsonl"
        self.tracking = tracking
        self.trackers = bool(tracking.trackers)
        self.mlflow = tracking.mlflow
        self.run_id: Optional[str] = None
        self.warned = False

    def _failed(self, what: str, exc: Exception) -> None:
        if not self.warned:
            log.warning("tracking %s failed (%s); tracking off, metrics stay in %s", what, exc, self.path)
        self.warned, self.mlflow, self.trackers = True, False, False

    def end_interrupted(self, exc: BaseException) -> None:
        """End the MLflow run of a run that did not finish: KILLED for Ctrl-C, a preemption (or a test's timeout),
        FAILED for an error. The store then does not show it running forever, and this process can start another
        run (an active run left behind makes the next `mlflow.start_run` fail). Resuming continues the same run."""
        if not self.mlflow:
            return
        from jc2a.errors import Preempted

        try:
            import mlflow

            if mlflow.active_run() is not None:
                failed = isinstance(exc, Exception) and not isinstance(exc, Preempted)
                mlflow.end_run(status="FAILED" if failed else "KILLED")
        except Exception as err:  # the store may be what failed: the run's own error matters more
            log.warning("MLflow end_run failed (%s) while stopping on %s", err, type(exc).__name__)

    def start(self, experiment: str, run_name: str, params: dict, run_id: Optional[str], tags: dict) -> Optional[str]:
        """Open (or continue, with `run_id`) the run in every tracker; the MLflow run id (None without MLflow)."""
        if not self.trackers:
            return None
        commit = git_commit()
        tags = {**tags, **({"mlflow.source.git.commit": commit} if commit else {})}
        kwargs = {"mlflow": {"run_name": run_name, "run_id": run_id, "tags": tags,
                             "logging_dir": os.fspath(self.tracking.artifacts) if self.tracking.artifacts else None}}
        try:
            self.accelerator.init_trackers(experiment, config=params, init_kwargs=kwargs)
            if self.mlflow and self.accelerator.is_main_process:
                self.run_id = self.accelerator.get_tracker("mlflow", unwrap=True).info.run_id
        except Exception as exc:  # an unreachable or broken store: the run goes on
            self._failed("start", exc)
        return self.run_id

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        if not self.accelerator.is_main_process:
            return
        values = {k: float(v) for k, v in metrics.items() if v is not None and math.isfinite(float(v))}
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, "time": time.time(), **values}) + "\n")
        if self.trackers:
            try:
                self.accelerator.log(values, step=step)
            except Exception as exc:
                self._failed("logging", exc)

    def artifact(self, path: Union[str, os.PathLike], folder: Optional[str] = None, run_id: Optional[str] = None):
        """A file or folder as an artifact of this run (or of `run_id`: e.g. an evaluation's figures in its
        training run)."""
        if not (self.mlflow and self.accelerator.is_main_process):
            return
        try:
            import mlflow

            if run_id is not None:
                client = mlflow.MlflowClient()
                log_one = client.log_artifacts if Path(path).is_dir() else client.log_artifact
                log_one(run_id, os.fspath(path), folder)
            elif Path(path).is_dir():
                mlflow.log_artifacts(os.fspath(path), artifact_path=folder)
            else:
                mlflow.log_artifact(os.fspath(path), artifact_path=folder)
        except Exception as exc:
            self._failed(f"artifact upload of {path}", exc)

    def tag(self, key: str, value: str, run_id: Optional[str] = None) -> None:
        """Tag this run, or another one (`run_id`: e.g. the training run an evaluation belongs to)."""
        if not (self.mlflow and self.accelerator.is_main_process):
            return
        try:
            import mlflow

            if run_id is None:
                mlflow.set_tag(key, value)
            else:
                mlflow.MlflowClient().set_tag(run_id, key, value)
        except Exception as exc:
            self._failed("tag", exc)

    def register(self, path: Path, name: str) -> Optional[str]:
        """`path` (a model file) logged under `model/` and registered as a new version of `name` in MLflow's model
        registry (the sqlite store has one), its source the run's `model/` artifacts (a safetensors file, not an
        MLflow flavour); the version, or None."""
        if not (self.mlflow and self.accelerator.is_main_process and self.run_id):
            return None
        try:
            import mlflow

            self.artifact(path, "model")
            client = mlflow.MlflowClient()
            try:
                client.get_registered_model(name)
            except mlflow.exceptions.MlflowException:  # the first version of this name
                client.create_registered_model(name, description="JC2A models trained with jc2a (model.safetensors)")
            source = f"{client.get_run(self.run_id).info.artifact_uri}/model"
            version = client.create_model_version(name, source, run_id=self.run_id)
            log.info("registered %s as model %s version %s", path, name, version.version)
            return str(version.version)
        except Exception as exc:
            self._failed(f"registering the model as {name}", exc)
            return None


def mlflow_params(cfg: Config) -> dict:
    """The flat config as MLflow params (lists as text)."""
    return {k: (json.dumps(v) if isinstance(v, (list, dict)) else v) for k, v in flatten(cfg).items()}


def run_name(cfg: Config, row: str = "") -> str:
    """`coco20i-f0-1shot-resnet50[-row]`: the run's name in MLflow."""
    name = f"{cfg.data.dataset}-f{cfg.data.fold}-{cfg.data.shot}shot-{cfg.model.backbone.name}"
    return f"{name}-{row}" if row else name
