"""The demo's simple baseline (`model.arch: prototype`): prototype matching beside JC2A, on the same backbone, loop,
loss and model files."""

from __future__ import annotations

from pathlib import Path

import torch

from jc2a.config import load_config
from jc2a.model import build_model
from jc2a.model.baseline import BaselineMaps, BaselineOutput, PrototypeBaseline

ROOT = Path(__file__).resolve().parents[1]
TOY = ROOT / "configs" / "toy.yaml"


def _batch(b=2, k=1, s=65):
    g = torch.Generator().manual_seed(0)
    query = torch.randint(0, 256, (b, 3, s, s), dtype=torch.uint8, generator=g)
    supports = torch.randint(0, 256, (b, k, 3, s, s), dtype=torch.uint8, generator=g)
    masks = torch.zeros(b, k, s, s, dtype=torch.uint8)
    masks[..., 10:40, 10:40] = 1
    masks[..., :2, :] = 255
    return query, supports, masks


def test_builds_from_the_config_and_segments():
    cfg = load_config(TOY, ["model.arch=prototype", "data.image_size=65", "model.backbone.name=regnetx_002"])
    torch.manual_seed(0)
    model = build_model(cfg)
    assert isinstance(model, PrototypeBaseline) and model.prototype_bank is None
    assert model.backbone.name == "regnetx_002" and model.feat_dim == cfg.model.feat_dim
    query, supports, masks = _batch()
    model.train()
    out = model(query, supports, masks)
    assert isinstance(out, BaselineOutput) and out.logits.shape == (2, 2, 65, 65) and out.aux_logits == ()
    target = torch.randint(0, 2, (2, 65, 65), dtype=torch.uint8)
    loss = model.loss(out, target)
    loss.backward()
    assert torch.isfinite(loss) and model.head[0].weight.grad is not None
    model.eval()
    logits = model(query, supports, masks)
    maps = model(query, supports, masks, return_maps=True)
    assert isinstance(maps, BaselineMaps) and torch.allclose(maps.logits, logits)
    assert maps.maps["foreground"].shape == (2, 65, 65) and maps.maps["similarity"].shape[:2] == (2, 1)


def test_k_shots_fuse_as_jc2a_does():
    """K identical supports give the one-shot prediction (the mean of K equal softmaxes)."""
    cfg = load_config(TOY, ["model.arch=prototype", "data.image_size=65"])
    model = build_model(cfg).eval()
    query, supports, masks = _batch()
    one = model(query, supports, masks).softmax(1)
    five = model(query, supports.repeat(1, 5, 1, 1, 1), masks.repeat(1, 5, 1, 1)).softmax(1)
    assert torch.allclose(one, five, atol=1e-5)


def test_trains_and_loads_through_the_runs(coco_shards, tmp_path):
    """`jc2a train` and `load_trained_model` take it as they take JC2A (no CKMM bank is built for it)."""
    from jc2a.runs.network import load_trained_model
    from jc2a.runs.train import train

    run = tmp_path / "run"
    cfg = load_config(TOY, [f"data.shards={coco_shards}", f"train.output_dir={run}", "model.arch=prototype",
                            "model.ckmm.enabled=false", "train.max_steps=2", "train.val_every=0",
                            "train.val_episodes=2", "train.tracking=none", "data.min_pixels=200"])  # fmt: skip
    train(cfg, progress=False)
    assert (run / "model.safetensors").is_file() and not (run / "bank.safetensors").exists()
    model, loaded = load_trained_model(run)
    assert isinstance(model, PrototypeBaseline) and loaded.model.arch == "prototype"
