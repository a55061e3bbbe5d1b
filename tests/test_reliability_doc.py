"""docs/RELIABILITY.md is counted, not written by hand: its Counts table equals the cases its sections list, and every
test it names exists.

The rule: a case is one test id as pytest collects it. A row's test cell names tests in backticks, each
`name`, `name[id, id]` or `tests/file.py::name[...]` (the section heading names the file otherwise); an id list
counts those ids (each must be collected), `[...]` or no list counts every id pytest collects for the test. A
row's outcome is the first words of its outcome cell: clear error, skipped and counted, recovered, accepted or
open (an `xfail(strict=True)` test). `python tests/test_reliability_doc.py` prints the table this rule gives.
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections import Counter
from functools import lru_cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "RELIABILITY.md"
OUTCOMES = ("clear error", "skipped and counted", "recovered", "accepted", "open")
_HEADING = re.compile(r"^## (\d+)\. (.*?)(?: \(`(tests/[\w/]+\.py)`\))?$")
_CELL = re.compile(r"(?<!\\)\|")
_TEST = re.compile(r"^(?:(tests/[\w/]+\.py)::)?(test_\w+)(?:\[(.*)\])?$")


def sections(text: str) -> list[tuple[int, str, list[tuple[str, str, list[tuple[str, str, object]]]]]]:
    """(number, title, rows) of each numbered section; a row is (case, outcome, [(file, test, ids)])."""
    out: list = []
    default = None
    for line in text.splitlines():
        heading = _HEADING.match(line)
        if heading:
            default = heading.group(3)
            out.append((int(heading.group(1)), heading.group(2), []))
            continue
        if not out or not line.startswith("| ") or line.startswith("| area ") or line.startswith("|---"):
            continue
        cells = [c.strip() for c in _CELL.split(line.strip())[1:-1]]
        assert len(cells) == 4, f"section {out[-1][0]}: a row of {len(cells)} cells: {line[:120]}"
        tests = []
        for ref in re.findall(r"`([^`]+)`", cells[3]):
            match = _TEST.match(ref)
            assert match, f"section {out[-1][0]}: {ref!r} in the test column is not a test"
            path = match.group(1) or default
            assert path, f"section {out[-1][0]}: {ref!r} names no file and the heading names none"
            ids = match.group(3)
            tests.append((path, match.group(2), None if ids in (None, "...") else [i.strip() for i in ids.split(",")]))
        assert tests, f"section {out[-1][0]}: a row names no test: {line[:120]}"
        outcome = next((o for o in OUTCOMES if cells[2].lower().startswith(o)), None)
        assert outcome, f"section {out[-1][0]}: outcome {cells[2][:60]!r} is none of {OUTCOMES}"
        out[-1][2].append((cells[1], outcome, tests))
    return out


@lru_cache(maxsize=1)
def collected(files: tuple[str, ...]) -> dict[tuple[str, str], list[str]]:
    """(file, test) -> the ids pytest collects for it ("" for a test without parameters)."""
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "--collect-only", "-p", "no:cacheprovider", *files],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    out: dict[tuple[str, str], list[str]] = {}
    for line in done.stdout.splitlines():
        match = re.match(r"^(tests/[\w/]+\.py)::(test_\w+)(?:\[(.*)\])?$", line.strip())
        if match:
            out.setdefault((match.group(1), match.group(2)), []).append(match.group(3) or "")
    assert out, done.stdout[-2000:] + done.stderr[-2000:]
    return out


def count(text: str) -> dict[int, Counter]:
    """Cases per outcome of each section, by the rule in this module's docstring."""
    parsed = sections(text)
    files = tuple(sorted({path for _, _, rows in parsed for _, _, tests in rows for path, _, _ in tests}))
    ids = collected(files)
    counts: dict[int, Counter] = {}
    for number, _, rows in parsed:
        seen: set[tuple[str, str, str]] = set()
        counts[number] = Counter()
        for _case, outcome, tests in rows:
            for path, name, listed in tests:
                have = ids.get((path, name))
                assert have is not None, f"section {number}: {path}::{name} is not a collected test"
                for i in have if listed is None else listed:
                    assert i in have, f"section {number}: {path}::{name}[{i}] is not collected (ids: {have})"
                    assert (path, name, i) not in seen, f"section {number}: {path}::{name}[{i}] is counted twice"
                    seen.add((path, name, i))
                    counts[number][outcome] += 1
    return counts


def table(text: str) -> dict[int, list[int]]:
    """The Counts table of the document: section -> [cases, clear error, skipped, recovered, accepted, open]."""
    rows = {}
    for line in text.split("## Counts", 1)[1].split("\n## ", 1)[0].splitlines():
        match = re.match(r"^\| (\d+)\. [^|]+\|((?: *\d+ *\|){6})$", line)
        if match:
            rows[int(match.group(1))] = [int(v) for v in match.group(2).split("|") if v.strip()]
    return rows


def measured(text: str) -> dict[int, list[int]]:
    return {n: [sum(c.values()), *(c[o] for o in OUTCOMES)] for n, c in count(text).items()}


def test_the_counts_table_is_the_count_of_the_cases_listed():
    text = DOC.read_text()
    assert table(text) == measured(text)
    total = re.search(r"^\| \*\*total\*\* \|((?: \*\*\d+\*\* \|){6})$", text, re.M)
    assert total, "no total row"
    sums = [sum(v[i] for v in measured(text).values()) for i in range(6)]
    assert [int(v) for v in re.findall(r"\d+", total.group(1))] == sums


def test_open_cases_are_strict_xfail_tests():
    """An `open` row names a test marked `xfail(strict=True)`: it fails today, and passes (so fails) once fixed."""
    text = DOC.read_text()
    for number, _, rows in sections(text):
        for _, outcome, tests in rows:
            for path, name, _ in tests:
                source = (ROOT / path).read_text()
                head = source[: source.index(f"def {name}(")].rsplit("\n\n", 1)[-1]
                assert ("xfail(strict=True" in head) == (outcome == "open"), f"section {number}: {name}"


if __name__ == "__main__":
    text = DOC.read_text()
    for number, row in sorted(measured(text).items()):
        print(number, row)
