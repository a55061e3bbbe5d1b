"""Layers point one way: cli -> runs (jc2a/runs/, jc2a/bench/) -> model and data -> bottom (config, errors, folds,
labels, metrics, paper, presets); checked on the imports of every file, module-level and lazy."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Optional

PACKAGE = Path(__file__).resolve().parents[1] / "jc2a"
BOTTOM = ("atomic", "config", "errors", "folds", "labels", "lock", "metrics", "paper", "presets", "progress")
RUN_LAYER = ("runs", "bench")


def module_name(path: Path) -> str:
    """`jc2a/data/shards.py` -> `jc2a.data.shards`; `jc2a/bench/__init__.py` -> `jc2a.bench`."""
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(tree: ast.AST, module: str = "jc2a", is_package: bool = False) -> set[str]:
    """Every module a parsed file imports, anywhere in it (lazy imports included): `import a.b` gives `a.b`;
    `from a import b` gives `a` and `a.b` (b may be a module); relative imports resolved against `module`;
    `importlib.import_module("a.b")` with a literal name gives `a.b`."""
    package = module.split(".") if is_package else module.split(".")[:-1]
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package[: len(package) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            if base:
                names.add(base)
            names.update(f"{base}.{alias.name}" if base else alias.name for alias in node.names if alias.name != "*")
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            func = ast.unparse(node.func)
            if func.split(".")[-1] in ("import_module", "__import__") and isinstance(node.args[0].value, str):
                names.add(node.args[0].value)
    return names


def files(folder: str = ".") -> list[Path]:
    return sorted((PACKAGE / folder).rglob("*.py"))


def imports(folder: str = ".") -> dict[str, set[str]]:
    """Module file (relative to jc2a/) -> the jc2a (and timm, argparse) modules it imports, anywhere in the file."""
    out = {}
    for path in files(folder):
        names = imported(ast.parse(path.read_text()), module_name(path), path.name == "__init__.py")
        out[str(path.relative_to(PACKAGE))] = {n for n in names if n.split(".")[0] in ("jc2a", "timm", "argparse")}
    return out


def _under(names: set[str], *prefixes: str) -> set[str]:
    """The names that are one of `prefixes` or inside one (`jc2a.runs` matches `jc2a.runs.train`, not
    `jc2a.runsx`)."""
    return {n for n in names if any(n == p or n.startswith(p + ".") for p in prefixes)}


def test_the_import_scan_sees_every_form_of_import():
    """The scan the rules below rely on: plain, from, relative, lazy (inside a function) and import_module."""
    source = (
        "import jc2a.cli\nfrom jc2a import bench\nfrom . import shards\nfrom ..model import hpam\n"
        "def f():\n    from jc2a.runs.train import train\n    importlib.import_module('jc2a.runs.demo')\n"
    )
    names = imported(ast.parse(source), "jc2a.data.toy")
    expected = {"jc2a.cli", "jc2a.bench", "jc2a.data.shards", "jc2a.model.hpam", "jc2a.runs.train", "jc2a.runs.demo"}
    assert expected <= names, sorted(expected - names)


def test_no_module_below_the_cli_imports_the_cli():
    """Only `python -m jc2a` (jc2a/__main__.py) starts the command line; nothing else imports it."""
    for path, names in imports().items():
        if path in ("cli.py", "__main__.py"):
            continue
        bad = _under(names, "jc2a.cli")
        assert not bad, f"jc2a/{path} imports {sorted(bad)}: nothing below the command line imports it"


def test_commands_live_in_the_run_layer():
    """Every subcommand's module (`add_arguments`, `run`) is in jc2a/runs/ or jc2a/bench/, never in data or model."""
    from jc2a.cli import COMMANDS

    for name, (target, _) in COMMANDS.items():
        module, _, attr = target.partition(":")  # a module, or one of its attributes (jc2a.runs.commands:Train)
        assert module.split(".")[1] in RUN_LAYER, f"`jc2a {name}` is implemented in {module}, outside the run layer"
        parts = module.split(".")
        path = PACKAGE.joinpath(*parts[1:]).with_suffix(".py")
        assert path.is_file(), f"`jc2a {name}`: {module} has no file {path}"
        assert not attr or f"class {attr}" in path.read_text(), f"`jc2a {name}`: {module} has no {attr}"


def test_the_bench_package_is_imported_by_the_cli_only():
    for path, names in imports().items():
        if path.startswith("bench/"):
            bad = _under(names, "jc2a.cli")
            assert not bad, f"jc2a/{path} imports {sorted(bad)}"
        elif path != "cli.py":
            bad = _under(names, "jc2a.bench")
            assert not bad, f"jc2a/{path} imports {sorted(bad)}: only jc2a/cli.py may import the bench package"


