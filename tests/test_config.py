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
    files = sorted(p for p in (ROOT / "configs").rglob("*.yaml") if "accelerate" not in p.parts)  # not jc2a's
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


# --------------------------------------------------------------------------- ranges, checked before any work

OUT_OF_RANGE = [
    "train.lr=0", "train.lr=-1e-3", "train.lr=nan", "train.lr=.inf", "train.momentum=1", "train.momentum=-0.1",
    "train.weight_decay=-1e-4", "train.power=0", "train.epochs=0", "train.batch_size=0", "train.max_steps=-1",
    "train.grad_accum=0", "train.clip_grad=-1", "train.save_every=-1", "train.keep_checkpoints=0",
    "train.val_every=-1", "train.val_episodes=0", "train.log_every=0", "train.seed=-1",
    "data.augment.rotate_p=1.5", "data.augment.blur_p=-0.1", "data.augment.flip_p=2", "data.augment.crop_keep=1.01",
    "data.augment.crop_retries=0", "model.dropout=1.5", "model.feat_dim=0", "model.aux_weight=-1",
    "data.image_size=-7", "data.min_pixels=0", "data.eval_episodes=0", "data.support_pool=0",
    "data.shuffle_buffer=0", "data.num_workers=-1", "data.stream_timeout=0", "data.stream_failures=0",
    "data.remote_timeout=-1", "data.remote_retries=-1", "data.episodes_per_epoch=-1",
]  # fmt: skip


@pytest.mark.parametrize("override", OUT_OF_RANGE)
def test_numbers_out_of_range_are_refused(override):
    key = override.split("=")[0]
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    msg = str(err.value)
    assert msg.startswith(f"command line: key '{key}' must be ") and "\n" not in msg


@pytest.mark.parametrize(
    "overrides,key,words",
    [
        (["data.shot=5", "data.support_pool=4"], "data.support_pool", ">= data.shot"),
        (["data.eval_seeds=[]"], "data.eval_seeds", "at least one seed"),
        (["data.augment.scale=[1.1,0.9]"], "data.augment.scale", "0 < low <= high"),
        (["data.augment.scale=[0,1]"], "data.augment.scale", "0 < low <= high"),
        (["data.augment.scale=[0.9]"], "data.augment.scale", "[low, high]"),
        (["data.augment.rotate=[10,-10]"], "data.augment.rotate", "low <= high"),
        (["model.bins=[60,30,15,0]"], "model.bins", "positive"),
        (["model.hpam.topk=[60,20,5,0]"], "model.hpam.topk", "positive"),
        (["model.hpam.block=[4,3,3,-2]"], "model.hpam.block", "positive"),
        (["data.train_split=../train"], "data.train_split", "plain name"),
    ],
    ids=["pool-below-shot", "no-eval-seeds", "scale-reversed", "scale-zero", "scale-one-value", "rotate-reversed",
         "bin-zero", "topk-zero", "block-negative", "split-path"],
)  # fmt: skip
def test_cross_field_rules(overrides, key, words):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert f"key '{key}'" in str(err.value) and words in str(err.value)


def test_edges_that_are_allowed():
    cfg = load_config(None, ["train.momentum=0", "model.dropout=1", "train.max_steps=0", "data.remote_retries=0",
                             "data.augment.scale=[1,1]", "data.support_pool=1", "data.num_workers=0"])  # fmt: skip
    assert cfg.train.momentum == 0 and cfg.model.dropout == 1.0


# --------------------------------------------------------------------------- YAML files that are not plain configs


@pytest.mark.parametrize(
    "text,words",
    [
        ("data:\n  fold: 1\n  fold: 2\n", "line 3: is not valid YAML (duplicate key 'fold' (first on line 2))"),
        ("data: {fold: 1}\ntrain: {}\ndata: {shot: 5}\n", "line 3: is not valid YAML (duplicate key 'data'"),
        ("data:\n  1: x\n", "line 2: is not valid YAML (key 1 is not a string)"),
        ("? [a, b]\n: 1\n", "is not a string"),
        ("_base_: 3\n", "key '_base_' must be a path or a list of paths, got 3"),
        ("_base_: [base.yaml, 2]\n", "key '_base_' must be a path or a list of paths"),
        ("_base_: {a: 1}\n", "key '_base_' must be a path or a list of paths"),
        ("_base_: ''\n", "key '_base_' must be a path or a list of paths"),
    ],
    ids=["duplicate", "duplicate-top", "int-key", "list-key", "base-int", "base-list-int", "base-dict", "base-empty"],
)
def test_yaml_that_is_not_a_plain_config(tmp_path, text, words):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    msg = str(err.value)
    assert msg.startswith(f"{path}:") and words in msg and "\n" not in msg, msg


def test_yaml_anchors_and_merges_still_load(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(
        "data: &d {fold: 1, shot: 1}\nmodel: {bins: [8, 4, 2, 1], hpam: {topk: [1, 1, 1, 1], block: [1, 1, 1, 1]}}\n"
    )
    assert load_config(path).data.fold == 1


def test_not_utf8_and_a_folder_are_named(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("data: {shards: 'caf\u00e9'}\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=rf"^{path}: not UTF-8 text \(byte \d+\)$"):
        load_config(path)
    (tmp_path / "folder.yaml").mkdir()
    with pytest.raises(ConfigError, match=r"folder\.yaml: is a folder, not a config file$"):
        load_config(tmp_path / "folder.yaml")
    (tmp_path / "child.yaml").write_text("_base_: folder.yaml\n")
    with pytest.raises(ConfigError, match="is a folder"):
        load_config(tmp_path / "child.yaml")


def test_yes_no_on_off_stay_strings():
    # YAML 1.1 reads `no` as False: `train.mixed_precision=no` must mean the string "no"
    cfg = load_config(None, ["train.mixed_precision=no"])
    assert cfg.train.mixed_precision == "no"
    with pytest.raises(ConfigError, match="'model.backbone.frozen' expects true/false, got 'yes'"):
        load_config(None, ["model.backbone.frozen=yes"])
