"""The toy Tables 3, 4 and 6 runner (launch/toy_tables.sh): the plan shares the models the tables have in common,
a real (tiny) run trains, evaluates 1- and 5-shot and resumes without training again, the paired intervals are
Student's t, and the tables land between the markers of docs/RESULTS.md without touching the rest."""

from __future__ import annotations

import json
import math
import statistics

import pytest

from jc2a.config import ConfigError
from jc2a.runs import toy_tables as tt
from jc2a.runs.network import load_trained_model


def test_the_plan_runs_each_model_and_seed_once():
    todo = tt.plan((3, 4, 6), [0, 1, 2, 3, 4], [0, 1, 2])
    pairs = [(v, s) for v, _, s in todo]
    assert len(pairs) == len(set(pairs)) == 6 * 5 + 8 * 3  # Table 3: 6 rows x 5 seeds; 4 and 6: 8 other rows x 3
    assert {s for v, s in pairs if v == "jc2a"} == {0, 1, 2, 3, 4}  # Table 3's `all` is Table 4's `ours`, 6's `add`
    assert dict(((v, s), c) for v, c, s in todo)[("baseline", 0)] == "table3_baseline"
    assert tt.plan((4,), [0], [7], variants=["na"]) == [("na", "table4_na", 7)]


def test_an_earlier_result_counts_only_for_the_same_steps_episodes_and_prior(tmp_path):
    folder = tt.run_dir(tmp_path, "p2p+p2b", 3)
    folder.mkdir()
    (folder / "result.json").write_text(json.dumps({"steps": 800, "episodes": 300, "prior": True}))
    assert tt.done(tmp_path, "p2p+p2b", 3, 800, 300) is not None
    assert tt.done(tmp_path, "p2p+p2b", 3, 800, 200) is None and tt.done(tmp_path, "p2p+p2b", 3, 400, 300) is None
    assert tt.done(tmp_path, "p2p+p2b", 3, 800, 300, prior=False) is None  # and has its own folder:
    assert tt.run_dir(tmp_path, "p2p+p2b", 3, prior=False) != folder
    (folder / "result.json").write_text("{not json")
    assert tt.done(tmp_path, "p2p+p2b", 3, 800, 300) is None
    (folder / "result.json").write_text("[800, 300]")  # JSON, but not a result: run again
    assert tt.done(tmp_path, "p2p+p2b", 3, 800, 300) is None


def test_runs_of_an_earlier_runs_json_are_reused_when_their_setting_is_the_same(tmp_path):
    good = [_result("p2p", 0, 41.0, 42.0) | {"steps": 500, "episodes": 200, "prior": True},
            _result("p2p", 1, 43.0, 44.0) | {"steps": 800, "episodes": 200, "prior": True},
            _result("p2b", 0, 40.0, 40.0) | {"steps": 500, "episodes": 200, "prior": False}]  # fmt: skip
    path = tmp_path / "runs.json"
    path.write_text(json.dumps(good))
    assert list(tt.reused([path], 500, 200, True)) == [("p2p", 0)]
    assert list(tt.reused([path], 500, 200, False)) == [("p2b", 0)] and not tt.reused([path], 500, 300, True)
    too_high = json.dumps([good[0], {**good[0], "miou": {"1": 140.0, "5": 1.0}}])
    bad = (("{", "not readable as JSON"), ("{}", "holds a dict"), ('[{"variant": "p2p"}]', "record 0"),
           (too_high, "record 1 .*0-100"))  # fmt: skip
    for text, match in bad:
        path.write_text(text)
        with pytest.raises(SystemExit, match=match):
            tt.reused([path], 500, 200, True)


def test_paired_interval_is_students_t():
    diffs = [1.0, 3.0, 2.0, 4.0, 0.0]
    mean, half = tt.paired_interval(diffs)
    assert mean == 2.0 and half == pytest.approx(2.776 * statistics.stdev(diffs) / math.sqrt(5), rel=1e-12)
    assert math.isnan(tt.paired_interval([1.5])[1]) and tt.paired_interval([1.5])[0] == 1.5


def _result(variant, seed, one, five):
    return {"variant": variant, "seed": seed, "miou": {"1": one, "5": five}, "fbiou": {"1": 60.0, "5": 61.0},
            "trainable_params": 905000, "seconds": 60.0, "threads": 1}  # fmt: skip


