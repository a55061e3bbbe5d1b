"""jc2a: Joint Class-aware and Class-agnostic Alignment for few-shot segmentation.

The Python API, for notebooks and scripts (the same code paths as the `jc2a` command):

    import jc2a
    cfg = jc2a.load_config("toy.yaml", ["data.fold=1"])               # a shipped preset, or your own YAML
    summary = jc2a.train(cfg)                                          # or jc2a.train(config="coco20i.yaml", ...)
    results = jc2a.evaluate(summary["run_dir"], shots=[1, 5])
    predictor = jc2a.Predictor.from_checkpoint(summary["run_dir"])

`import jc2a` stays light: torch and the model are imported on first use.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Iterable, Sequence, Union

if TYPE_CHECKING:
    from jc2a.config import Config

__version__ = "0.1.0"

__all__ = ["Predictor", "__version__", "evaluate", "load_config", "train"]

Paths = Union[str, os.PathLike, Sequence[Union[str, os.PathLike]], None]


def load_config(config: Paths = None, overrides: Iterable[str] = ()) -> Config:
    """A resolved config: YAML file(s) applied in order on the defaults (a name such as `coco20i.yaml` or
    `fold/1.yaml` is a shipped preset when no such file exists), then dotted `key=value` overrides.

    Raises:
        jc2a.config.ConfigError: an unknown key, a wrong type, a value out of range (one line naming key and file).
    """
    from jc2a.config import load_config as load

    return load(config, list(overrides))


def train(config: Union[Paths, Config] = None, overrides: Iterable[str] = (), resume: Any = None,
          progress: bool = True) -> dict:  # fmt: skip
    """Train JC2A; returns the last metrics, `run_dir` and `mlflow_run_id`.

    Args:
        config: a `Config` (from `load_config`), or YAML file(s) / preset names as `load_config` takes them.
        overrides: dotted `key=value` strings, applied last (not with a `Config`).
        resume: None (a new run), True (the latest checkpoint of `train.output_dir`), "auto" (that, or a new run when
            there is none), or a run folder / checkpoint: then its own config.yaml is the config, and `overrides`
            may change only the keys `jc2a train --help` lists.
        progress: show progress (a bar on a terminal, a line now and then in a log).
    """
    from jc2a.config import Config
    from jc2a.runs.checkpoints import resume_config
    from jc2a.runs.train import train as run

    if isinstance(config, Config):
        if list(overrides):
            raise TypeError("overrides go with config files; apply them with jc2a.load_config(files, overrides)")
        return run(config, resume=resume, progress=progress)
    paths = [config] if isinstance(config, (str, os.PathLike)) else (list(config) if config else None)
    cfg, resume = resume_config(paths, list(overrides), resume)
    return run(cfg, resume=resume, progress=progress)


def evaluate(checkpoint: Union[str, os.PathLike], config: Paths = None, overrides: Iterable[str] = (),
             **kwargs: Any) -> dict:  # fmt: skip
    """Evaluate a trained run folder or model file at the paper's protocol; returns results.json's content.

    Args:
        checkpoint: a run folder or model.safetensors; `{fold}` in it evaluates one model per fold.
        config: YAML file(s) to use instead of the run's own config.yaml.
        overrides: dotted `key=value` strings (e.g. `data.shards=/data/coco`).
        **kwargs: `shots`, `folds`, `seeds`, `episodes`, `out`, `figures`, `progress`, `weights` (final, best):
            as `jc2a eval`'s options.
    """
    from jc2a.runs.evaluate import evaluate as run

    paths = [config] if isinstance(config, (str, os.PathLike)) else (list(config) if config else None)
    return run(checkpoint, configs=paths, overrides=list(overrides), **kwargs)


def __getattr__(name: str):
    """`jc2a.Predictor` imports torch and the model on first use only, so `import jc2a` stays light."""
    if name == "Predictor":
        from jc2a.runs.predict import Predictor

        return Predictor
    raise AttributeError(f"module 'jc2a' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
