"""The main job end to end, a shorter variant of `jc2a demo`: in the paper's regime (a pretrained, frozen backbone)
JC2A learns fold 0's novel classes of the toy data and CKMM's class-agnostic map follows the objects."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from jc2a.runs.demo import AUROC_TARGET, POINTS_ABOVE_UNTRAINED, ROWS, TIMES_ALL_FOREGROUND, auroc


def test_auroc_is_the_exact_rank_statistic():
    assert auroc(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1])) == 0.75  # 3 of the 4 pairs ordered
    assert auroc(np.array([1.0, 1.0, 1.0]), np.array([1, 0, 0])) == 0.5  # ties count half
    assert auroc(np.array([0.2, 0.9, 0.9, 0.1]), np.array([0, 1, 0, 0])) == pytest.approx(5 / 6)
    assert math.isnan(auroc(np.array([0.1, 0.2]), np.array([1, 1])))
    rng = np.random.default_rng(0)
    scores, positive = rng.random(2000), rng.random(2000) < 0.3
    pairs = (scores[positive][:, None] > scores[~positive][None]).mean()
    assert auroc(scores, positive) == pytest.approx(pairs, abs=1e-12)


@pytest.mark.slow
@pytest.mark.timeout(1500)  # about 5 minutes on 2 quiet cores; a busy host is slower
def test_demo_learns_novel_classes_and_ckmm_follows_the_objects(tmp_path, monkeypatch):
    """JC2A trained >= 2x all-foreground and >= untrained + 20 mIoU points, 1- and 5-shot, on the same novel-class
    episodes; CKMM's map separates objects from background with a mean AUROC >= 0.8; the baseline row is there;
    the reports, figures, curve, pretrained backbone and MLflow run exist; a second run reuses the backbone."""
    from jc2a.runs.demo import demo

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    out = demo(tmp_path / "demo", train_images=400, val_images=240, steps=500, episodes=100, progress=False)
    for check in out["checks"]:
        if check["shot"] is None:
            assert check["ckmm_auroc"] >= AUROC_TARGET, check
            continue
        assert check["trained"] >= TIMES_ALL_FOREGROUND * check["all_foreground"], check
        assert check["trained"] >= check["untrained"] + POINTS_ABOVE_UNTRAINED, check
    assert out["passed"] and {c["shot"] for c in out["checks"]} == {1, 5, None}
    assert out["ckmm_auroc"]["mean"] >= AUROC_TARGET and out["ckmm_auroc"]["queries"] >= 50
    run = tmp_path / "demo" / "run"
    learning = json.loads((run / "eval" / "learning.json").read_text())
    assert set(learning["scores"]) == set(ROWS) and learning["ckmm_auroc"]["mean"] == out["ckmm_auroc"]["mean"]
    assert all(0 <= learning["scores"][ROWS[1]][str(k)]["miou"] <= 100 for k in (1, 5))  # the baseline's row
    assert "prototype baseline trained" in (run / "eval" / "learning.md").read_text()
    results = json.loads((run / "eval" / "results.json").read_text())
    assert {(r["fold"], r["shot"]) for r in results["rows"]} == {(0, 1), (0, 5)}
    assert all(r["backbone_weights"].startswith("file:") for r in results["rows"])  # the pretrained file, frozen
    assert len(list((run / "eval" / "figures").glob("*.png"))) == 4
    assert (run / "training_curve.png").stat().st_size > 10_000
    assert not out["pretrain"]["reused"] and out["pretrain"]["top1"] > 20
    assert out["where"]["mlflow"] == f"mlflow ui --backend-store-uri sqlite:///{tmp_path / 'mlflow.db'}"
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert any(r.data.metrics.get("val_miou", 0) > 0 for r in runs)  # the training run, with its validation
    from jc2a.runs.demo import pretrained_backbone

    path, again = pretrained_backbone(tmp_path / "demo" / "pretrain", None, 0, progress=False)
    assert again["reused"] and path.as_posix() == out["where"]["backbone"]  # the second run skips the pretraining
