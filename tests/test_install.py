"""A non-editable install: the wheel in a fresh venv runs the demo and finds its configs from an empty folder."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from jc2a.runs.demo import ROWS

ROOT = Path(__file__).resolve().parents[1]


def run(cmd: list, cwd: Path, timeout: int = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)
    return proc


@pytest.fixture(scope="module")
def fresh(tmp_path_factory) -> Path:
    """A new venv holding only jc2a's wheel; its dependencies (torch is 5 GB) come from this venv's site-packages
    through a .pth path line (which does not run this venv's editable-install hook, so jc2a itself is the wheel's)."""
    tmp = tmp_path_factory.mktemp("install")
    built = run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", tmp / "dist", ROOT],
                cwd=tmp)  # fmt: skip
    assert built.returncode == 0, built.stderr[-3000:]
    (wheel,) = (tmp / "dist").glob("jc2a-*.whl")
    venv = tmp / "venv"
    made = run([sys.executable, "-m", "venv", venv], cwd=tmp)
    assert made.returncode == 0, made.stderr
    site = Path(run([venv / "bin/python", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                    cwd=tmp).stdout.strip())  # fmt: skip
    (site / "_jc2a_test_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    installed = run([venv / "bin/python", "-m", "pip", "install", "--no-deps", "--no-index", wheel], cwd=tmp)
    assert installed.returncode == 0, installed.stderr[-3000:]
    return venv


@pytest.mark.slow
def test_the_wheel_runs_the_demo_from_an_empty_folder(fresh, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    where = run([fresh / "bin/python", "-c", "import jc2a, sys; print(jc2a.__file__)"], cwd=tmp_path, env=env)
    assert where.stdout.strip().startswith(str(fresh)), where.stdout + where.stderr  # the wheel, not the checkout
    empty = tmp_path / "empty"
    empty.mkdir()
    demo = run([fresh / "bin/jc2a", "demo", "--out", "demo", "--train-images", "60", "--val-images", "200",
                "--steps", "3", "--episodes", "6", "--no-progress", "train.val_every=0", "train.val_episodes=4"],
               cwd=empty, env=env, timeout=900)  # fmt: skip
    assert demo.returncode in (0, 1), demo.stdout[-2000:] + demo.stderr[-4000:]  # 1: the learning targets, unmet
    assert "where everything is:" in demo.stdout
    learning = json.loads((empty / "demo/run/eval/learning.json").read_text())
    assert set(learning["scores"]) == set(ROWS) and set(learning["scores"][ROWS[0]]) == {"1", "5"}
    assert (empty / "demo/run/eval/results.md").is_file()


@pytest.mark.slow
def test_the_wheel_resolves_shipped_presets(fresh, tmp_path):
    """`--config coco20i.yaml --config fold/1.yaml` (and `configs/...` as the README writes them) name the presets
    shipped in the wheel when no such file is in the working folder."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for names in (["coco20i.yaml", "fold/1.yaml"], ["configs/coco20i.yaml", "configs/fold/1.yaml"]):
        args = [a for name in names for a in ("--config", name)]
        shown = run([fresh / "bin/jc2a", "config", *args], cwd=tmp_path, env=env)
        assert shown.returncode == 0, shown.stderr
        assert "fold: 1" in shown.stdout and "dataset: coco20i" in shown.stdout
    missing = run([fresh / "bin/jc2a", "config", "--config", "nope.yaml"], cwd=tmp_path, env=env)
    assert missing.returncode == 2 and "nope.yaml: config file not found" in missing.stderr
