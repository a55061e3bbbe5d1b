"""Config: defaults in one place, YAML bases, dotted overrides, one-line errors naming key and file."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from jc2a.cli import main
from jc2a.config import Config, ConfigError, flatten, load_config, save_config

ROOT = Path(__file__).resolve().parents[1]


def test_base_yaml_is_the_defaults():
    cfg = load_config(ROOT / "configs/base.yaml")
    assert cfg == Config() == load_config()
    written = flatten(yaml.safe_load((ROOT / "configs/base.yaml").read_text()))
    assert set(written) == set(flatten(Config())), "configs/base.yaml must list every key"


def test_every_config_file_loads():
    files = sorted((ROOT / "configs").rglob("*.yaml"))
    assert len(files) >= 10
    for path in files:
        load_config([ROOT / "configs/base.yaml", path])


def test_composition_and_overrides():
    cfg = load_config(
        [ROOT / "configs/pascal5i.yaml", ROOT / "configs/fold/2.yaml", ROOT / "configs/shot/5.yaml"],
        ["model.backbone.name=resnet101", "model.hpam.topk=[10,5,3,2]", "train.lr=1e-3"],
    )
    assert (cfg.data.dataset, cfg.data.fold, cfg.data.shot, cfg.train.epochs) == ("pascal5i", 2, 5, 200)
    assert cfg.model.backbone.name == "resnet101" and cfg.model.hpam.topk == [10, 5, 3, 2]
    assert cfg.train.lr == pytest.approx(1e-3) and isinstance(cfg.train.lr, float)


def test_unknown_key_names_key_and_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  hpam:\n    top_k: [1, 2, 3, 4]\n")
    with pytest.raises(ConfigError) as err:
        load_config(bad)
    msg = str(err.value)
    assert "model.hpam.top_k" in msg and str(bad) in msg and "topk" in msg and "\n" not in msg


def test_wrong_type_and_bad_value(tmp_path):
    bad = tmp_path / "t.yaml"
    bad.write_text("data: {fold: one}\n")
    with pytest.raises(ConfigError, match=r"t\.yaml: key 'data\.fold' expects an integer"):
        load_config(bad)
    with pytest.raises(ConfigError, match=r"command line: key 'data.shot' expects an integer"):
        load_config(None, ["data.shot=true"])
    with pytest.raises(ConfigError, match="^command line: key 'data.image_size'"):
        load_config(ROOT / "configs/toy.yaml", ["data.image_size=474"])  # blamed on where the value came from
    base = tmp_path / "base.yaml"
    base.write_text("data: {image_size: 100}\n")
    child = tmp_path / "child.yaml"
    child.write_text("_base_: base.yaml\ndata: {fold: 1}\n")
    with pytest.raises(ConfigError, match=r"base\.yaml: key 'data.image_size'"):
        load_config(child)
    with pytest.raises(ConfigError, match="model.hpam.attention"):
        load_config(None, ["model.hpam.attention=quadratic"])
    with pytest.raises(ConfigError, match="one value per bin"):
        load_config(None, ["model.bins=[60,30]"])


def test_missing_file_and_cycle(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml: config file not found"):
        load_config(tmp_path / "nope.yaml")
    (tmp_path / "a.yaml").write_text("_base_: b.yaml\n")
    (tmp_path / "b.yaml").write_text("_base_: a.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(tmp_path / "a.yaml")


def test_save_round_trip(tmp_path):
    cfg = load_config(ROOT / "configs/toy.yaml", ["data.fold=3"])
    path = save_config(cfg, tmp_path / "run" / "config.yaml")
    assert load_config(path) == cfg


def test_cli_reports_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: {foldd: 1}\n")
    assert main(["preview", "--config", str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "data.foldd" in err[0] and str(bad) in err[0]
