"""`jc2a config`: print a resolved configuration as YAML, or the reference of every key (`--reference`)."""

from __future__ import annotations

import yaml

from jc2a.config import load_config, reference_markdown, to_dict
from jc2a.runs.schedule import batch_plan, world_size


def add_arguments(parser) -> None:
    parser.add_argument("--config", action="append", default=None, help="YAML config (repeat to compose)")
    parser.add_argument("--reference", action="store_true", help="every key, its type, default and meaning (markdown)")
    parser.add_argument(
        "--processes",
        type=int,
        default=None,
        help="processes the run will have, for the global batch and effective lr shown (default: WORLD_SIZE or 1)",
    )
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. data.fold=1")


def run(args) -> int:
    if args.reference:
        print(reference_markdown(), end="")
        return 0
    cfg = load_config(args.config, args.overrides)
    plan = batch_plan(cfg.train, args.processes if args.processes is not None else world_size())
    print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
    print(f"# launch: {plan.describe()}")  # a YAML comment: the output stays a loadable config
    return 0
