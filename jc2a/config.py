"""Typed configuration: every option declared once, YAML files with `_base_`, dotted command-line overrides.

Each option is one pydantic field: its type (strict: no coercion of `"yes"` or `1` to a bool, of `1.0` or `true` to
an int), its default, its allowed range or choices (`Field(ge=..., le=...)`, `Literal[...]`, constraints on list
items) and its meaning (`description`, which `reference_markdown()` and so the README show). The few rules that tie
two options together are in `_CROSS_FIELD`. Every error a user sees is one line naming where the offending value
was set (a YAML file, "command line", "defaults", or "assignment" for `cfg.data.shot = 5` in code) and its key.
"""

import difflib
import os
import re
import reprlib
import types
import typing
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union

import annotated_types
import yaml
from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, ValidationError
from pydantic.fields import FieldInfo
from pydantic_core import PydanticCustomError

from jc2a.errors import UserError

__all__ = [
    "AugmentConfig",
    "BackboneConfig",
    "CKMMConfig",
    "Config",
    "ConfigError",
    "DataConfig",
    "HPAMConfig",
    "ModelConfig",
    "TrainConfig",
    "flatten",
    "load_config",
    "reference_markdown",
    "save_config",
    "to_dict",
    "where_set",
]

MAX_FILE_BYTES = 1 << 20  # a config file (or one override) larger than this is refused before it is parsed
MAX_DEPTH = 32  # YAML collections nested deeper than this are refused before anything is constructed
MAX_COUNT = 10**7  # episodes, images: counts far beyond any dataset
MAX_STEPS = 10**9  # optimizer steps and step intervals
MAX_SEED = 2**32 - 1  # numpy's legacy seeding (accelerate's set_seed) takes seeds below 2**32
PATH_CHARS = 4096  # PATH_MAX
NAME_CHARS = 255  # one file name
# PIL's own hard limit with its default Image.MAX_IMAGE_PIXELS (DecompressionBombError above 2 x 89,478,485): the
# pixel limit stays below it, so PIL never refuses an image the limit lets through
PIL_PIXEL_CEILING = 2 * (1024 * 1024 * 1024 // 4 // 3)
TRUSTED_SOURCES = ("command line", "assignment", "arguments", "defaults")  # where_set() values that are no file


class ConfigError(UserError):
    """A configuration problem; its message is one line naming the key and the file."""


# --------------------------------------------------------------------------- field types


def _yaml_number(value: Any) -> Any:
    """YAML 1.1 reads `1e-3` (no dot) as a string: a string that Python reads as a float is that float."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def _as_list(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def _rule(test: Callable[[Any], bool], text: str) -> AfterValidator:
    """A rule on one field that a range cannot express; `text` completes "must ...", e.g. "be a plain name"."""

    def check(value: Any) -> Any:
        if not test(value):
            raise PydanticCustomError("jc2a_rule", "{rule}", {"rule": text})
        return value

    return AfterValidator(check)


# The model config below is strict: bool only True/False, int no float or bool, str only str. A float field takes
# ints and numeric strings; a list field takes a list (or a tuple) of its item type.
Float = Annotated[float, BeforeValidator(_yaml_number)]
Probability = Annotated[Float, Field(ge=0, le=1)]


def _list(item: Any, *rules: Any) -> Any:
    return Annotated[list[item], BeforeValidator(_as_list), *rules]


def _interval(low_high: list[float]) -> bool:
    return len(low_high) == 2 and low_high[0] <= low_high[1]


PlainName = Annotated[
    str, _rule(lambda v: re.fullmatch(r"[A-Za-z0-9_]+", v) is not None, "be a plain name of letters, digits and '_'")
]
# keys that may differ between a run and its resumption: they change no number the run computes (logging, how
# often it validates or checkpoints, where it is, how many loader workers: the episodes do not depend on them)
RESUME_FREE_KEYS = (
    "data.num_workers",
    "train.experiment",
    "train.keep_checkpoints",
    "train.log_every",
    "train.output_dir",
    "train.register_model",
    "train.save_every",
    "train.trace_ranks",
    "train.tracking",
    "train.val_episodes",
    "train.val_every",
    "train.val_full_every",
)
# the trackers accelerate's `log_with` knows (accelerate.utils.LoggerType); whether one is installed is checked when
# a run starts
TRACKERS = ("aim", "clearml", "comet_ml", "dvclive", "mlflow", "swanlab", "tensorboard", "trackio", "wandb")
Trackers = Annotated[
    str,
    _rule(
        lambda v: v == "none" or (bool(v) and all(t in TRACKERS for t in v.split(","))),
        "be none or trackers joined by ',' from " + ", ".join(TRACKERS),
    ),
]
ImageSize = Annotated[int, _rule(lambda v: (v - 1) % 8 == 0, "satisfy (size - 1) % 8 == 0 (473, 641, 129...)")]
Scale = _list(Annotated[Float, Field(gt=0, le=10)], _rule(_interval, "be [low, high] with 0 < low <= high"))
Degrees = _list(Annotated[Float, Field(ge=-360, le=360)], _rule(_interval, "be [low, high] degrees with low <= high"))
Seeds = _list(Annotated[int, Field(ge=0, le=MAX_SEED)])
Bins = _list(Annotated[int, Field(ge=1, le=60)])  # for a 473 input (layer4 60x60): a bin is at most the map
TopK = _list(Annotated[int, Field(ge=1, le=60 * 60)])  # at most the blocks of a 60x60 bin
Blocks = _list(Annotated[int, Field(ge=1, le=60)])  # at most the bin
PER_BIN = dict(min_length=1, max_length=8)


class _Section(BaseModel):
    """A section of the configuration: unknown keys refused, every assignment validated (one-line ConfigError)."""

    model_config = ConfigDict(
        extra="forbid", validate_assignment=True, validate_default=True, strict=True, allow_inf_nan=False
    )

    def __init__(self, /, **values: Any) -> None:
        try:
            super().__init__(**values)
        except ValidationError as exc:
            raise _translate(exc, type(self), lambda key: "arguments") from None

    def __setattr__(self, name: str, value: Any) -> None:
        _assign(self, name, value, "assignment")


def _assign(obj: _Section, name: str, value: Any, source: str) -> None:
    """`obj.name = value`, validated; a ConfigError naming `source` and the dotted key if the value is refused."""
    fields = type(obj).model_fields
    if name not in fields and not name.startswith("_"):
        raise ConfigError(f"{source}: unknown key '{_dotted(type(obj), name)}'{_suggest(name, fields)}")
    try:
        BaseModel.__setattr__(obj, name, value)
    except ValidationError as exc:
        raise _translate(exc, type(obj), lambda key: source) from None
    if name in fields:  # a new dict each time: copies of the section do not share it
        object.__setattr__(obj, "_jc2a_where", {**obj.__dict__.get("_jc2a_where", {}), name: source})


def where_set(section: _Section, name: str) -> str:
    """Where the key `name` of a section was set last: a YAML file's path, "command line", "assignment" (code),
    or "defaults" (never set, or set when the section was built). Kept beside the fields in the instance's
    `__dict__`, which pydantic's equality and dumps ignore (it is no field)."""
    return section.__dict__.get("_jc2a_where", {}).get(name, "defaults")


# --------------------------------------------------------------------------- schema


class AugmentConfig(_Section):
    """PFENet's training augmentation (docs/PROTOCOL.md)."""

    scale: Scale = Field(default_factory=lambda: [0.9, 1.1], description="RandScale range")
    rotate: Degrees = Field(default_factory=lambda: [-10.0, 10.0], description="RandRotate degrees")
    rotate_p: Probability = Field(0.5, description="probability of a rotation")
    blur_p: Probability = Field(0.5, description="Gaussian blur 5x5")
    flip_p: Probability = Field(0.5, description="horizontal flip")
    crop_retries: int = Field(30, ge=1, le=1000, description="random crop retries to keep the target")
    crop_keep: Probability = Field(0.85, description="fraction of the target's pixels a crop must keep")


class DataConfig(_Section):
    """Where episodes come from and how they are drawn (docs/PROTOCOL.md)."""

    dataset: Literal["coco20i", "pascal5i"] = Field("coco20i", description="coco20i | pascal5i")
    fold: int = Field(0, ge=0, le=3, description="0..3")
    shot: int = Field(1, ge=1, le=64, description="K supports per episode")
    shards: str = Field(
        "shards/coco",
        min_length=1,
        max_length=PATH_CHARS,
        description="folder or URL holding <split>-%06d.tar and <split>-index.json",
    )
    train_split: PlainName = Field(
        "train", max_length=NAME_CHARS, description="shard name prefix of the training split"
    )
    val_split: PlainName = Field("val", max_length=NAME_CHARS, description="shard name prefix of the evaluation split")
    image_size: ImageSize = Field(473, ge=9, le=4097, description="square crop / canvas; (size - 1) % 8 == 0")
    eval_resize: Literal["resize", "test_resize"] = Field(
        "resize", description="evaluation canvas: resize (PFENet's configs: also upscales) | test_resize"
    )
    min_pixels: int = Field(
        2048, ge=1, le=4097 * 4097, description="2*32*32, PFENet's filter on a usable (image, class) pair"
    )
    protocol: Literal["pfenet", "hsnet"] = Field(
        "pfenet", description="episode semantics: pfenet (the paper's, default) | hsnet"
    )
    filter_novel: bool = Field(False, description="BAM: drop training images holding any novel-class pixel")
    episodes_per_epoch: int = Field(
        0,
        ge=0,
        le=MAX_COUNT,
        description="training episodes per epoch over all ranks; 0 = one per qualifying image",
    )
    eval_episodes: int = Field(
        1000, ge=1, le=MAX_COUNT, description="per fold (the paper; PFENet's code: 5000 PASCAL, 20000 COCO)"
    )
    eval_seeds: Seeds = Field(
        default_factory=lambda: [0], min_length=1, max_length=100, description="one episode list per seed"
    )
    support_pool: int = Field(
        32, ge=1, le=4096, description="bounded per-class pool of support candidates in the training stream"
    )
    shuffle_buffer: int = Field(256, ge=1, le=65536, description="sample shuffle buffer of the training stream")
    num_workers: int = Field(2, ge=0, le=256, description="loader worker processes")
    stream_timeout: Float = Field(
        60.0,
        gt=0,
        le=86400,
        description="seconds a stream may go without an episode before it stops with an error",
    )
    stream_failures: int = Field(
        20,
        ge=1,
        le=10**6,
        description="consecutive unreadable shards or records before a stream stops with an error",
    )
    remote_timeout: Float = Field(
        60.0, gt=0, le=86400, description="seconds for one remote read (http, pipe:) before it is retried"
    )
    remote_retries: int = Field(
        3, ge=0, le=20, description="retries of a failed remote read, with exponential back-off"
    )
    allow_pipe: bool = Field(
        False,
        description="run a pipe: data.shards set in a config file; counts only when set on the command line",
    )
    max_image_pixels: int = Field(
        160_000_000,
        ge=1,
        le=PIL_PIXEL_CEILING,
        description="largest image (width x height) decoded anywhere (shards, training, eval, predict), "
        "checked from its header",
    )
    augment: AugmentConfig = Field(default_factory=AugmentConfig)


class BackboneConfig(_Section):
    """A timm CNN used as a four-stage, stride-8 feature extractor (docs/PROTOCOL.md)."""

    name: str = Field(
        "resnet50.tv_in1k",
        min_length=1,
        max_length=NAME_CHARS,
        description="a timm CNN with four stages and dilation; .tv_in1k: torchvision's weights",
    )
    pretrained: bool = Field(True, description="timm's pretrained weights (hub or local file)")
    weights: Optional[str] = Field(
        None, max_length=PATH_CHARS, description="local weights file, for machines with no hub"
    )
    frozen: bool = Field(True, description="requires_grad_(False) and kept in eval()")
    train_bn: bool = Field(
        False,
        description="PFENet: the frozen backbone's BatchNorm in train mode (batch statistics, moving)",
    )


class HPAMConfig(_Section):
    """Hybrid Prototype Alignment Module (Eqs. 1-10) and its ablation switches."""

    p2p: bool = Field(True, description="point-to-point alignment, Eq. 3")
    p2b: bool = Field(True, description="point-to-block alignment, Eqs. 4-9")
    pos_embed: bool = Field(True, description="learnable position embeddings of P2B, Eq. 4")
    attention: Literal["linear_relu", "softmax", "linear_bn", "cosine"] = Field(
        "linear_relu", description="linear_relu (ours) | softmax (NA) | linear_bn (NLA) | cosine"
    )
    merge: Literal["add", "concat", "multiply"] = Field(
        "add", description="hybrid prototype, Eq. 10: add | concat | multiply"
    )
    topk: TopK = Field(default_factory=lambda: [60, 20, 5, 3], **PER_BIN, description="k_l, finest bin to coarsest")
    block: Blocks = Field(default_factory=lambda: [4, 3, 3, 2], **PER_BIN, description="block size m per bin")


class CKMMConfig(_Section):
    """Class-agnostic Knowledge Mining Module (Eqs. 11-13)."""

    enabled: bool = Field(True, description="CKMM on (its class-agnostic map joins MIA, Eq. 14)")
    reduce: Literal["mean", "max"] = Field("mean", description="mean (Eq. 13) | max over the base classes")
    bank_file: Optional[str] = Field(None, max_length=PATH_CHARS, description="a saved prototype bank to reuse")


class ModelConfig(_Section):
    """The JC2A network (docs/PROTOCOL.md)."""

    arch: Literal["jc2a", "prototype"] = Field(
        "jc2a",
        description="jc2a (the paper's network) | prototype (the demo's simple baseline: masked-average support "
        "prototypes, cosine with the query, a small head; PANet / SG-One)",
    )
    backbone: BackboneConfig = Field(default_factory=BackboneConfig)
    feat_dim: int = Field(256, ge=1, le=4096, description="C, reduced mid-level feature width")
    dropout: Probability = Field(0.5, description="Dropout2d after the mid-level reductions (PFENet)")
    bins: Bins = Field(default_factory=lambda: [60, 30, 15, 8], **PER_BIN, description="pyramid bins for a 473 input")
    hpam: HPAMConfig = Field(default_factory=HPAMConfig)
    ckmm: CKMMConfig = Field(default_factory=CKMMConfig)
    pfenet_prior: bool = Field(False, description="PFENet's class-specific prior mask (peer baseline, Table 5)")
    mia: Literal["concat", "add", "multiply"] = Field(
        "concat", description="Multiple Information Aggregation, Eq. 14: concat | add | multiply"
    )
    aux_weight: Float = Field(1.0, ge=0, le=100, description="weight of the per-bin auxiliary CE")


class TrainConfig(_Section):
    """Optimisation and run bookkeeping (docs/PROTOCOL.md)."""

    seed: int = Field(321, ge=0, le=MAX_SEED, description="initial weights and every episode stream")
    output_dir: str = Field(
        "runs/default",
        max_length=PATH_CHARS,
        description="the run folder: config, bank, checkpoints, model, metrics",
    )
    epochs: int = Field(50, ge=1, le=100_000, description="PFENet: 50 (COCO), 200 (PASCAL)")
    batch_size: int = Field(4, ge=1, le=1024, description="per process")
    lr: Float = Field(
        0.025,
        gt=0,
        le=100,
        description="per global batch of lr_batch: PFENet's effective lr (0.0025 configured x scale_lr 10)",
    )
    lr_batch: int = Field(
        4,
        ge=1,
        le=1 << 20,
        description="the global batch `lr` is written for (PFENet and the paper: 4 on one GPU)",
    )
    scale_lr: bool = Field(
        True, description="lr x global batch / lr_batch, global batch = processes x batch_size x grad_accum"
    )
    momentum: Float = Field(0.9, ge=0, lt=1, description="SGD")
    weight_decay: Float = Field(1e-4, ge=0, le=1, description="SGD")
    power: Float = Field(0.9, gt=0, le=100, description="poly schedule")
    mixed_precision: Literal["no", "fp16", "bf16"] = Field("fp16", description="no | fp16 | bf16 (accelerate)")
    cpu_fp16: bool = Field(
        False,
        description="fp16 on a CPU too (torch autocast + GradScaler; slow): tests fp16 numerics without a GPU",
    )
    max_steps: int = Field(
        0,
        ge=0,
        le=MAX_STEPS,
        description="optimizer steps in all; 0 = epochs x batches per epoch. Fixes the poly schedule",
    )
    grad_accum: int = Field(
        1, ge=1, le=1024, description="micro-batches per optimizer step (accelerate's gradient accumulation)"
    )
    clip_grad: Float = Field(0.0, ge=0, le=1e6, description="max gradient norm; 0 = no clipping")
    save_every: int = Field(500, ge=0, le=MAX_STEPS, description="steps between checkpoints (and one at the end)")
    keep_checkpoints: int = Field(
        2, ge=1, le=1000, description="most recent checkpoints kept under output_dir/checkpoints"
    )
    val_every: int = Field(500, ge=0, le=MAX_STEPS, description="steps between validations; 0 = only at the end")
    val_episodes: int = Field(
        200,
        ge=1,
        le=MAX_COUNT,
        description="validation: this prefix of the evaluation episode list (novel classes)",
    )
    val_full_every: int = Field(
        0,
        ge=0,
        le=MAX_STEPS,
        description="steps between validations on the whole list (data.eval_episodes); picks best/; 0 = off",
    )
    log_every: int = Field(10, ge=1, le=MAX_STEPS, description="steps between logged metrics")
    tracking: Trackers = Field(
        "mlflow", description="mlflow | tensorboard | mlflow,tensorboard (any accelerate tracker installed) | none"
    )
    experiment: str = Field("", max_length=NAME_CHARS, description='MLflow experiment; "" = the dataset name')
    deterministic: bool = Field(False, description="torch.use_deterministic_algorithms: bit-identical resumes on CPU")
    trace_ranks: bool = Field(
        False,
        description="each rank writes its query keys and a parameter digest per step to <run>/trace/",
    )
    init_from: Optional[str] = Field(
        None,
        max_length=PATH_CHARS,
        description="a trained run folder or model file: its weights (and CKMM bank where it fits) start this run",
    )
    register_model: Optional[str] = Field(
        None, max_length=NAME_CHARS, description="register the final model under this name in MLflow's registry"
    )


class Config(_Section):
    """The whole resolved configuration of a run."""

    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)

    def __init__(self, /, **values: Any) -> None:
        super().__init__(**values)
        _check(self, {}, "arguments" if values else "defaults")


