"""The main job end to end, a shorter variant of `jc2a demo`: JC2A learns fold 0's novel classes on toy data."""

from __future__ import annotations

import json

import pytest

from jc2a.runs.demo import POINTS_ABOVE_UNTRAINED, TIMES_ALL_FOREGROUND


@pytest.mark.timeout(1500)  # 4-5 minutes on 2 quiet cores; a CI run on a busy host took over 10 (2026-11-29)
def test_demo_learns_novel_classes(tmp_path, monkeypatch):
    """Trained >= 2x all-foreground and >= untrained + 20 mIoU points, 1- and 5-shot, on the same novel-class
    episodes; the reports, figures, curve and MLflow run exist. 4-5 minutes on 2 cores (the full demo: ~8)."""
    from jc2a.runs.demo import demo

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    out = demo(tmp_path / "demo", train_images=400, val_images=240, steps=500, episodes=150, progress=False)
    for check in out["checks"]:
        assert check["trained"] >= TIMES_ALL_FOREGROUND * check["all_foreground"], check
        assert check["trained"] >= check["untrained"] + POINTS_ABOVE_UNTRAINED, check
    assert out["passed"] and {c["shot"] for c in out["checks"]} == {1, 5}
    run = tmp_path / "demo" / "run"
    results = json.loads((run / "eval" / "results.json").read_text())
    assert {(r["fold"], r["shot"]) for r in results["rows"]} == {(0, 1), (0, 5)}
    assert (run / "eval" / "results.md").is_file() and (run / "eval" / "learning.md").is_file()
    assert len(list((run / "eval" / "figures").glob("*.png"))) == 4
    assert (run / "training_curve.png").stat().st_size > 10_000
    assert out["where"]["mlflow"] == f"mlflow ui --backend-store-uri sqlite:///{tmp_path / 'mlflow.db'}"
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert any(r.data.metrics.get("val_miou", 0) > 0 for r in runs)  # the training run, with its validation
