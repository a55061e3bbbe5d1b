"""The global batch and the learning rate scaled with it (PFENet's effective lr), and `jc2a config`'s launch line."""

from __future__ import annotations

from pathlib import Path

import pytest

from jc2a.config import load_config
from jc2a.runs.schedule import batch_plan, poly

ROOT = Path(__file__).resolve().parents[1]


def test_the_default_recipe_trains_at_pfenets_effective_lr():
    """PFENet's PASCAL config: base_lr 0.0025 x scale_lr 10 (every group, index_split=-1) at batch 4 on one GPU."""
    cfg = load_config(ROOT / "configs/pascal5i.yaml")
    plan = batch_plan(cfg.train, processes=1)
    assert (plan.global_batch, plan.effective_lr) == (4, pytest.approx(0.025))
    # PFENet's COCO config, batch 32 over 4 GPUs, 0.02 x 10: the same linear rule
    coco = batch_plan(load_config(ROOT / "configs/coco20i.yaml", ["train.batch_size=8"]).train, processes=4)
    assert coco.global_batch == 32 and coco.effective_lr == pytest.approx(0.02 * 10)


@pytest.mark.parametrize(
    "processes, batch, accum, expected",
    [(1, 4, 1, 0.025), (2, 2, 1, 0.025), (2, 4, 1, 0.05), (1, 4, 2, 0.05), (8, 4, 1, 0.2), (1, 1, 1, 0.00625)],
)
def test_lr_scales_linearly_with_the_global_batch(processes, batch, accum, expected):
    cfg = load_config(None, [f"train.batch_size={batch}", f"train.grad_accum={accum}"])
    plan = batch_plan(cfg.train, processes)
    assert plan.global_batch == processes * batch * accum
    assert plan.effective_lr == pytest.approx(expected)


def test_scaling_can_be_turned_off_and_the_papers_literal_lr_is_a_named_option():
    off = load_config(None, ["train.scale_lr=false", "train.batch_size=8"])
    assert batch_plan(off.train, 2).effective_lr == pytest.approx(0.025)
    paper = load_config([ROOT / "configs/base.yaml", ROOT / "configs/recipe/paper_lr.yaml"])
    assert batch_plan(paper.train, 1).effective_lr == pytest.approx(0.0025)


def test_describe_names_every_factor():
    text = batch_plan(load_config(None, ["train.grad_accum=2"]).train, 2).describe()
    assert "2 process(es) x batch 4 x accumulation 2 = global batch 16" in text and "effective lr 0.1" in text


def test_poly_decays_to_zero_over_the_planned_steps():
    f = poly(10, 0.9)
    assert f(0) == 1.0 and f(10) == 0.0 and f(12) == 0.0 and f(5) == pytest.approx(0.5**0.9)


def test_jc2a_config_prints_the_launch(capsys):
    from jc2a.cli import main

    assert main(["config", "--processes", "2", "train.batch_size=2"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[-1] == (
        "# launch: 2 process(es) x batch 2 x accumulation 1 = global batch 4 episodes per step; lr 0.025 per 4 "
        "episodes x 4/4 = effective lr 0.025"
    )
    import yaml

    assert yaml.safe_load(out)["train"]["lr"] == 0.025  # still a loadable config
