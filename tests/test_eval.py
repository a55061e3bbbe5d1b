"""`jc2a eval`: results.json/.md of a tiny trained model, 1 process = 2 gloo processes, folds, figures, MLflow."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from jc2a.cli import main
from jc2a.config import load_config
from jc2a.folds import novel_classes
from jc2a.runs.session import reset_accelerate_state

ROOT = Path(__file__).resolve().parents[1]
# the toy config at 65 px with a narrow head (as tests/test_train.py): a few steps train in seconds
TINY = [
    "data.image_size=65",
    "model.feat_dim=32",
    "data.min_pixels=200",
    "train.batch_size=2",
    "train.tracking=none",
    "train.val_every=0",
    "train.val_episodes=4",
    "train.max_steps=6",
]
EVAL = ["--episodes", "8", "--seeds", "0", "1", "--no-progress"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread, as each of the 2 launched processes has (OMP_NUM_THREADS=1): the same arithmetic, and on a
    shared 2-core machine far faster than two spinning threads."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


@pytest.fixture(scope="module")
def trained(coco_shards, tmp_path_factory) -> Path:
    """A tiny JC2A trained for a few steps on fold 0 of the toy data: a run folder."""
    from jc2a.runs.train import train

    run = tmp_path_factory.mktemp("eval") / "run"
    cfg = load_config(ROOT / "configs/toy.yaml", [f"data.shards={coco_shards}", f"train.output_dir={run}", *TINY])
    train(cfg, progress=False)
    reset_accelerate_state()
    return run


@pytest.fixture(scope="module")
def one_process(trained, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("one")
    assert main(["eval", "--checkpoint", str(trained), "--out", str(out), *EVAL]) == 0
    reset_accelerate_state()
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(args, n: int = 2, timeout: int = 600):
    """`accelerate launch` of `python -m jc2a ARGS` with n CPU processes (gloo)."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", "configs/accelerate/cpu_2proc.yaml"]
    cmd += ["--num_processes", str(n), "--main_process_port", str(free_port()), "-m", "jc2a", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc


def numbers(results: dict) -> list:
    return [(r["fold"], r["shot"], r["seed"], r["episodes"], r["miou"], r["fbiou"], r["class_iou"]) for r in
            results["rows"]]  # fmt: skip


def test_results_hold_every_fold_shot_and_seed(one_process):
    results = json.loads((one_process / "results.json").read_text())
    rows = results["rows"]
    assert [(r["fold"], r["shot"], r["seed"]) for r in rows] == [(0, 1, 0), (0, 1, 1), (0, 5, 0), (0, 5, 1)]
    novel = {str(c) for c in novel_classes("coco20i", 0)}
    for r in rows:
        assert {"dataset", "fold", "shot", "seed", "episodes", "miou", "fbiou", "class_iou", "backbone"} <= set(r)
        assert r["dataset"] == "coco20i" and r["backbone"] == "resnet18" and r["episodes"] == 8
        assert set(r["class_iou"]) <= novel and r["class_iou"] and 0 <= r["miou"] <= 100 and 0 < r["fbiou"] <= 100
        class_mean = sum(r["class_iou"].values()) / len(r["class_iou"])
        assert r["miou"] == pytest.approx(class_mean)  # mIoU = mean over the classes that had episodes
    one = next(s for s in results["summary"] if s["shot"] == 1)
    assert one["folds"] == [0] and one["seeds"] == [0, 1] and not one["all_folds"]
    assert one["miou_per_seed"] == [rows[0]["miou"], rows[1]["miou"]]
    assert one["miou_mean"] == pytest.approx((rows[0]["miou"] + rows[1]["miou"]) / 2)
    assert results["config"]["data"]["fold"] == 0 and results["processes"] == 1
    text = (one_process / "results.md").read_text()
    ours = next(line for line in text.splitlines() if "JC²A (this run)" in line).split(" | ")
    assert ours[0] == "| ResNet18" and ours[2] == f"{one['miou_mean']:.1f} ± {one['miou_std']:.1f}"
    assert ours[3:6] == ["–", "–", "–"]  # folds 1-3 not evaluated
    assert "No paper row for this setting (COCO-20i, ResNet18, JC²A)" in text
    logged = [json.loads(line) for line in (one_process / "metrics.jsonl").read_text().splitlines()]
    assert any(m.get("miou/fold0/5shot/seed1") == rows[3]["miou"] for m in logged)


def test_numbers_equal_the_training_validation(trained, tmp_path):
    """Training validates with the evaluation's own scoring: the validation the run logged at its last step (on
    `train.val_episodes` episodes of list 0) is what `jc2a eval` gives the final model on those episodes."""
    logged = [json.loads(line) for line in (trained / "metrics.jsonl").read_text().splitlines()]
    last = [m for m in logged if "val_miou" in m][-1]
    args = ["--shots", "1", "--seeds", "0", "--episodes", "4", "--figures", "0", "--no-progress"]
    assert main(["eval", "--checkpoint", str(trained), "--out", str(tmp_path), *args]) == 0
    row = json.loads((tmp_path / "results.json").read_text())["rows"][0]
    assert last["step"] == 6 and (row["miou"], row["fbiou"]) == pytest.approx((last["val_miou"], last["val_fbiou"]))


def test_figures_are_written(one_process):
    results = json.loads((one_process / "results.json").read_text())
    pictures = sorted((one_process / "figures").glob("*.png"))
    assert [p.name for p in pictures] == results["figures"] == [f"episode-{i:04d}.png" for i in range(4)]
    assert all(p.stat().st_size > 10_000 for p in pictures)


def test_two_gloo_processes_give_the_same_numbers(trained, one_process, tmp_path):
    out = tmp_path / "two"
    launch(["eval", "--checkpoint", str(trained), "--out", str(out), *EVAL])
    one = json.loads((one_process / "results.json").read_text())
    two = json.loads((out / "results.json").read_text())
    assert two["processes"] == 2 and numbers(two) == numbers(one)
    assert two["summary"] == one["summary"]
    assert two["figures"] == one["figures"]  # each process drew its share; the main process drew them all


def test_several_folds_need_a_fold_template(trained, capsys):
    assert main(["eval", "--checkpoint", str(trained), "--folds", "0", "1", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("jc2a eval: error: --folds 0 1") and "{fold}" in err and len(err.splitlines()) == 1


def test_a_model_is_evaluated_on_its_own_fold_only(trained, capsys):
    assert main(["eval", "--checkpoint", str(trained), "--folds", "1", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert "trained on coco20i fold 0, asked to evaluate coco20i fold 1" in err and len(err.splitlines()) == 1


def test_fold_template_and_bare_model_file(trained, tmp_path, monkeypatch, capsys):
    (tmp_path / "run-f0").symlink_to(trained, target_is_directory=True)
    template = str(tmp_path / "run-f{fold}")
    # a missing fold is found before anything runs
    assert main(["eval", "--checkpoint", template, "--folds", "0", "1", "--no-progress"]) == 2
    assert "run-f1: checkpoint not found" in capsys.readouterr().err
    reset_accelerate_state()
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)  # reports land beside what was evaluated, never in the working folder
    short = ["--shots", "1", "--seeds", "0", "--episodes", "4", "--figures", "0", "--no-progress"]
    assert main(["eval", "--checkpoint", str(tmp_path / "run-f0" / "model.safetensors"), *short]) == 0
    rows = json.loads((tmp_path / "run-f0" / "eval" / "results.json").read_text())["rows"]
    reset_accelerate_state()
    assert main(["eval", "--checkpoint", template, "--folds", "0", *short]) == 0
    pattern = tmp_path / "run-f0-eval" / "results.json"  # named for the pattern and its folds, beside the runs
    assert numbers(json.loads(pattern.read_text())) == [numbers({"rows": rows})[0]]
    assert list(work.iterdir()) == []


def test_an_infeasible_setting_is_refused_before_the_first_episode(trained, tmp_path, capsys):
    """5-shot needs 6 usable images of a class: with too few, the call stops before 1-shot runs, in one line, and
    leaves no report folder behind."""
    out = tmp_path / "refused"
    args = ["eval", "--checkpoint", str(trained), "--out", str(out), "--shots", "1", "40", "--episodes", "4",
            "--no-progress", "data.min_pixels=200"]  # fmt: skip
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "has 41 images" in err and len(err.splitlines()) == 1, err
    assert not out.exists()


def test_a_failure_part_way_keeps_what_was_measured_and_fails_the_mlflow_run(trained, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    import jc2a.runs.evaluate as evaluate_module

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    real, calls = evaluate_module.evaluate_episodes, {"n": 0}

    def second_fails(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError("disk on fire")
        return real(*args, **kwargs)

    monkeypatch.setattr(evaluate_module, "evaluate_episodes", second_fails)
    out = tmp_path / "out"
    with pytest.raises(OSError, match="disk on fire"):
        evaluate_module.evaluate(trained, overrides=["train.tracking=mlflow"], shots=[1], seeds=[0, 1], episodes=4,
                                 out=out, figures=0, progress=False)  # fmt: skip
    partial = json.loads((out / "results.json").read_text())
    assert partial["complete"] is False and "disk on fire" in partial["error"]
    assert [(r["shot"], r["seed"]) for r in partial["rows"]] == [(1, 0)]
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("coco20i").experiment_id], "tags.`jc2a.kind` = 'eval'")
    assert run.info.status == "FAILED"


def test_mlflow_gets_the_rows_reports_and_figures(trained, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    from jc2a.runs.evaluate import evaluate

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    results = evaluate(trained, overrides=["train.tracking=mlflow"], shots=[1], seeds=[0], episodes=4,
                       out=tmp_path / "out", figures=1, progress=False)  # fmt: skip
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("coco20i").experiment_id], "tags.`jc2a.kind` = 'eval'")
    assert run.data.metrics["miou/fold0/1shot/seed0"] == pytest.approx(results["rows"][0]["miou"])
    assert run.data.metrics["fbiou/1shot/mean"] == pytest.approx(results["summary"][0]["fbiou_mean"])
    assert run.info.run_name == "eval-coco20i-f0-1shot-resnet18-jc2a"
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"results.json", "results.md", "figures"} <= artifacts
    assert [a.path for a in client.list_artifacts(run.info.run_id, "figures")] == ["figures/episode-0000.png"]


def test_eval_scores_final_and_best_weights(trained, tmp_path):
    """`--weights final best` scores both in one call: rows, summaries and results.md say which weights they are,
    the best/ rows are those of best/model.safetensors scored on its own, and the backbone's weights are named."""
    short = ["--shots", "1", "--seeds", "0", "--episodes", "4", "--figures", "0", "--no-progress"]
    assert main(["eval", "--checkpoint", str(trained), "--weights", "final", "best", "--out", str(tmp_path / "both"),
                 *short]) == 0  # fmt: skip
    both = json.loads((tmp_path / "both" / "results.json").read_text())
    assert [r["weights"] for r in both["rows"]] == ["final", "best"] and both["weights"] == ["final", "best"]
    assert {s["weights"] for s in both["summary"]} == {"final", "best"}
    assert both["checkpoints"]["0-best"] == str(trained / "best" / "model.safetensors")
    assert {r["backbone_weights"] for r in both["rows"]} == {"random init"}
    text = (tmp_path / "both" / "results.md").read_text()
    assert "final weights" in text and "best weights" in text and "selected on the test set" in text
    reset_accelerate_state()
    alone = tmp_path / "alone"
    assert main(["eval", "--checkpoint", str(trained / "best" / "model.safetensors"), "--out", str(alone),
                 *short]) == 0  # fmt: skip
    best = json.loads((alone / "results.json").read_text())["rows"][0]
    assert numbers({"rows": [both["rows"][1]]}) == numbers({"rows": [best]})


def test_best_weights_of_a_bare_model_file_are_refused(trained, capsys):
    assert main(["eval", "--checkpoint", str(trained / "model.safetensors"), "--weights", "best",
                 "--no-progress"]) == 2  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert "best/model.safetensors; give the run folder" in err and len(err.splitlines()) == 1


def test_heat_maps_are_cropped_to_the_image_and_scaled_within_it():
    """A map bright in the canvas padding only (what a non-square query's padding gives): the figure's heat is the
    image's region of the canvas, min-max scaled there, so the padding neither shows nor sets the scale."""
    import numpy as np

    from jc2a.runs.figures import crop_heat

    heat = np.ones((65, 65), np.float32)  # padding: 1.0
    heat[:40, :64] = np.linspace(0.1, 0.3, 64)[None, :]  # the image region: a ramp far below the padding
    part = crop_heat(heat, (40, 64))
    assert part.shape == (40, 64) and part.min() == 0.0 and part.max() == pytest.approx(1.0)