def test_tables_and_markers(tmp_path):
    results = {("baseline", s): _result("baseline", s, m, m + 1) for s, m in ((0, 40.0), (1, 44.0), (2, 42.0))}
    results |= {("p2p", s): _result("p2p", s, m, m) for s, m in ((0, 41.0), (1, 47.0), (2, 44.0))}
    text = tt.report(results, (3,), [0, 1, 2], [0, 1, 2], 800, 300, "bash launch/toy_tables.sh", 0.5)
    base = next(line for line in text.splitlines() if line.startswith("| baseline |"))
    p2p = next(line for line in text.splitlines() if line.startswith("| P2P |"))
    assert "42.0 ± 2.0" in base and "(reference)" in base and "59.0" in base  # mean ± sample std; the paper's
    half = 4.303 * statistics.stdev([1.0, 3.0, 2.0]) / math.sqrt(3)
    assert f"+2.0 [{2.0 - half:+.1f}, {2.0 + half:+.1f}]" in p2p  # paired against the same seed's baseline
    assert "| P2B |" not in text  # rows without runs are left out
    doc = tmp_path / "RESULTS.md"
    doc.write_text(f"# head\n{tt.MARKERS[0]}\nstale table\n{tt.MARKERS[1]}\ntail reading\n")
    tt.write_results(text, doc)
    written = doc.read_text()
    assert written.startswith("# head\n") and written.endswith(f"{tt.MARKERS[1]}\ntail reading\n")
    assert "stale table" not in written and "42.0 ± 2.0" in written
    doc.write_text("no markers")
    with pytest.raises(SystemExit, match="markers"):
        tt.write_results(text, doc)
    with pytest.raises(SystemExit, match="not here .*--no-write"):
        tt.write_results(text, tmp_path / "elsewhere" / "RESULTS.md")


def test_outside_a_checkout_the_runner_stops_before_any_run_unless_told_not_to_write(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit):
        tt.main(["--out", str(tmp_path / "out"), "--tables", "3", "--variants", "baseline", "--seeds3", "0"])
    assert "docs/RESULTS.md: not here" in capsys.readouterr().err and not (tmp_path / "out").exists()


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_tiny_run_trains_evaluates_both_shots_and_resumes(tmp_path, capsys, jc2a_handlers):
    argv = ["--out", str(tmp_path), "--tables", "3", "--variants", "baseline", "--seeds3", "0", "--steps", "2",
            "--episodes", "4", "--train-images", "80", "--val-images", "240", "--pretrain-steps", "2",
            "--no-write"]  # fmt: skip
    assert tt.main(argv) == 0
    runs = json.loads((tmp_path / "runs.json").read_text())
    assert [(r["variant"], r["seed"], r["steps"], r["episodes"]) for r in runs] == [("baseline", 0, 2, 4)]
    assert set(runs[0]["miou"]) == {"1", "5"} and all(0 <= v <= 100 for v in runs[0]["miou"].values())
    assert runs[0]["prior"] is True  # the demo's regime for every row, though table3_baseline.yaml says false
    _, cfg = load_trained_model(tmp_path / "baseline-seed0")
    assert cfg.model.pfenet_prior and not cfg.model.ckmm.enabled and not cfg.model.hpam.p2p
    weights = tmp_path / "baseline-seed0" / "model.safetensors"
    assert weights.is_file() and "| baseline |" in capsys.readouterr().out
    mtime = weights.stat().st_mtime_ns
    assert tt.main(argv) == 0  # resumed: read back, not trained again
    assert "1 runs planned, 1 done earlier, 0 to run" in capsys.readouterr().out
    assert weights.stat().st_mtime_ns == mtime
    (tmp_path / "baseline-seed0" / "result.json").unlink()  # stopped after training: only evaluated again
    assert tt.main(argv) == 0 and weights.stat().st_mtime_ns == mtime
    assert json.loads((tmp_path / "runs.json").read_text())[0]["miou"] == runs[0]["miou"]
    again = [*argv, "--reuse", str(tmp_path / "runs.json")]
    again[1] = str(tmp_path / "again")
    assert tt.main(again) == 0  # another folder: the runs.json of the first counts as done
    assert "1 runs planned, 1 done earlier, 0 to run" in capsys.readouterr().out
    assert not (tmp_path / "again").exists()  # nothing to train: no data, no backbone, no run folder made
    (tmp_path / "baseline-seed0" / "result.json").unlink()
    with pytest.raises(ConfigError, match="max_steps"):  # the folder's run had 2 steps: not reused for 3
        tt.main([*argv[:9], "3", *argv[10:]])
    with pytest.raises(SystemExit):
        tt.main([*argv[:4], "--variants", "nonsense"])
