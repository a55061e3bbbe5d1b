"""Config: defaults in one place, YAML bases, dotted overrides, one-line errors naming key and file."""

from __future__ import annotations

import copy
import time
import typing
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel

from jc2a.cli import main
from jc2a.config import (
    AugmentConfig,
    Config,
    ConfigError,
    DataConfig,
    flatten,
    load_config,
    reference_markdown,
    save_config,
    to_dict,
)

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
        (["data.eval_seeds=[]"], "data.eval_seeds", "must list 1 to 100 values"),
        (["data.augment.scale=[1.1,0.9]"], "data.augment.scale", "0 < low <= high"),
        (["data.augment.scale=[0,1]"], "data.augment.scale", "item 0 must be in (0, 10], got 0"),
        (["data.augment.scale=[0.9]"], "data.augment.scale", "[low, high]"),
        (["data.augment.rotate=[10,-10]"], "data.augment.rotate", "low <= high"),
        (["model.bins=[60,30,15,0]"], "model.bins", "item 3 must be in [1, 60], got 0"),
        (["model.hpam.topk=[60,20,5,0]"], "model.hpam.topk", "item 3 must be in [1, 3600]"),
        (["model.hpam.block=[4,3,3,-2]"], "model.hpam.block", "item 3 must be in [1, 60], got -2"),
        (["data.train_split=../train"], "data.train_split", "plain name"),
        (["model.bins=[60,30]"], "model.hpam.topk", "one value per bin (2, model.bins)"),
        (["model.bins=[8,4,2,1]", "model.hpam.block=[1,1,1]"], "model.hpam.block", "one value per bin (4,"),
    ],
    ids=["pool-below-shot", "no-eval-seeds", "scale-reversed", "scale-zero", "scale-one-value", "rotate-reversed",
         "bin-zero", "topk-zero", "block-negative", "split-path", "topk-per-bin", "block-per-bin"],
)  # fmt: skip
def test_cross_field_rules(overrides, key, words):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    msg = str(err.value)
    assert msg.startswith(f"command line: key '{key}'") and words in msg and "\n" not in msg, msg


def test_a_cross_field_error_is_blamed_on_where_the_key_was_set(tmp_path):
    base = tmp_path / "base.yaml"
    base.write_text("data: {support_pool: 4}\nmodel: {bins: [8, 4]}\n")
    # support_pool was set in the file, shot on the command line: the file is named (the key it checks)
    with pytest.raises(ConfigError, match=rf"^{base}: key 'data.support_pool' must be >= data.shot \(5\), got 4$"):
        load_config(base, ["data.shot=5", "model.hpam.topk=[1,1]", "model.hpam.block=[1,1]"])
    # topk never set: blamed on where model.bins (the key it is checked against) was set
    with pytest.raises(ConfigError, match=rf"^{base}: key 'model.hpam.topk' needs one value per bin \(2"):
        load_config(base, ["data.support_pool=8"])
    # both at their defaults, shot raised on the command line
    with pytest.raises(ConfigError, match=r"^command line: key 'data.support_pool' must be >= data.shot"):
        load_config(None, ["data.shot=64"])


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


# --------------------------------------------------------------------------- the schema: types, bounds, assignment

TOO_LARGE = [
    "data.shot=65", "data.image_size=4105", "data.image_size=800000000000000000000000000000000000001",
    "data.eval_episodes=10000001", "data.episodes_per_epoch=10000001", "data.num_workers=257",
    "data.min_pixels=16785410", "data.support_pool=4097", "data.shuffle_buffer=65537", "data.stream_timeout=1e9",
    "data.stream_failures=1000001", "data.remote_timeout=86401", "data.remote_retries=21", "data.fold=4",
    "data.augment.crop_retries=1001", "model.feat_dim=4097", "model.aux_weight=101", "train.seed=4294967296",
    "train.epochs=100001", "train.batch_size=1025", "train.lr=1e300", "train.lr_batch=1048577",
    "train.weight_decay=2", "train.power=1e9", "train.max_steps=1000000001", "train.grad_accum=1025",
    "train.clip_grad=1e7", "train.save_every=1000000001", "train.keep_checkpoints=1001",
    "train.val_every=1000000001", "train.val_episodes=10000001", "train.val_full_every=1000000001",
    "train.log_every=1000000001",
]  # fmt: skip


@pytest.mark.parametrize("override", TOO_LARGE)
def test_numbers_too_large_are_refused_at_load(override):
    key = override.split("=")[0]
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    msg = str(err.value)
    assert msg.startswith(f"command line: key '{key}' must be in ") and "\n" not in msg, msg


