"""The toy Table 3 runner: a real (tiny) row trains and evaluates, an interrupted table resumes without
re-running finished rows, and the table lands between the markers of docs/RESULTS.md without touching the rest."""

import json

import pytest

from jc2a.runs import toy_table3


def test_tiny_row_runs_then_resumes(tmp_path, capsys):
    argv = ["--out", str(tmp_path), "--rows", "baseline", "--seeds", "0", "--steps", "2", "--episodes", "4",
            "--no-write"]  # fmt: skip
    assert toy_table3.main(argv) == 0
    runs = json.loads((tmp_path / "table3.json").read_text())
    assert [(r["row"], r["seed"], r["steps"], r["episodes"]) for r in runs] == [("baseline", 0, 2, 4)]
    assert 0.0 <= runs[0]["miou"] <= 100.0 and runs[0]["trainable_params"] > 0
    assert (tmp_path / "baseline-seed0" / "model.safetensors").is_file()
    out = capsys.readouterr().out
    assert "| baseline |" in out  # the table is printed

    # resumed: the finished row is read back, not trained or evaluated again
    mtime = (tmp_path / "baseline-seed0" / "model.safetensors").stat().st_mtime_ns
    assert toy_table3.main(argv) == 0
    assert json.loads((tmp_path / "table3.json").read_text()) == runs
    assert (tmp_path / "baseline-seed0" / "model.safetensors").stat().st_mtime_ns == mtime


def test_previous_runs_keeps_only_matching_runs_with_weights(tmp_path):
    (tmp_path / "p2p-seed0").mkdir()
    (tmp_path / "p2p-seed0" / "model.safetensors").write_bytes(b"x")
    runs = [{"row": "p2p", "seed": 0, "miou": 1.0, "steps": 500, "episodes": 300},
            {"row": "p2p", "seed": 1, "miou": 2.0, "steps": 500, "episodes": 300}]  # fmt: skip
    (tmp_path / "table3.json").write_text(json.dumps(runs))
    assert list(toy_table3.previous_runs(tmp_path / "table3.json", 500, 300)) == [("p2p", 0)]  # seed 1: no weights
    assert toy_table3.previous_runs(tmp_path / "table3.json", 100, 300) == {}  # other length: run again
    (tmp_path / "table3.json").write_text("{not json")
    with pytest.raises(SystemExit, match="table3.json"):
        toy_table3.previous_runs(tmp_path / "table3.json", 500, 300)


def test_table_and_markers(tmp_path):
    runs = [{"row": "baseline", "seed": s, "miou": m, "fbiou": 60.0, "trainable_params": 905000, "seconds": 60.0}
            for s, m in ((0, 40.0), (1, 44.0))]  # fmt: skip
    text = toy_table3.table(runs, 500, 300, [0, 1], 120.0, "bash launch/toy_table3.sh")
    row = next(line for line in text.splitlines() if line.startswith("| baseline |"))
    assert "42.0 ± 2.8" in row and "59.0" in row  # mean ± sample std; the paper's baseline
    doc = tmp_path / "RESULTS.md"
    doc.write_text("# head\n<!-- toy-table3:start -->\nstale table\n<!-- toy-table3:end -->\ntail reading\n")
    toy_table3.write_results(text, doc)
    written = doc.read_text()
    assert written.startswith("# head\n") and written.endswith("<!-- toy-table3:end -->\ntail reading\n")
    assert "stale table" not in written and "42.0 ± 2.8" in written