def test_bottom_modules_import_no_other_layer():
    """config, errors, folds, metrics, paper, presets: of jc2a, they import one another only."""
    table = imports()
    for module in BOTTOM:
        names = {n for n in table[f"{module}.py"] if n.startswith("jc2a")}
        bad = names - _under(names, *(f"jc2a.{m}" for m in BOTTOM))
        assert not bad, f"jc2a/{module}.py imports {sorted(bad)}: a bottom module imports no other layer"


def test_errors_import_nothing_of_jc2a():
    names = {n for n in imports()["errors.py"] if n.startswith("jc2a")}
    assert not names, f"jc2a/errors.py imports {sorted(names)}"


def test_data_knows_no_model_and_no_runs():
    for path, names in imports("data").items():
        bad = _under(names, "jc2a.model", "jc2a.runs", "jc2a.bench", "jc2a.cli", "timm")
        assert not bad, f"jc2a/{path} imports {sorted(bad)}"


def test_model_knows_no_data_and_no_runs():
    for path, names in imports("model").items():
        bad = _under(names, "jc2a.data", "jc2a.runs", "jc2a.bench", "jc2a.cli")
        assert not bad, f"jc2a/{path} imports {sorted(bad)}"


def test_no_command_line_in_data_or_model():
    """Command-line halves (argparse, `add_arguments`/`run`) are in the run layer: data and model know none."""
    for folder in ("data", "model"):
        for path in files(folder):
            name = f"jc2a/{path.relative_to(PACKAGE)}"
            assert "argparse" not in path.read_text(), f"{name} mentions argparse"
            tree = ast.parse(path.read_text())
            top = {node.name for node in tree.body if isinstance(node, ast.FunctionDef)}
            assert not top >= {"add_arguments", "run"}, f"{name} defines a command (add_arguments and run)"


def _graph() -> dict[str, set[str]]:
    """File (relative to jc2a/) -> the jc2a files it imports (module-level and lazy), each import resolved to the
    file that defines the module: `jc2a.data.shards.write_shards` -> data/shards.py."""
    table = imports()

    def file_of(name: str) -> Optional[str]:
        parts = name.split(".")[1:]
        while True:
            for candidate in (Path(*parts).with_suffix(".py") if parts else None, Path(*parts, "__init__.py")):
                if candidate is not None and (PACKAGE / candidate).is_file():
                    return str(candidate)
            if not parts:
                return None
            parts = parts[:-1]

    graph = {}
    for path, names in table.items():
        targets = {file_of(n) for n in names if n == "jc2a" or n.startswith("jc2a.")}
        graph[path] = {t for t in targets if t is not None and t != path}
    return graph


def circles(graph: dict[str, set[str]]) -> list[set[str]]:
    """The strongly connected components of more than one file: files that import one another in a circle
    (Tarjan's algorithm, iterative)."""
    index, low, on_stack, stack, components, counter = {}, {}, set(), [], [], [0]
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter[0]
                    counter[0] += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    components.append(set(component))
    return sorted(components, key=min)


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per circle (`circles`): its files in import order, the first repeated at the end; the shortest
    through the circle's first file (breadth first)."""
    out = []
    for component in circles(graph):
        start = min(component)
        parent: dict[str, Optional[str]] = {start: None}
        queue, end = [start], None
        while queue and end is None:
            node = queue.pop(0)
            for child in sorted(graph[node] & component):
                if child == start:
                    end = node
                    break
                if child not in parent:
                    parent[child] = node
                    queue.append(child)
        chain = []  # start ... end, then back to start
        while end is not None:
            chain.insert(0, end)
            end = parent[end]
        out.append(chain + [start])
    return sorted(out)


def test_cycle_finder_finds_a_cycle():
    assert cycles({"a.py": {"b.py"}, "b.py": {"c.py"}, "c.py": {"a.py"}, "d.py": {"a.py"}}) == [
        ["a.py", "b.py", "c.py", "a.py"]
    ]
    assert cycles({"a.py": {"b.py"}, "b.py": set()}) == []
    graph = {"a.py": {"b.py", "c.py"}, "b.py": {"a.py"}, "c.py": {"b.py"}, "d.py": {"d.py"}}
    assert circles(graph) == [{"a.py", "b.py", "c.py"}] and cycles(graph) == [["a.py", "b.py", "a.py"]]


def test_the_import_graph_has_no_cycle():
    graph = _graph()
    found = [
        " -> ".join(f"jc2a/{p}" for p in cycle) + f" (files in this circle: {', '.join(sorted(circle))})"
        for cycle, circle in zip(cycles(graph), circles(graph))
    ]
    assert not found, "import cycles: " + "; ".join(found)


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
