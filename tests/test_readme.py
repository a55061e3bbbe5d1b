"""The README stays true: its generated tables equal their generators, and every command in it parses."""

from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path

import pytest

from jc2a.cli import COMMANDS, build_parser
from jc2a.config import load_config, reference_markdown
from jc2a.runs.report import reproduction_markdown

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def block(name: str) -> str:
    match = re.search(rf"<!-- {name}:start -->\n(.*?)<!-- {name}:end -->", README, re.S)
    assert match, f"README has no {name} block"
    return match.group(1)


def test_config_reference_is_generated_from_the_typed_defaults():
    assert block("config-reference") == reference_markdown()  # regenerate: jc2a config --reference


def test_reproduction_table_is_the_paper_data():
    assert block("paper-table") == reproduction_markdown()


def commands() -> list[list[str]]:
    """Every shell command of the README's bash blocks, one argv each (a `for` loop body with its variable set)."""
    out = []
    for body in re.findall(r"```bash\n(.*?)```", README, re.S):
        for line in body.splitlines():
            line = line.split("  #")[0].strip()
            if not line or line.startswith("#"):
                continue
            loop = re.match(r"for (\w+) in (\S+).*?; do (.*); done$", line)
            if loop:
                line = loop.group(3).replace(f"${loop.group(1)}", loop.group(2))
            argv = shlex.split(line)
            while argv and re.match(r"^\w+=", argv[0]):  # GPUS=4 bash ...
                argv = argv[1:]
            out.append(argv)
    return out


def _check_jc2a(argv: list[str]) -> None:
    command = argv[0]
    assert command in COMMANDS, argv
    args = build_parser(command).parse_args(argv)  # a wrong flag exits: SystemExit fails the test
    for config in getattr(args, "config", None) or []:
        assert (ROOT / config).is_file(), config
    if getattr(args, "config", None) and command in ("train", "bank", "preview", "config"):
        overrides = [o for o in args.overrides if "$" not in o]
        load_config([ROOT / c for c in args.config], overrides)  # configs and overrides resolve


@pytest.mark.parametrize("argv", commands(), ids=lambda a: " ".join(a)[:60])
def test_every_readme_command_parses(argv):
    if argv[0] == "jc2a":
        _check_jc2a(argv[1:])
    elif argv[:2] == ["accelerate", "launch"]:
        config = argv[argv.index("--config_file") + 1]
        assert (ROOT / config).is_file(), config
        _check_jc2a(argv[argv.index("-m") + 2 :])
    elif argv[0] in ("bash", "sbatch"):
        script = next(a for a in argv if a.startswith("launch/"))
        assert (ROOT / script).is_file(), script
        syntax = subprocess.run(["bash", "-n", str(ROOT / script)], capture_output=True, text=True)
        assert syntax.returncode == 0, syntax.stderr  # the script parses
        text = (ROOT / script).read_text()
        if script.startswith("launch/train") or script == "launch/slurm.sh":
            first = text.splitlines()[1]  # each launch script opens with the exact command it runs
            assert first.startswith("# ") and "accelerate launch" in first and "-m jc2a train" in first
            _check_jc2a(["train", *[a for a in argv[argv.index(script) + 1 :]]])
    elif argv[0] == "pip":
        assert argv[1:3] == ["install", "-e"]
    elif argv[0] == "mlflow":
        assert argv[1] == "ui" and "--backend-store-uri" in argv
    else:
        raise AssertionError(f"a README command this test does not know how to check: {argv}")


def test_the_python_api_is_listed_and_documented():
    import jc2a

    for name in ("train", "evaluate", "load_config", "Predictor"):
        assert name in dir(jc2a), name
        assert getattr(jc2a, name).__doc__, name


@pytest.mark.slow
def test_the_readmes_python_runs_as_written(coco_shards, tmp_path, monkeypatch):
    """Every ```python block of the README, executed as it is written, in a folder holding what its text says is
    there: the demo's shards (the session's toy shards) and the three pictures it segments."""
    import cv2
    import numpy as np

    (tmp_path / "runs/demo").mkdir(parents=True)
    (tmp_path / "runs/demo/shards-v2").symlink_to(coco_shards, target_is_directory=True)
    rng = np.random.default_rng(0)
    for name in ("street", "dog1"):
        image = rng.integers(0, 90, (96, 128, 3), dtype=np.uint8)
        image[30:70, 40:90] = (230, 40, 30)
        cv2.imwrite(str(tmp_path / f"{name}.jpg"), image)
    mask = np.zeros((96, 128), np.uint8)
    mask[30:70, 40:90] = 255
    cv2.imwrite(str(tmp_path / "dog1.png"), mask)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    blocks = re.findall(r"```python\n(.*?)```", README, re.S)
    assert blocks
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, "README.md", "exec"), namespace)  # noqa: S102 - the README's own code
    assert namespace["result"].mask.shape == (96, 128)
    assert {r["shot"] for r in namespace["results"]["summary"]} == {1, 5}


def test_every_linked_file_exists():
    links = re.findall(r"\]\(([^)#]+)\)", README)
    local = [link for link in links if not link.startswith(("http://", "https://"))]
    assert local, "the README links to its docs"
    for link in local:
        assert (ROOT / link).exists(), link


def test_every_test_the_docs_name_exists():
    """README and docs/*.md cite tests as evidence (`test_name`, tests/test_file.py::test_name): each is a test."""
    defined: dict[str, set[str]] = {}
    for path in (ROOT / "tests").glob("test_*.py"):
        defined[path.name] = set(re.findall(r"^(?:async )?def (test_\w+)", path.read_text(), re.M))
    everywhere = set().union(*defined.values())
    cited = 0
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        text = doc.read_text()
        for file, name in re.findall(r"(test_\w+\.py)::(test_\w+)", text):
            cited += 1
            assert file in defined, f"{doc.name} cites {file}, which is not in tests/"
            assert name in defined[file], f"{doc.name} cites {file}::{name}, which {file} does not define"
        for name in re.findall(r"`(test_[a-z0-9_]+)`", text):  # lowercase: `test_Resize` is PFENet's
            cited += 1
            assert name in everywhere, f"{doc.name} cites `{name}`, which no test file defines"
    assert cited > 20, "the docs cite their tests"
