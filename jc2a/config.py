"""Typed configuration: defaults in one place, YAML files with `_base_`, dotted command-line overrides."""

from __future__ import annotations

import dataclasses
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional, Union

import yaml

__all__ = [
    "Config",
    "ConfigError",
    "DataConfig",
    "ModelConfig",
    "load_config",
    "save_config",
    "to_dict",
    "flatten",
]


class ConfigError(ValueError):
    """A configuration problem; its message is one line naming the key and the file."""


# --------------------------------------------------------------------------- schema


@dataclass
class AugmentConfig:
    """PFENet's training augmentation (SPEC §1 Transforms)."""

    scale: list[float] = field(default_factory=lambda: [0.9, 1.1])  # RandScale range
    rotate: list[float] = field(default_factory=lambda: [-10.0, 10.0])  # RandRotate degrees
    rotate_p: float = 0.5  # probability of a rotation
    blur_p: float = 0.5  # Gaussian blur 5x5
    flip_p: float = 0.5  # horizontal flip
    crop_retries: int = 30  # random crop retries to keep the target
    crop_keep: float = 0.85  # fraction of the target's pixels a crop must keep


@dataclass
class DataConfig:
    """Where episodes come from and how they are drawn (SPEC §1)."""

    dataset: str = "coco20i"  # coco20i | pascal5i
    fold: int = 0  # 0..3
    shot: int = 1  # K supports per episode
    shards: str = "shards/coco"  # folder or URL holding <split>-%06d.tar and <split>-index.json
    train_split: str = "train"  # shard name prefix of the training split
    val_split: str = "val"  # shard name prefix of the evaluation split
    image_size: int = 473  # square crop / canvas; (size - 1) % 8 == 0
    eval_resize: str = "resize"  # evaluation canvas: resize (PFENet's configs: also upscales) | test_resize
    min_pixels: int = 2048  # 2*32*32, PFENet's filter on a usable (image, class) pair
    protocol: str = "pfenet"  # episode semantics: pfenet (the paper's, default) | hsnet
    filter_novel: bool = False  # BAM: drop training images holding any novel-class pixel
    episodes_per_epoch: int = 0  # training episodes per epoch over all ranks; 0 = one per qualifying image
    eval_episodes: int = 1000  # per fold (the paper; PFENet's code: 5000 PASCAL, 20000 COCO)
    eval_seeds: list[int] = field(default_factory=lambda: [0])  # one episode list per seed
    support_pool: int = 32  # bounded per-class pool of support candidates in the training stream
    shuffle_buffer: int = 256  # sample shuffle buffer of the training stream
    num_workers: int = 2  # loader worker processes
    stream_timeout: float = 60.0  # seconds a stream may go without an episode before it stops with an error
    stream_failures: int = 20  # consecutive unreadable shards or records before a stream stops with an error
    remote_timeout: float = 60.0  # seconds for one remote read (http, pipe:) before it is retried
    remote_retries: int = 3  # retries of a failed remote read, with exponential back-off
    augment: AugmentConfig = field(default_factory=AugmentConfig)


@dataclass
class BackboneConfig:
    """A timm CNN used as a four-stage, stride-8 feature extractor (SPEC §2 Backbone)."""

    name: str = "resnet50.tv_in1k"  # a timm CNN with four stages and dilation; .tv_in1k: torchvision's weights
    pretrained: bool = True  # timm's pretrained weights (hub or local file)
    weights: Optional[str] = None  # local weights file, for machines with no hub
    frozen: bool = True  # requires_grad_(False) and kept in eval()
    train_bn: bool = False  # PFENet: the frozen backbone's BatchNorm in train mode (batch statistics, moving)


@dataclass
class HPAMConfig:
    """Hybrid Prototype Alignment Module (Eqs. 1-10) and its ablation switches."""

    p2p: bool = True  # point-to-point alignment, Eq. 3
    p2b: bool = True  # point-to-block alignment, Eqs. 4-9
    pos_embed: bool = True  # learnable position embeddings of P2B, Eq. 4
    attention: str = "linear_relu"  # linear_relu (ours) | softmax (NA) | linear_bn (NLA) | cosine
    merge: str = "add"  # hybrid prototype, Eq. 10: add | concat | multiply
    topk: list[int] = field(default_factory=lambda: [60, 20, 5, 3])  # k_l, finest bin to coarsest
    block: list[int] = field(default_factory=lambda: [4, 3, 3, 2])  # block size m per bin


