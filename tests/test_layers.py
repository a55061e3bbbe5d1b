"""Layers point one way: cli -> runs -> model and data -> config (and folds, metrics); checked on the imports."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "jc2a"


def imported(tree: ast.AST) -> set[str]:
    """Every module a parsed file imports, anywhere in it (lazy imports included)."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return names


def imports(folder: str) -> dict[str, set[str]]:
    """Module file -> the jc2a (and timm) modules it imports, anywhere in the file (lazy imports included)."""
    out = {}
    for path in sorted((PACKAGE / folder).rglob("*.py")):
        names = imported(ast.parse(path.read_text()))
        out[str(path.relative_to(PACKAGE))] = {n for n in names if n.split(".")[0] in ("jc2a", "timm")}
    return out


def test_data_knows_no_model_and_no_runs():
    for path, names in imports("data").items():
        bad = {n for n in names if n.startswith(("jc2a.model", "jc2a.runs", "jc2a.cli", "timm"))}
        if path == "data/bench.py":  # the benchmark section of `jc2a bench` drives the loaders only
            bad = {n for n in bad if not n.startswith("jc2a.data")}
        assert not bad, f"jc2a/{path} imports {sorted(bad)}"


def test_model_knows_no_data_and_no_runs():
    for path, names in imports("model").items():
        bad = {n for n in names if n.startswith(("jc2a.data", "jc2a.runs", "jc2a.cli"))}
        assert not bad, f"jc2a/{path} imports {sorted(bad)}"


def test_runs_never_import_the_cli():
    for path, names in imports("runs").items():
        assert "jc2a.cli" not in names, f"jc2a/{path} imports jc2a.cli"


def test_bottom_layers_import_nothing_above_them():
    for module in ("config.py", "folds.py", "metrics.py"):
        names = imports(".")[module]
        assert not {n for n in names if n.startswith(("jc2a.data", "jc2a.model", "jc2a.runs", "jc2a.cli"))}, module


def test_model_reads_and_writes_no_files():
    """`model` knows tensors, never files: no safetensors, pickles, open() or paths in jc2a/model. The one path it
    passes on is a backbone weights file, to timm (the loading path timm owns), in backbone.py."""
    for path in sorted((PACKAGE / "model").rglob("*.py")):
        tree = ast.parse(path.read_text())
        modules = {name.split(".")[0] for name in imported(tree)}
        calls = {
            ast.unparse(node.func)
            for node in ast.walk(tree)
            if isinstance(node, ast.Call) and ast.unparse(node.func) in ("open", "torch.load", "torch.save", "Path")
        }
        name = str(path.relative_to(PACKAGE))
        assert not modules & {"safetensors", "pickle", "pathlib", "shutil"}, f"jc2a/{name} imports file modules"
        assert not calls, f"jc2a/{name} calls {sorted(calls)}"