# --------------------------------------------------------------------------- rules across fields

# (key, the other keys it is checked against, test, what it must be): an error is blamed on where the key was set,
# else where the first other key was set, else "defaults".
_CROSS_FIELD: list[tuple[str, tuple[str, ...], Callable[[Config], bool], Callable[[Config], str]]] = [
    (
        "data.support_pool",
        ("data.shot",),
        lambda c: c.data.support_pool >= c.data.shot,
        lambda c: f"must be >= data.shot ({c.data.shot}), got {c.data.support_pool}",
    ),
    *(
        (
            f"model.hpam.{name}",
            ("model.bins",),
            lambda c, name=name: len(getattr(c.model.hpam, name)) == len(c.model.bins),
            lambda c, name=name: (
                f"needs one value per bin ({len(c.model.bins)}, model.bins), got {getattr(c.model.hpam, name)}"
            ),
        )
        for name in ("topk", "block")
    ),
]


def _check(cfg: Config, sources: dict[str, str], fallback: str = "defaults") -> None:
    """The rules that tie options together; each option alone was validated when it was set."""
    for key, others, test, text in _CROSS_FIELD:
        if not test(cfg):
            source = next((sources[k] for k in (key, *others) if k in sources), fallback)
            raise ConfigError(f"{source}: key '{key}' {text(cfg)}")