@pytest.mark.parametrize(
    "override,key,words",
    [
        ("data.augment.scale=[0.9,1e400]", "data.augment.scale", "item 1 must be in (0, 10], got inf"),
        ("data.augment.rotate=[-400,10]", "data.augment.rotate", "item 0 must be in [-360, 360]"),
        ("data.eval_seeds=[0,-1]", "data.eval_seeds", "item 1 must be in [0, 4294967295], got -1"),
        ("data.eval_seeds=[4294967296]", "data.eval_seeds", "item 0 must be in [0, 4294967295]"),
        ("model.bins=[60,30,15,8,4,2,1,1,1]", "model.bins", "must list 1 to 8 values"),
        ("model.bins=[61,30,15,8]", "model.bins", "item 0 must be in [1, 60], got 61"),
        ("model.bins=[]", "model.bins", "must list 1 to 8 values, got []"),
        ("train.output_dir=" + "x" * 5000, "train.output_dir", "must be 0 to 4096 characters long"),
    ],
)
def test_list_items_and_lengths_are_bounded(override, key, words):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    msg = str(err.value)
    assert msg.startswith(f"command line: key '{key}'") and words in msg and "\n" not in msg, msg


def test_a_huge_image_size_is_refused_at_load_and_by_jc2a_config(capsys):
    with pytest.raises(ConfigError, match=r"^command line: key 'data.image_size' expects an integer, got '8e37\+1'$"):
        load_config(None, ["data.image_size=8e37+1"])  # YAML reads it as a string
    with pytest.raises(ConfigError, match=r"^command line: key 'data.image_size' must be in \[9, 4097\], got 8"):
        load_config(None, [f"data.image_size={8 * 10**37 + 1}"])  # (size - 1) % 8 == 0, and far too large
    for value in ("8e37+1", str(8 * 10**37 + 1)):
        assert main(["config", f"data.image_size={value}"]) == 2
        out, err = capsys.readouterr()
        lines = err.strip().splitlines()
        assert out == "" and len(lines) == 1 and "'data.image_size'" in lines[0] and "command line" in lines[0], err


@pytest.mark.parametrize(
    "override,words",
    [
        ("model.backbone.frozen=1", "expects true/false, got 1"),  # no pydantic coercion of 1 / "yes" to a bool
        ("model.backbone.frozen='true'", "expects true/false, got 'true'"),
        ("data.fold=1.0", "expects an integer, got 1.0"),  # ints refuse floats...
        ("data.fold=false", "expects an integer, got False"),  # ...and bools
        ("data.fold='1'", "expects an integer, got '1'"),
        ("train.lr=true", "expects a number, got True"),
        ("train.lr=fast", "expects a number, got 'fast'"),
        ("train.experiment=7", "expects a string, got 7"),
        ("data.shards=null", "expects a string, got None"),  # None only where the type is Optional
        ("model.bins=[8,4.5,2,1]", "item 1 expects an integer, got 4.5"),  # list items keep their type
        ("model.bins=8", "expects a list of int, got 8"),
        ("data.augment.scale=[0.9,true]", "item 1 expects a number, got True"),
        ("data.dataset=coco", "must be one of ['coco20i', 'pascal5i'], got 'coco'"),
        ("data.augment=1", "expects a mapping, got 1"),
    ],
)
def test_strict_types(override, words):
    key = override.split("=")[0]
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    msg = str(err.value)
    assert msg.startswith(f"command line: key '{key}'") and msg.endswith(words) and "\n" not in msg, msg
    assert "Input should" not in msg and "validation error" not in msg  # pydantic's own text never reaches users


def test_what_strict_types_still_accept(tmp_path):
    cfg = load_config(None, ["train.lr=1", "train.weight_decay=1e-3", "model.backbone.weights=null",
                             "model.ckmm.bank_file=bank.safetensors", "data.augment.scale=[1, 2]"])  # fmt: skip
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)  # an int where a float is expected
    assert cfg.train.weight_decay == pytest.approx(1e-3)  # YAML 1.1 reads 1e-3 as a string
    assert cfg.model.backbone.weights is None and cfg.model.ckmm.bank_file == "bank.safetensors"
    assert cfg.data.augment.scale == [1.0, 2.0] and all(isinstance(v, float) for v in cfg.data.augment.scale)
    assert AugmentConfig(scale=(1.0, 1.5)).scale == [1.0, 1.5]  # a tuple in code is a list