@dataclass
class CKMMConfig:
    """Class-agnostic Knowledge Mining Module (Eqs. 11-13)."""

    enabled: bool = True  # CKMM on (its class-agnostic map joins MIA, Eq. 14)
    reduce: str = "mean"  # mean (Eq. 13) | max over the base classes
    bank_file: Optional[str] = None  # a saved prototype bank to reuse


@dataclass
class ModelConfig:
    """The JC2A network (SPEC §2)."""

    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    feat_dim: int = 256  # C, reduced mid-level feature width
    dropout: float = 0.5  # Dropout2d after the mid-level reductions (PFENet)
    bins: list[int] = field(default_factory=lambda: [60, 30, 15, 8])  # pyramid bins for a 473 input
    hpam: HPAMConfig = field(default_factory=HPAMConfig)
    ckmm: CKMMConfig = field(default_factory=CKMMConfig)
    pfenet_prior: bool = False  # PFENet's class-specific prior mask (peer baseline, Table 5)
    mia: str = "concat"  # Multiple Information Aggregation, Eq. 14: concat | add | multiply
    aux_weight: float = 1.0  # weight of the per-bin auxiliary CE


@dataclass
class TrainConfig:
    """Optimisation and run bookkeeping (SPEC §3)."""

    seed: int = 321  # initial weights and every episode stream
    output_dir: str = "runs/default"  # the run folder: config, bank, checkpoints, model, metrics
    epochs: int = 50  # PFENet: 50 (COCO), 200 (PASCAL)
    batch_size: int = 4  # per process
    lr: float = 0.025  # per global batch of lr_batch: PFENet's effective lr (0.0025 configured x scale_lr 10)
    lr_batch: int = 4  # the global batch `lr` is written for (PFENet and the paper: 4 on one GPU)
    scale_lr: bool = True  # lr x global batch / lr_batch, global batch = processes x batch_size x grad_accum
    momentum: float = 0.9  # SGD
    weight_decay: float = 1e-4  # SGD
    power: float = 0.9  # poly schedule
    mixed_precision: str = "fp16"  # no | fp16 | bf16 (accelerate)
    cpu_fp16: bool = False  # fp16 on a CPU too (torch autocast + GradScaler; slow): tests fp16 numerics without a GPU
    max_steps: int = 0  # optimizer steps in all; 0 = epochs x batches per epoch. Fixes the poly schedule
    grad_accum: int = 1  # micro-batches per optimizer step (accelerate's gradient accumulation)
    clip_grad: float = 0.0  # max gradient norm; 0 = no clipping
    save_every: int = 500  # steps between checkpoints (and one at the end)
    keep_checkpoints: int = 2  # most recent checkpoints kept under output_dir/checkpoints
    val_every: int = 500  # steps between validations; 0 = only at the end
    val_episodes: int = 200  # validation: this prefix of the evaluation episode list (novel classes)
    val_full_every: int = 0  # steps between validations on the whole list (data.eval_episodes); picks best/; 0 = off
    log_every: int = 10  # steps between logged metrics
    tracking: str = "mlflow"  # mlflow | none
    experiment: str = ""  # MLflow experiment; "" = the dataset name
    deterministic: bool = False  # torch.use_deterministic_algorithms: bit-identical resumes on CPU
    trace_ranks: bool = False  # each rank writes its query keys and a parameter digest per step to <run>/trace/