# --------------------------------------------------------------------------- validation errors -> one line

_SHOW = reprlib.Repr()
_SHOW.maxlevel, _SHOW.maxlist, _SHOW.maxtuple, _SHOW.maxdict, _SHOW.maxset = 3, 8, 8, 8, 8
_SHOW.maxstring, _SHOW.maxother, _SHOW.maxlong = 80, 80, 60


def _show(value: Any, limit: int = 160) -> str:
    """A bounded repr: a value built from YAML aliases may be huge or nested."""
    text = _SHOW.repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _section_type(tp: Any) -> Optional[type]:
    return tp if isinstance(tp, type) and issubclass(tp, _Section) else None


def _prefixes() -> dict[type, str]:
    """Section class -> its dotted prefix in `Config` (each section class appears once)."""
    out: dict[type, str] = {Config: ""}
    todo = [Config]
    while todo:
        cls = todo.pop()
        for name, info in cls.model_fields.items():
            sub = _section_type(info.annotation)
            if sub is not None:
                out[sub] = f"{out[cls]}{name}."
                todo.append(sub)
    return out


def _dotted(cls: type, name: str) -> str:
    return f"{_PREFIX.get(cls, '')}{name}"


def _suggest(name: str, names: Iterable[str]) -> str:
    close = difflib.get_close_matches(name, sorted(names), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _strip(tp: Any) -> tuple[Any, list[Any]]:
    """(the type under `Annotated`, its metadata with any FieldInfo flattened into its constraints)."""
    meta: list[Any] = []
    while typing.get_origin(tp) is Annotated:
        tp, *extra = typing.get_args(tp)
        for m in extra:
            meta.extend(m.metadata if isinstance(m, FieldInfo) else [m])
    return tp, meta


def _kind(tp: Any) -> str:
    """The type as the reference shows it: `int`, `list[float]`, a choice as `str`, Optional[str] as `str`."""
    tp, _ = _strip(tp)
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return type(args[0]).__name__
    if origin in (Union, types.UnionType):
        return _kind(next(a for a in args if a is not type(None)))
    if origin is list:
        return f"list[{_kind(args[0])}]"
    return getattr(tp, "__name__", str(tp))


def _number(value: Any) -> str:
    return str(int(value)) if isinstance(value, float) and value.is_integer() and abs(value) < 1e15 else str(value)


def _range(meta: Iterable[Any]) -> str:
    """`in [0, 1]`, `in (0, 60]`, `>= 1` from a field's (or a list item's) bounds."""
    low = high = None
    for m in meta:
        if isinstance(m, annotated_types.Ge):
            low = ("[", m.ge)
        elif isinstance(m, annotated_types.Gt):
            low = ("(", m.gt)
        elif isinstance(m, annotated_types.Le):
            high = ("]", m.le)
        elif isinstance(m, annotated_types.Lt):
            high = (")", m.lt)
    if low and high:
        return f"in {low[0]}{_number(low[1])}, {_number(high[1])}{high[0]}"
    if low:
        return f"{'>=' if low[0] == '[' else '>'} {_number(low[1])}"
    if high:
        return f"{'<=' if high[0] == ']' else '<'} {_number(high[1])}"
    return "a finite number"


def _lengths(meta: Iterable[Any]) -> tuple[Any, Any]:
    low = next((m.min_length for m in meta if isinstance(m, annotated_types.MinLen)), 0)
    high = next((m.max_length for m in meta if isinstance(m, annotated_types.MaxLen)), None)
    return low, high


_EXPECTS = {
    "int": "an integer",
    "float": "a number",
    "bool": "true/false",
    "string": "a string",
}


def _translate(exc: ValidationError, cls: type, source_of: Callable[[str], str]) -> ConfigError:
    """pydantic's (multi-line) ValidationError as one line: `<source>: key '<dotted key>' <what is wrong>`."""
    err = exc.errors(include_url=False)[0]
    kind, ctx, value = err["type"], err.get("ctx") or {}, err.get("input")
    parts: list[str] = []
    info: Optional[FieldInfo] = None
    index: Optional[int] = None
    owner: Optional[type] = None  # the section holding the last key part
    section: Optional[type] = cls
    for part in err["loc"]:
        if isinstance(part, int):
            if info is not None and index is None:
                index = part
        elif section is not None:
            parts.append(part)
            owner, info = section, section.model_fields.get(part)
            section = _section_type(info.annotation) if info is not None else None
            if info is None:
                break
    key = _PREFIX.get(cls, "") + ".".join(parts)
    if not parts or owner is None:  # not expected: an error of a whole section
        return ConfigError(
            f"{source_of(key)}: {_PREFIX.get(cls, '').rstrip('.') or 'config'} {' '.join(err['msg'].split())}"
        )
    if kind == "extra_forbidden" or info is None:
        return ConfigError(f"{source_of(key)}: unknown key '{_clip(key)}'{_suggest(parts[-1], owner.model_fields)}")
    where = f"{source_of(key)}: key '{key}'"
    meta: list[Any] = list(info.metadata)
    item = ""
    if index is not None:  # an item of a list field
        _, meta = _strip(typing.get_args(_strip(info.annotation)[0])[0])
        item = f" item {index}"
    family = kind.split("_")[0]
    if kind in ("list_type", "model_type", "model_attributes_type", "dict_type"):
        if section is not None or kind != "list_type":
            text = f"expects a mapping, got {_show(value)}"
        else:
            text = f"expects a list of {_kind(info.annotation).removeprefix('list[')[:-1]}, got {_show(value)}"
    elif family in _EXPECTS and kind.endswith(("_type", "_parsing", "_from_float")):
        text = f"expects {_EXPECTS[family]}, got {_show(value)}"
    elif kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal", "finite_number"):
        text = f"must be {_range(meta)}, got {_show(value)}"
    elif kind == "literal_error":
        allowed = sorted(typing.get_args(_strip(info.annotation)[0]))
        text = f"must be one of {allowed}, got {_show(value)}"
    elif kind in ("too_short", "too_long"):
        low, high = _lengths(meta)
        text = f"must list {low} to {high} values, got {_show(value)}"
    elif kind in ("string_too_short", "string_too_long"):
        low, high = _lengths(meta)
        text = f"must be {low} to {high} characters long, got {_show(value)}"
    elif kind == "jc2a_rule":
        text = f"must {ctx['rule']}, got {_show(value)}"
    else:  # not expected: pydantic's own one-line message
        text = f"is refused ({' '.join(str(err['msg']).split())}), got {_show(value)}"
    return ConfigError(f"{where}{item} {text}")


# --------------------------------------------------------------------------- loading


class _TooDeep(yaml.YAMLError):
    def __init__(self, mark: Any) -> None:
        super().__init__(f"nested deeper than {MAX_DEPTH} levels")
        self.problem_mark = mark


class _StrictLoader(yaml.SafeLoader):
    """PyYAML's safe loader (plain data only, no Python objects) that also refuses duplicate and non-string keys,
    and collections nested deeper than MAX_DEPTH (as it composes: no deep recursion)."""

    _depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        nested = self.check_event(yaml.SequenceStartEvent, yaml.MappingStartEvent)
        if nested:
            self._depth += 1
            if self._depth > MAX_DEPTH:
                raise _TooDeep(self.peek_event().start_mark)
        try:
            return super().compose_node(parent, index)
        finally:
            if nested:
                self._depth -= 1

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


def _check_depth(root: yaml.Node) -> None:
    """Refuse a node graph deeper than MAX_DEPTH collections, aliases followed (an alias of an alias of ... nests
    without being nested in the text), or one that holds itself; iterative, each node visited once."""
    depth: dict[int, int] = {}
    open_: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]

    def children(node: yaml.Node) -> list[yaml.Node]:
        if isinstance(node, yaml.MappingNode):
            return [n for pair in node.value for n in pair if isinstance(n, yaml.CollectionNode)]
        return [n for n in node.value if isinstance(n, yaml.CollectionNode)]

    while stack:
        node, done = stack.pop()
        if not isinstance(node, yaml.CollectionNode) or (not done and id(node) in depth):
            continue
        if done:
            open_.discard(id(node))
            depth[id(node)] = 1 + max((depth[id(c)] for c in children(node)), default=0)
            if depth[id(node)] > MAX_DEPTH:
                raise _TooDeep(node.start_mark)
            continue
        if id(node) in open_:  # reached again from inside itself
            raise _TooDeep(node.start_mark)
        open_.add(id(node))
        stack.append((node, True))
        stack.extend((child, False) for child in children(node))


