"""Shared fixtures: one toy COCO dataset and its shards per test session; a fresh accelerate state per test."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def toy_coco(tmp_path_factory) -> Path:
    """A toy COCO 2014 folder: train2014/, val2014/, annotations/."""
    from jc2a.data.toy import write_toy_coco

    root = tmp_path_factory.mktemp("toy") / "coco"
    write_toy_coco(root, train_images=120, val_images=240, size=128, seed=0)
    return root


@pytest.fixture(scope="session")
def coco_shards(toy_coco, tmp_path_factory) -> Path:
    """The toy data as shards, bounded small so each split has several."""
    from jc2a.data.coco import CocoSource
    from jc2a.data.shards import write_shards

    out = tmp_path_factory.mktemp("shards") / "coco"
    for split in ("train", "val"):
        source = CocoSource(toy_coco / f"{split}2014", toy_coco / "annotations" / f"instances_{split}2014.json")
        write_shards(source, out, split, "coco", source.class_names, max_shard_bytes=400_000, progress=False)
    return out


@pytest.fixture()
def toy_cfg(coco_shards):
    """The toy config pointed at the session's shards."""
    from jc2a.config import load_config

    root = Path(__file__).resolve().parents[1]
    return load_config(root / "configs" / "toy.yaml", [f"data.shards={coco_shards}", "data.min_pixels=200"])


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """Every test that makes an Accelerator in this process gets a new accelerate state; deterministic
    algorithms (a training option) are off again after it, and no MLflow run stays active (a test that timed out
    mid-run must not fail the next one's tracking)."""
    yield
    import sys

    if "accelerate" in sys.modules:
        from jc2a.runs.session import reset_accelerate_state

        reset_accelerate_state()
    if "torch" in sys.modules:
        sys.modules["torch"].use_deterministic_algorithms(False)
    if "mlflow" in sys.modules and sys.modules["mlflow"].active_run() is not None:  # a test stopped mid-run
        sys.modules["mlflow"].end_run(status="KILLED")


@pytest.fixture
def jc2a_handlers():
    """A run's `setup_logging` adds its stderr handler to the `jc2a` logger while capsys holds stderr; the
    handler would outlive the capture and write to a closed stream in later tests: put the handlers back after."""
    logger = logging.getLogger("jc2a")
    saved = list(logger.handlers)
    yield
    logger.handlers[:] = saved