def test_assignment_is_validated():
    cfg = load_config()
    cfg.data.shot = 5
    cfg.train.lr = 1  # int -> float, as from YAML
    assert cfg.data.shot == 5 and cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)
    with pytest.raises(ConfigError) as err:
        cfg.data.fold = 7
    assert str(err.value) == "assignment: key 'data.fold' must be in [0, 3], got 7"
    with pytest.raises(ConfigError, match=r"^assignment: key 'data.augment.rotate_p' must be in \[0, 1\], got 2$"):
        cfg.data.augment.rotate_p = 2
    with pytest.raises(ConfigError, match=r"^assignment: key 'model.backbone.frozen' expects true/false, got 'no'$"):
        cfg.model.backbone.frozen = "no"
    with pytest.raises(ConfigError, match=r"^assignment: key 'model.bins' item 0 expects an integer, got '8'$"):
        cfg.model.bins = ["8"]
    with pytest.raises(ConfigError, match=r"^assignment: unknown key 'data.foldd' \(did you mean 'fold'\?\)$"):
        cfg.data.foldd = 1
    assert cfg.data.fold == 0 and cfg.data.augment.rotate_p == 0.5 and cfg.model.bins == [60, 30, 15, 8]
    with pytest.raises(ConfigError, match=r"^arguments: key 'data.augment.flip_p' must be in \[0, 1\], got -1$"):
        AugmentConfig(flip_p=-1)
    with pytest.raises(ConfigError, match=r"^arguments: unknown key 'data.shots' \(did you mean 'shot'\?\)$"):
        DataConfig(shots=5)
    with pytest.raises(ConfigError, match=r"^arguments: key 'data.support_pool' must be >= data.shot"):
        Config(data=DataConfig(shot=64))


def test_copy_equality_and_dicts():
    cfg = load_config(ROOT / "configs/toy.yaml", ["data.fold=2"])
    twin = copy.deepcopy(cfg)
    assert twin == cfg and twin is not cfg and twin.data is not cfg.data
    twin.data.fold = 3
    assert twin != cfg and cfg.data.fold == 2
    plain = to_dict(cfg)
    assert plain["data"]["augment"]["scale"] == [0.9, 1.1] and type(plain["model"]["backbone"]) is dict
    assert flatten(cfg) == flatten(plain) and flatten(cfg)["model.hpam.topk"] == [60, 20, 5, 3]
    assert to_dict(cfg.train) == plain["train"]


# --------------------------------------------------------------------------- the reference, from the schema


def _leaves(cls=Config, prefix=""):
    for name, info in cls.model_fields.items():
        if isinstance(info.annotation, type) and issubclass(info.annotation, BaseModel):
            yield from _leaves(info.annotation, f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}", info


def test_reference_has_a_row_per_field_with_its_description():
    text = reference_markdown()
    rows = text.splitlines()[2:]
    leaves = dict(_leaves())
    assert len(rows) == len(leaves) == len(flatten(Config()))
    defaults = flatten(Config())
    for row, (key, info) in zip(rows, leaves.items()):
        assert info.description, f"{key} has no description"
        cells = [c.strip() for c in row.strip("|").split(" | ")]
        assert cells[0] == f"`{key}`" and cells[3] == info.description.replace("|", "\\|"), row
        shown = "null" if defaults[key] is None else yaml.safe_dump(defaults[key], default_flow_style=True)
        assert cells[2] == f"`{shown.removesuffix(chr(10)).removesuffix('...').strip()}`", row
    assert "| `data.fold` | int | `0` | 0..3 |" in rows
    assert "| `data.augment.scale` | list[float] | `[0.9, 1.1]` | RandScale range |" in rows
    assert "| `model.backbone.weights` | str | `null` | local weights file, for machines with no hub |" in rows
    assert "| `data.dataset` | str | `coco20i` | coco20i \\| pascal5i |" in rows


def test_every_choice_is_named_in_its_description():
    for key, info in _leaves():
        if typing.get_origin(info.annotation) is typing.Literal:
            for choice in typing.get_args(info.annotation):
                assert choice in info.description, f"{key}: {choice!r} is not described"


# --------------------------------------------------------------------------- files too large or too deep