class _Refused(ConfigError):
    """Text refused for its size or nesting before it is parsed or constructed; `reason` is the message without
    the source (an override names its key instead)."""

    def __init__(self, where: str, reason: str) -> None:
        super().__init__(f"{where}: {reason}")
        self.reason = reason


def _load_yaml(text: str, where: str) -> Any:
    """Plain data from YAML text; ConfigError naming `where` and the line on a syntax error, a duplicate or
    non-string key, a tag that asks for a Python object, more than MAX_FILE_BYTES or nesting deeper than
    MAX_DEPTH."""
    size = len(text.encode("utf-8", "surrogatepass"))
    if size > MAX_FILE_BYTES:
        raise _Refused(where, f"is {size} bytes, more than a config file may be (1 MiB)")
    loader = _StrictLoader(text)  # a SafeLoader subclass: plain data only
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_depth(node)
        return loader.construct_document(node)
    except _TooDeep as exc:
        reason = (
            f"is nested deeper than {MAX_DEPTH} levels (line {exc.problem_mark.line + 1}), more than a config may be"
        )
        raise _Refused(where, reason) from None
    except yaml.YAMLError as exc:
        line = getattr(getattr(exc, "problem_mark", None), "line", None)
        at = f" line {line + 1}:" if line is not None else ""
        problem = " ".join(str(getattr(exc, "problem", None) or exc).split())
        raise ConfigError(f"{where}:{at} is not valid YAML ({problem})") from None
    finally:
        loader.dispose()


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> list[tuple[dict, str]]:
    """The layers of a YAML file, its `_base_` files first; each layer with the file it came from."""
    if path.is_dir():
        raise ConfigError(f"{path}: is a folder, not a config file")
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    if path.resolve() in seen:
        raise ConfigError(f"{path}: '_base_' cycle through {' -> '.join(map(str, seen))}")
    try:
        with path.open("rb") as f:
            size = os.fstat(f.fileno()).st_size
            raw = f.read(MAX_FILE_BYTES + 1) if size <= MAX_FILE_BYTES else b""
        if size > MAX_FILE_BYTES or len(raw) > MAX_FILE_BYTES:
            raise _Refused(str(path), f"is {max(size, len(raw))} bytes, more than a config file may be (1 MiB)")
        text = raw.decode("utf-8")
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
        raise ConfigError(f"{path}: key '_base_' must be a path or a list of paths, got {_show(bases)}")
    layers: list[tuple[dict, str]] = []
    for base in bases:
        layers += _read_yaml(path.parent / base, seen + (path.resolve(),))
    layers.append((data, str(path)))
    return layers


