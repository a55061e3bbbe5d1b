"""Tracking: metrics always in the run folder, and in MLflow through accelerate's tracker when it is on."""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Mapping, Optional, Union

from jc2a.config import Config, flatten

log = logging.getLogger("jc2a.runs")


def tracking_uri(output_dir: Union[str, os.PathLike]) -> str:
    """`MLFLOW_TRACKING_URI` when set, else a local sqlite store beside the run folder (no server)."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path(output_dir).resolve().parent / 'mlflow.db'}"


def start_tracking(cfg: Config, run_dir: Union[str, os.PathLike]) -> tuple[bool, Optional[Path]]:
    """The MLflow set-up of every run (training, evaluation): `(tracking on, artifact folder)`.

    With `train.tracking=mlflow`: the store is `tracking_uri(run_dir)`; HTTP stores get bounded retries and
    timeouts (an unreachable server costs a warning, not the run); a local store keeps its artifacts beside it
    (`<store folder>/mlartifacts`, the artifact location of an experiment it creates), never in the working folder.
    A server (`MLFLOW_TRACKING_URI`) keeps its own artifact location (None).
    """
    if cfg.train.tracking != "mlflow":
        return False, None
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
    import mlflow

    mlflow.set_tracking_uri(tracking_uri(run_dir))
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return True, None
    return True, Path(run_dir).resolve().parent / "mlartifacts"


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