def test_a_file_over_1_mib_is_refused_before_parsing(tmp_path):
    path = tmp_path / "big.yaml"
    path.write_bytes(b"#" * ((1 << 20) - 1) + b"\n")  # 1 MiB exactly: a (very long) comment still loads
    assert load_config(path) == Config()
    path.write_bytes(b"data: {fold: 1}\n" + b"#" * (1 << 20))
    with pytest.raises(ConfigError) as err:
        load_config(path)
    size = path.stat().st_size
    assert str(err.value) == f"{path}: is {size} bytes, more than a config file may be (1 MiB)"
    child = tmp_path / "child.yaml"
    child.write_text("_base_: big.yaml\n")
    with pytest.raises(ConfigError, match=r"big\.yaml: is \d+ bytes"):
        load_config(child)


@pytest.mark.parametrize(
    "text",
    [
        "data: " + "[" * 100_000 + "]" * 100_000 + "\n",
        "data: " + "{a: " * 100_000 + "1" + "}" * 100_000 + "\n",
        "data:\n" + "- " * 100_000 + "x\n",
    ],
    ids=["flow-lists", "flow-maps", "block-lists"],
)
def test_yaml_100000_deep_is_refused_fast(tmp_path, text):
    path = tmp_path / "deep.yaml"
    path.write_text(text)
    tick = time.perf_counter()
    with pytest.raises(ConfigError) as err:
        load_config(path)
    seconds = time.perf_counter() - tick
    msg = str(err.value)
    assert msg.startswith(f"{path}: is nested deeper than 32 levels (line ") and "\n" not in msg, msg
    assert seconds < 1, f"{seconds:.2f} s"
    with pytest.raises(ConfigError, match=r"^command line: key 'model.bins' is nested deeper than 32 levels"):
        load_config(None, ["model.bins=" + "[" * 100_000 + "]" * 100_000])


def test_depth_limit_and_aliases(tmp_path):
    path = tmp_path / "c.yaml"

    def nested(levels):  # `levels` mappings, the top one included
        return "".join("  " * i + "a:\n" for i in range(levels - 1)) + "  " * (levels - 1) + "a: 1\n"

    path.write_text(nested(32))
    with pytest.raises(ConfigError, match="unknown key 'a'"):  # 32 deep: parsed, then refused as a config
        load_config(path)
    path.write_text(nested(33))
    with pytest.raises(ConfigError, match=r"is nested deeper than 32 levels \(line 33\)"):
        load_config(path)
    # aliases nest without nesting in the text; a self-containing anchor nests forever
    chain = ["x0: &a0 [1]"] + [f"x{i}: &a{i} [*a{i - 1}]" for i in range(1, 40)]
    for text in ["\n".join(chain) + "\n", "data: &a [*a]\n"]:
        path.write_text(text)
        with pytest.raises(ConfigError, match="is nested deeper than 32 levels"):
            load_config(path)


def test_a_huge_value_from_aliases_is_refused_fast_and_shown_short(tmp_path):
    # a "billion laughs": 10 x 6**8 (17 million) strings through shared aliases, refused without expanding them
    flow = "{x: &a0 [x, x, x, x, x, x, x, x, x, x], "
    flow += ", ".join(f"y{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 6)}]" for i in range(1, 9)) + "}"
    path = tmp_path / "laughs.yaml"
    path.write_text(f"data:\n  shards: {flow}\n")
    for load in (lambda: load_config(path), lambda: load_config(None, [f"data.shards={flow}"])):
        tick = time.perf_counter()
        with pytest.raises(ConfigError) as err:
            load()
        msg = str(err.value)
        assert "key 'data.shards' expects a string, got {'x': ['x', " in msg and len(msg) < 400, msg
        assert time.perf_counter() - tick < 1


def test_names_resolve_to_the_shipped_presets(tmp_path, monkeypatch):
    """From any folder, `coco20i.yaml` / `fold/1.yaml` / `configs/fold/1.yaml` name the configs shipped with jc2a;
    a file of that name in the working folder wins."""
    from jc2a.presets import FOLDER

    monkeypatch.chdir(tmp_path)
    expected = load_config([FOLDER / "coco20i.yaml", FOLDER / "fold/1.yaml"])
    assert load_config(["coco20i.yaml", "fold/1.yaml"]) == expected == load_config(["configs/coco20i.yaml",
                                                                                    "configs/fold/1.yaml"])
    (tmp_path / "fold").mkdir()
    (tmp_path / "fold" / "1.yaml").write_text("data: {fold: 3}\n")
    assert load_config(["coco20i.yaml", "fold/1.yaml"]).data.fold == 3
    with pytest.raises(ConfigError, match="nope.yaml: config file not found"):
        load_config("nope.yaml")