def _parse_override(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise ConfigError(f"command line: override '{_clip(text)}' is not of the form key=value")
    key, raw = text.split("=", 1)
    if not key.strip():
        raise ConfigError(f"command line: override '{_clip(text)}' has no key")
    try:
        value = _load_yaml(raw, "command line") if raw != "" else ""
    except _Refused as exc:
        raise ConfigError(f"command line: key '{_clip(key.strip())}' {exc.reason}") from None
    except ConfigError:
        if re.search(r"^\s*[\[{!]", raw):  # meant as structured YAML: say why it is not
            raise ConfigError(f"command line: override '{_clip(text)}': the value is not valid YAML") from None
        value = raw
    return key.strip(), value


def _clip(text: str) -> str:
    return text if len(text) <= 120 else text[:117] + "..."


def _nest(key: str, value: Any) -> dict:
    out: Any = value
    for part in reversed(key.split(".")):
        out = {part: out}
    return out


def _apply(obj: _Section, updates: Any, source: str, sources: dict[str, str], prefix: str = "") -> None:
    """Write a nested dict of updates into the section `obj`, each value validated by its field as it is set.

    `sources` records which file (or the command line) set each dotted key last.
    """
    if not isinstance(updates, dict):
        raise ConfigError(f"{source}: key '{prefix.rstrip('.') or '<top>'}' expects a mapping, got {_show(updates)}")
    fields = type(obj).model_fields
    for name, value in updates.items():
        key = f"{prefix}{name}"
        if name not in fields:
            raise ConfigError(f"{source}: unknown key '{_clip(key)}'{_suggest(name, fields)}")
        if _section_type(fields[name].annotation) is not None:
            _apply(getattr(obj, name), value, source, sources, key + ".")
        else:
            _assign(obj, name, value, source)
            sources[key] = source


def load_config(
    path: Union[str, os.PathLike, None, Iterable[Union[str, os.PathLike]]] = None,
    overrides: Iterable[str] = (),
) -> Config:
    """Resolve a configuration.

    Args:
        path: a YAML file, several applied in order, or None for the defaults (= `configs/base.yaml`). A path
            that names no file is looked up among the shipped presets (`coco20i.yaml`, `fold/0.yaml`,
            `configs/shot/5.yaml`: `jc2a.presets.resolve`).
        overrides: dotted `key=value` strings applied last, e.g. `("data.fold=1", "model.bins=[8,4]")`.
    """
    from jc2a.presets import resolve

    cfg = Config()
    if path is None:
        paths: list = []
    elif isinstance(path, (str, os.PathLike)):
        paths = [path]
    else:
        paths = list(path)
    sources: dict[str, str] = {}
    for p in paths:
        for layer, source in _read_yaml(resolve(p)):
            _apply(cfg, layer, source, sources)
    for text in overrides:
        key, value = _parse_override(text)
        _apply(cfg, _nest(key, value), "command line", sources)
    _check(cfg, sources)
    return cfg


def to_dict(cfg: Any) -> dict:
    """A plain nested dict of a config (or of one of its sections)."""
    return cfg.model_dump()


def flatten(cfg: Any, prefix: str = "") -> dict[str, Any]:
    """`{"data.fold": 0, ...}`: the flat form that experiment trackers take as params."""
    out: dict[str, Any] = {}
    for key, value in (to_dict(cfg) if isinstance(cfg, BaseModel) else cfg).items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def save_config(cfg: Config, path: Union[str, os.PathLike]) -> Path:
    """Write the resolved config as YAML (atomically) and return its path."""
    from jc2a.atomic import write_text

    return write_text(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))


# --------------------------------------------------------------------------- reference


def reference_markdown() -> str:
    """Every key of the configuration with its type, default and meaning (its field's description), as a markdown
    table: the README's config reference is this text (a test keeps the two equal)."""
    rows = ["| key | type | default | meaning |", "|---|---|---|---|"]

    def walk(obj: _Section, prefix: str) -> None:
        for name, info in type(obj).model_fields.items():
            value = getattr(obj, name)
            if _section_type(info.annotation) is not None:
                walk(value, f"{prefix}{name}.")
                continue
            shown = "null" if value is None else yaml.safe_dump(value, default_flow_style=True).strip()
            shown = shown.removesuffix("...").strip()
            note = (info.description or "").replace("|", "\\|")
            rows.append(f"| `{prefix}{name}` | {_kind(info.annotation)} | `{shown}` | {note} |")

    walk(Config(), "")
    return "\n".join(rows) + "\n"


_PREFIX = _prefixes()