@dataclass
class Config:
    """The whole resolved configuration of a run."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


# --------------------------------------------------------------------------- validation


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str, source: str) -> Any:
    """Check `value` against the annotation `tp`; ints are accepted where floats are expected."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], key, source)
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{source}: key '{key}' expects a list of {_type_name(item_tp)}, got {value!r}")
        return [_coerce(v, item_tp, f"{key}[{i}]", source) for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{source}: key '{key}' expects true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{source}: key '{key}' expects an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads `1e-3` (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{source}: key '{key}' expects a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{source}: key '{key}' expects a string, got {value!r}")
        return value
    raise ConfigError(f"{source}: key '{key}' has an unsupported type {_type_name(tp)}")


def _apply(obj: Any, updates: dict, source: str, sources: dict[str, str], prefix: str = "") -> None:
    """Write a nested dict of updates into the dataclass `obj`, checking every key and type.

    `sources` records which file (or the command line) set each dotted key last.
    """
    if not isinstance(updates, dict):
        raise ConfigError(f"{source}: key '{prefix.rstrip('.') or '<top>'}' expects a mapping, got {updates!r}")
    hints = typing.get_type_hints(type(obj))
    names = {f.name for f in dataclasses.fields(obj)}
    for name, value in updates.items():
        key = f"{prefix}{name}"
        if name not in names:
            raise ConfigError(f"{source}: unknown key '{key}'{_suggest(name, names)}")
        tp = hints[name]
        if _is_dataclass_type(tp):
            _apply(getattr(obj, name), value, source, sources, key + ".")
        else:
            setattr(obj, name, _coerce(value, tp, key, source))
            sources[key] = source


def _suggest(name: str, names: Iterable[str]) -> str:
    import difflib

    close = difflib.get_close_matches(name, sorted(names), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _ranges(cfg: Config) -> dict[str, tuple[Any, Any]]:
    """Dotted key -> (value, rule) for every numeric field; a rule is a predicate with a `__doc__` naming it."""

    def rule(test: Any, text: str) -> Any:
        test.__doc__ = text
        return test

    positive = rule(lambda v: v > 0, "> 0")
    count = rule(lambda v: v >= 1, ">= 1")
    non_negative = rule(lambda v: v >= 0, ">= 0")
    probability = rule(lambda v: 0 <= v <= 1, "in [0, 1]")
    d, a, m, t = cfg.data, cfg.data.augment, cfg.model, cfg.train
    return {
        "data.fold": (d.fold, rule(lambda v: 0 <= v <= 3, "0..3")),
        "data.shot": (d.shot, count),
        "data.image_size": (d.image_size, positive),
        "data.min_pixels": (d.min_pixels, count),
        "data.episodes_per_epoch": (d.episodes_per_epoch, non_negative),
        "data.eval_episodes": (d.eval_episodes, count),
        "data.support_pool": (d.support_pool, rule(lambda v: v >= max(1, d.shot), ">= data.shot")),
        "data.shuffle_buffer": (d.shuffle_buffer, count),
        "data.num_workers": (d.num_workers, non_negative),
        "data.stream_timeout": (d.stream_timeout, positive),
        "data.stream_failures": (d.stream_failures, count),
        "data.remote_timeout": (d.remote_timeout, positive),
        "data.remote_retries": (d.remote_retries, non_negative),
        "data.augment.rotate_p": (a.rotate_p, probability),
        "data.augment.blur_p": (a.blur_p, probability),
        "data.augment.flip_p": (a.flip_p, probability),
        "data.augment.crop_retries": (a.crop_retries, count),
        "data.augment.crop_keep": (a.crop_keep, probability),
        "model.feat_dim": (m.feat_dim, count),
        "model.dropout": (m.dropout, probability),
        "model.aux_weight": (m.aux_weight, non_negative),
        "train.seed": (t.seed, non_negative),
        "train.epochs": (t.epochs, count),
        "train.batch_size": (t.batch_size, count),
        "train.lr": (t.lr, positive),
        "train.lr_batch": (t.lr_batch, count),
        "train.momentum": (t.momentum, rule(lambda v: 0 <= v < 1, "in [0, 1)")),
        "train.weight_decay": (t.weight_decay, non_negative),
        "train.power": (t.power, positive),
        "train.max_steps": (t.max_steps, non_negative),
        "train.grad_accum": (t.grad_accum, count),
        "train.clip_grad": (t.clip_grad, non_negative),
        "train.save_every": (t.save_every, non_negative),
        "train.keep_checkpoints": (t.keep_checkpoints, count),
        "train.val_every": (t.val_every, non_negative),
        "train.val_episodes": (t.val_episodes, count),
        "train.val_full_every": (t.val_full_every, non_negative),
        "train.log_every": (t.log_every, count),
    }


def _check(cfg: Config, sources: dict[str, str]) -> None:
    """Cross-field rules that a type alone cannot express; errors name where the offending key was set."""

    def source(*keys: str) -> str:
        return next((sources[k] for k in keys if k in sources), "defaults")

    def fail(key: str, text: str, *also: str) -> None:
        raise ConfigError(f"{source(key, *also)}: key '{key}' {text}")

    choices = {
        "data.dataset": (cfg.data.dataset, {"coco20i", "pascal5i"}),
        "model.hpam.attention": (cfg.model.hpam.attention, {"linear_relu", "softmax", "linear_bn", "cosine"}),
        "model.hpam.merge": (cfg.model.hpam.merge, {"add", "concat", "multiply"}),
        "model.ckmm.reduce": (cfg.model.ckmm.reduce, {"mean", "max"}),
        "model.mia": (cfg.model.mia, {"concat", "add", "multiply"}),
        "train.mixed_precision": (cfg.train.mixed_precision, {"no", "fp16", "bf16"}),
        "data.protocol": (cfg.data.protocol, {"pfenet", "hsnet"}),
        "data.eval_resize": (cfg.data.eval_resize, {"resize", "test_resize"}),
        "train.tracking": (cfg.train.tracking, {"mlflow", "none"}),
    }
    for key, (value, allowed) in choices.items():
        if value not in allowed:
            fail(key, f"must be one of {sorted(allowed)}, got {value!r}")
    for key, (value, rule) in _ranges(cfg).items():
        if isinstance(value, float) and not math.isfinite(value) or not rule(value):
            fail(key, f"must be {rule.__doc__}, got {value!r}", *(("data.shot",) if key == "data.support_pool" else ()))
    if (cfg.data.image_size - 1) % 8 != 0:
        fail("data.image_size", f"must satisfy (size - 1) % 8 == 0 (473, 641, 129...), got {cfg.data.image_size}")
    for key in ("data.train_split", "data.val_split"):
        value = getattr(cfg.data, key.split(".")[1])
        if not re.fullmatch(r"[A-Za-z0-9_]+", value):
            fail(key, f"must be a plain name of letters, digits and '_', got {value!r}")
    if not cfg.data.shards:
        fail("data.shards", "must name a folder, URL or pattern, got ''")
    if not cfg.data.eval_seeds:
        fail("data.eval_seeds", "must list at least one seed")
    if any(seed < 0 for seed in cfg.data.eval_seeds):
        fail("data.eval_seeds", f"must hold seeds >= 0, got {cfg.data.eval_seeds}")
    scale, rotate = cfg.data.augment.scale, cfg.data.augment.rotate
    if len(scale) != 2 or not all(math.isfinite(v) and v > 0 for v in scale) or scale[0] > scale[1]:
        fail("data.augment.scale", f"must be [low, high] with 0 < low <= high, got {scale}")
    if len(rotate) != 2 or not all(math.isfinite(v) for v in rotate) or rotate[0] > rotate[1]:
        fail("data.augment.rotate", f"must be [low, high] degrees with low <= high, got {rotate}")
    bins = cfg.model.bins
    if not bins or not all(b > 0 for b in bins):
        fail("model.bins", f"must list positive bin sizes, got {bins}")
    for key in ("topk", "block"):
        values = getattr(cfg.model.hpam, key)
        if len(values) != len(bins):
            fail(
                f"model.hpam.{key}",
                f"needs one value per bin ({len(bins)}, model.bins), got {values}",
                "model.bins",
            )
        if not all(v > 0 for v in values):
            fail(f"model.hpam.{key}", f"must hold positive values, got {values}")
    if not cfg.model.backbone.name:
        fail("model.backbone.name", "must name a timm model, got ''")


# --------------------------------------------------------------------------- loading


class _StrictLoader(yaml.SafeLoader):
    """PyYAML's safe loader (plain data only, no Python objects) that also refuses duplicate and non-string keys."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[str, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor` merges are allowed
                continue
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if not isinstance(key, str):
                raise yaml.constructor.ConstructorError(None, None, f"key {key!r} is not a string", key_node.start_mark)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key '{key}' (first on line {seen[key]})", key_node.start_mark
                )
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


# YAML 1.2 booleans: only true/false. YAML 1.1 also reads yes/no/on/off as booleans, which turned
# `train.mixed_precision=no` into False; here they stay strings (and a bool field given `yes` is refused by name).
_StrictLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_StrictLoader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)


def _load_yaml(text: str, where: str) -> Any:
    """Plain data from YAML text; ConfigError naming `where` and the line on a syntax error, a duplicate or
    non-string key, or a tag that asks for a Python object."""
    try:
        return yaml.load(text, Loader=_StrictLoader)  # a SafeLoader subclass: plain data only
    except yaml.YAMLError as exc:
        line = getattr(getattr(exc, "problem_mark", None), "line", None)
        at = f" line {line + 1}:" if line is not None else ""
        raise ConfigError(f"{where}:{at} is not valid YAML ({getattr(exc, 'problem', None) or exc})") from None


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> list[tuple[dict, str]]:
    """The layers of a YAML file, its `_base_` files first; each layer with the file it came from."""
    if path.is_dir():
        raise ConfigError(f"{path}: is a folder, not a config file")
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    if path.resolve() in seen:
        raise ConfigError(f"{path}: '_base_' cycle through {' -> '.join(map(str, seen))}")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    data = _load_yaml(text, str(path)) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    bases = data.pop("_base_", [])
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, list) or not all(isinstance(b, str) and b.strip() for b in bases):
        raise ConfigError(f"{path}: key '_base_' must be a path or a list of paths, got {bases!r}")
    layers: list[tuple[dict, str]] = []
    for base in bases:
        layers += _read_yaml(path.parent / base, seen + (path.resolve(),))
    layers.append((data, str(path)))
    return layers


def _parse_override(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise ConfigError(f"command line: override '{text}' is not of the form key=value")
    key, raw = text.split("=", 1)
    if not key.strip():
        raise ConfigError(f"command line: override '{text}' has no key")
    try:
        value = _load_yaml(raw, "command line") if raw != "" else ""
    except ConfigError:
        if re.search(r"^\s*[\[{!]", raw):  # meant as structured YAML: say why it is not
            raise ConfigError(f"command line: override '{text}': the value is not valid YAML") from None
        value = raw
    return key.strip(), value


def _nest(key: str, value: Any) -> dict:
    out: Any = value
    for part in reversed(key.split(".")):
        out = {part: out}
    return out


def load_config(
    path: Union[str, os.PathLike, None, Iterable[Union[str, os.PathLike]]] = None,
    overrides: Iterable[str] = (),
) -> Config:
    """Resolve a configuration.

    Args:
        path: a YAML file, several applied in order, or None for the defaults (= `configs/base.yaml`).
        overrides: dotted `key=value` strings applied last, e.g. `("data.fold=1", "model.bins=[8,4]")`.
    """
    cfg = Config()
    if path is None:
        paths: list = []
    elif isinstance(path, (str, os.PathLike)):
        paths = [path]
    else:
        paths = list(path)
    sources: dict[str, str] = {}
    for p in paths:
        for layer, source in _read_yaml(Path(p)):
            _apply(cfg, layer, source, sources)
    for text in overrides:
        key, value = _parse_override(text)
        _apply(cfg, _nest(key, value), "command line", sources)
    _check(cfg, sources)
    return cfg


def to_dict(cfg: Any) -> dict:
    """A plain nested dict of a config (or of one of its sections)."""
    return dataclasses.asdict(cfg)


def flatten(cfg: Any, prefix: str = "") -> dict[str, Any]:
    """`{"data.fold": 0, ...}`: the flat form that experiment trackers take as params."""
    out: dict[str, Any] = {}
    for key, value in (to_dict(cfg) if dataclasses.is_dataclass(cfg) else cfg).items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def save_config(cfg: Config, path: Union[str, os.PathLike]) -> Path:
    """Write the resolved config as YAML (atomically) and return its path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    os.replace(tmp, path)
    return path


# --------------------------------------------------------------------------- reference


def reference_markdown() -> str:
    """Every key of the configuration with its type, default and the comment beside its field in this module,
    as a markdown table: the README's config reference is this text (a test keeps the two equal)."""
    import inspect
    import re

    def comments(cls: type) -> dict[str, str]:
        found = {}
        for line in inspect.getsource(cls).splitlines():
            match = re.match(r"\s+(\w+): [^=]+=.*?#\s*(.*)$", line)
            if match:
                found[match.group(1)] = match.group(2).strip()
        return found

    rows = ["| key | type | default | meaning |", "|---|---|---|---|"]

    def walk(cls: type, obj: Any, prefix: str) -> None:
        hints, notes = typing.get_type_hints(cls), comments(cls)
        for f in dataclasses.fields(cls):
            value, tp = getattr(obj, f.name), hints[f.name]
            if _is_dataclass_type(tp):
                walk(tp, value, f"{prefix}{f.name}.")
                continue
            shown = "null" if value is None else yaml.safe_dump(value, default_flow_style=True).strip()
            shown = shown.removesuffix("...").strip()
            kind = re.sub(r"typing\.|Optional\[(.*)\]|Union\[(\w+), NoneType\]", r"\1\2", str(tp))
            kind = re.sub(r"<class '(\w+)'>", r"\1", kind)
            note = notes.get(f.name, "").replace("|", "\\|")
            rows.append(f"| `{prefix}{f.name}` | {kind} | `{shown}` | {note} |")

    walk(Config, Config(), "")
    return "\n".join(rows) + "\n"
