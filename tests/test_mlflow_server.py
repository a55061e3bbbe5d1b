"""MLflow that compares runs, read back with the MLflow client from a real tracking server on 127.0.0.1."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = ["data.image_size=65", "model.feat_dim=32", "data.min_pixels=200", "data.eval_episodes=8",
        "train.batch_size=2", "train.log_every=1", "train.val_episodes=4", "train.val_every=1",
        "model.backbone.frozen=true", "train.tracking=mlflow"]  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`mlflow server` with a sqlite store (it has a model registry) and its own artifact folder."""
    folder = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    mlflow = Path(sys.executable).with_name("mlflow")
    cmd = [str(mlflow), "server", "--backend-store-uri", f"sqlite:///{folder / 'store.db'}", "--artifacts-destination",
           str(folder / "artifacts"), "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=folder)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    break
        except OSError:
            pass
        assert proc.poll() is None and time.monotonic() < deadline, "mlflow server did not start"
        time.sleep(0.5)
    yield url
    proc.terminate()
    proc.wait(timeout=30)


@pytest.mark.slow  # > 10 s in CI (--durations, 2026-12-02)
def test_runs_are_linked_tagged_curved_and_registered(server, coco_shards, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    from jc2a.config import load_config
    from jc2a.runs.evaluate import evaluate
    from jc2a.runs.session import reset_accelerate_state
    from jc2a.runs.train import train

    monkeypatch.setenv("MLFLOW_TRACKING_URI", server)
    run = tmp_path / "run"
    cfg = load_config(ROOT / "configs/toy.yaml", [f"data.shards={coco_shards}", f"train.output_dir={run}", *TINY,
                                                  "train.max_steps=2", "train.register_model=toy-jc2a"])  # fmt: skip
    out = train(cfg, progress=False)
    reset_accelerate_state()
    results = evaluate(run, shots=[1], seeds=[0], episodes=4, figures=1, progress=False)
    client = MlflowClient(server)
    training, evaluation = client.get_run(out["mlflow_run_id"]), client.get_run(results["mlflow_run_id"])
    # the git commit, however jc2a was started
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True).stdout
    assert training.data.tags["mlflow.source.git.commit"] == commit.strip()
    assert evaluation.data.tags["mlflow.source.git.commit"] == commit.strip()
    # the evaluation points at its training run (and nests under it); the training run points back
    assert evaluation.data.tags["jc2a.train_run_ids"] == training.info.run_id
    assert evaluation.data.tags["mlflow.parentRunId"] == training.info.run_id
    assert f"jc2a.eval.{evaluation.info.run_id}" in training.data.tags
    # named and tagged for what it covers, without one fold's params passed off as the whole
    assert evaluation.info.run_name == "eval-coco20i-f0-1shot-resnet18-jc2a"
    assert evaluation.data.tags["jc2a.folds"] == "0" and evaluation.data.params["eval.shots"] == "1"
    assert "data.fold" not in evaluation.data.params and "data.shot" not in evaluation.data.params
    # the training curve, the eval figures in the training run, the registered model
    artifacts = {a.path for a in client.list_artifacts(training.info.run_id)}
    assert {"training_curve.png", "model", "eval"} <= artifacts, artifacts
    assert [a.path for a in client.list_artifacts(training.info.run_id, "eval/figures")] == [
        "eval/figures/episode-0000.png"
    ]
    (version,) = client.search_model_versions("name='toy-jc2a'")
    assert version.run_id == training.info.run_id and version.version == "1"
    assert [m.step for m in client.get_metric_history(training.info.run_id, "val_miou")] == [1, 2]
    assert training.data.params["run.global_batch"] == "2"
