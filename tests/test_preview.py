"""`jc2a preview`: training and evaluation episodes saved as pictures, with the resolved config beside them."""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from jc2a.cli import main

ROOT = Path(__file__).resolve().parents[1]


def test_preview_writes_episode_pictures(coco_shards, tmp_path):
    out = tmp_path / "preview"
    args = ["preview", "--config", str(ROOT / "configs/toy.yaml"), "--out", str(out), "--episodes", "2",
            f"data.shards={coco_shards}", "data.min_pixels=200"]  # fmt: skip
    assert main(args) == 0
    names = sorted(p.name for p in out.glob("*.png"))
    assert names == ["eval-000.png", "eval-001.png", "train-000.png", "train-001.png"]
    with Image.open(out / "train-000.png") as im:
        assert im.width > 200 and len(set(im.convert("L").getdata())) > 20  # a picture, not a blank page
    assert (out / "config.yaml").is_file()
