"""`jc2a pretrain`: the stand-in for ImageNet pretraining writes weights the backbone loads strictly, the same file
for the same seed, reused from the cache; refused recipes say why."""

from __future__ import annotations

import argparse
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file

from jc2a.config import load_config
from jc2a.model.backbone import state_shapes
from jc2a.presets import preset
from jc2a.runs import pretrain as pt
from jc2a.runs.network import build_network

TINY = pt.Recipe(arch="regnetx_002", images=40, size=40, crop=32, steps=3, batch_size=8)


def test_weights_load_strictly_into_the_demo_backbone(tmp_path):
    path = tmp_path / "w.safetensors"
    summary = pt.pretrain(path, TINY, progress=False)
    tensors = load_file(path)
    assert set(tensors) == set(state_shapes("regnetx_002"))  # the features' keys, no classifier head
    assert summary["recipe"]["arch"] == "regnetx_002" and 0 <= summary["top1"] <= 100
    assert pt.read_summary(path) == summary and summary["format"] == pt.FORMAT
    cfg = load_config(preset("demo.yaml"), [f"model.backbone.weights={path}", "model.backbone.name=regnetx_002"])
    model = build_network(cfg)
    assert model.backbone.weights_source.startswith(f"file:{path.name} sha256:")
    own = model.backbone.features.state_dict()
    assert all(torch.equal(own[k], tensors[k]) for k in tensors)
    assert model.backbone.frozen and not any(p.requires_grad for p in model.backbone.parameters())


def test_same_seed_same_weights_other_seed_differs_and_the_cache_reuses(tmp_path):
    a = pt.pretrain(tmp_path / "a.safetensors", TINY, progress=False)
    b = pt.pretrain(tmp_path / "b.safetensors", TINY, progress=False)
    pt.pretrain(tmp_path / "c.safetensors", replace(TINY, seed=1), progress=False)
    ta, tb, tc = (load_file(tmp_path / f"{n}.safetensors") for n in "abc")
    assert all(torch.equal(ta[k], tb[k]) for k in ta) and a["top1"] == b["top1"]
    assert not all(torch.equal(ta[k], tc[k]) for k in ta)
    path, first = pt.cached(tmp_path / "cache", TINY, progress=False)
    assert path.name == f"{TINY.key()}.safetensors" and not first["reused"]
    assert "regnetx_002-toy2-seed0-" in TINY.key()  # architecture, toy version and seed name the file
    mtime = path.stat().st_mtime_ns
    again, second = pt.cached(tmp_path / "cache", TINY, progress=False)
    assert again == path and second["reused"] and path.stat().st_mtime_ns == mtime
    other, third = pt.cached(tmp_path / "cache", replace(TINY, steps=4), progress=False)
    assert other != path and not third["reused"]
    (tmp_path / "cache" / "junk.safetensors").write_bytes(b"not a file")
    assert pt.read_summary(tmp_path / "cache" / "junk.safetensors") is None


@pytest.mark.parametrize(
    "bad, message",
    [(dict(crop=64), "--crop"), (dict(version=3), "version 3"), (dict(images=5), "--images"),
     (dict(background=1.0), "background"), (dict(optimizer="lamb"), "optimizer")],
)  # fmt: skip
def test_bad_recipes_are_refused(tmp_path, bad, message):
    with pytest.raises(ValueError, match=message):
        pt.pretrain(tmp_path / "x.safetensors", replace(TINY, **bad), progress=False)
    assert not (tmp_path / "x.safetensors").exists()


def test_command_line(tmp_path, capsys, jc2a_handlers):
    parser = argparse.ArgumentParser()
    pt.add_arguments(parser)
    args = parser.parse_args(["--out", str(tmp_path / "w.safetensors"), "--arch", "regnetx_002", "--images", "40",
                              "--size", "40", "--crop", "32", "--steps", "2", "--batch-size", "8", "--no-progress"])
    assert pt.run(args) == 0
    line = capsys.readouterr().out
    assert "model.backbone.name=regnetx_002 model.backbone.weights=" in line and (tmp_path / "w.safetensors").is_file()
    defaults = parser.parse_args(["--out", "x"])
    assert (defaults.arch, defaults.toy_version, defaults.seed) == (pt.Recipe().arch, 2, 0)
