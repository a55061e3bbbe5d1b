"""Reliability of training (issue 9, items 7 and 8): kills at random moments, broken records mid-stream,
half-written checkpoints, untrusted checkpoint/model/bank files, configuration checked before heavy work, an
unwritable run folder. Every case is listed with its outcome in docs/RELIABILITY.md (part 2)."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from jc2a.cli import main
from jc2a.config import load_config, save_config
from jc2a.runs.checkpoints import checkpoint_dirs
from jc2a.runs.files import read_model_file
from jc2a.runs.network import load_trained_model
from jc2a.runs.session import reset_accelerate_state

ROOT = Path(__file__).resolve().parents[1]
TOY = ROOT / "configs/toy.yaml"
# tests/test_train.py's tiny toy run (65 px, a 32-channel head: a step takes a fraction of a second on 2 cores)
# with a frozen backbone and one CKMM bank built once for the whole module
TINY = [
    "data.image_size=65",
    "model.feat_dim=32",
    "data.min_pixels=200",
    "data.eval_episodes=8",
    "train.batch_size=2",
    "train.tracking=none",
    "train.log_every=1",
    "train.val_episodes=2",
    "train.val_every=0",
    "model.backbone.frozen=true",
]
# the run compared bit for bit: deterministic, a checkpoint every step, two loader workers
EXACT = ["train.max_steps=6", "train.save_every=1", "train.deterministic=true", "data.num_workers=2"]
# the uninterrupted reference keeps every checkpoint, so that other cases can start from any of them
WHOLE = [*EXACT, "train.keep_checkpoints=6"]


class _Payload:
    """Unpickling this writes `path`: proof that something unpickled it."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def _reset_accelerate() -> None:
    reset_accelerate_state()
    torch.use_deterministic_algorithms(False)


def overrides(shards: Path, run_dir: Path, bank: Path | None, *extra: str) -> list[str]:
    out = [f"data.shards={shards}", f"train.output_dir={run_dir}", *TINY, *extra]
    return out + ([f"model.ckmm.bank_file={bank}"] if bank else [])


def run_train(shards: Path, run_dir: Path, bank: Path | None, *extra: str, resume=None) -> dict:
    from jc2a.runs.train import train

    cfg = load_config(TOY, overrides(shards, run_dir, bank, *extra))
    return train(cfg, resume=resume, progress=False)


def train_cli(shards: Path, run_dir: Path, bank: Path | None, *extra: str) -> list[str]:
    """`jc2a train` arguments (for `main` in this process, or after `python -m jc2a` in another)."""
    return ["train", "--no-progress", "--config", str(TOY), *overrides(shards, run_dir, bank, *extra)]


def assert_same_model(a: Path, b: Path) -> None:
    x, y = read_model_file(a)[0], read_model_file(b)[0]
    assert x.keys() == y.keys()
    differ = [k for k in x if not torch.equal(x[k], y[k])]
    assert not differ, f"{len(differ)} of {len(x)} tensors differ, e.g. {differ[:3]}"


def one_error_line(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if line.startswith("jc2a train: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    return lines[0]


def reseal(checkpoint: Path) -> Path:
    """Rewrite a checkpoint's manifest after its files were changed, as someone who also edits trainer_state.json
    would: the checks below the manifest (weights-only loading, safetensors headers) must still hold."""
    from jc2a.runs.checkpoints import _manifest

    state_file = checkpoint / "trainer_state.json"
    state = json.loads(state_file.read_text())
    state["files"] = _manifest(checkpoint)
    state_file.write_text(json.dumps(state))
    return checkpoint


def copy_run(src: Path, dst: Path, steps: list[int]) -> Path:
    """A copy of run `src` holding only the checkpoints `steps`, its config pointed at `dst` (as if the run had
    been killed right after the last of them)."""
    for n in steps:
        shutil.copytree(src / "checkpoints" / f"step-{n}", dst / "checkpoints" / f"step-{n}")
    cfg = load_config(src / "config.yaml", [f"train.output_dir={dst}"])
    save_config(cfg, dst / "config.yaml")
    return dst


@pytest.fixture(scope="module")
def bank(coco_shards, tmp_path_factory) -> Path:
    """The CKMM bank of the tiny config, built once (its fingerprint fits every run here, broken shards too: their
    index is the same)."""
    from jc2a.runs.bank import bank_main

    path = tmp_path_factory.mktemp("bank") / "bank.safetensors"
    _reset_accelerate()
    bank_main([str(TOY)], overrides(coco_shards, path.parent, None), path, progress=False)
    _reset_accelerate()
    return path


@pytest.fixture(scope="module")
def whole(coco_shards, bank, tmp_path_factory) -> Path:
    """The uninterrupted reference run (WHOLE): model.safetensors and every checkpoint, step-1 .. step-6."""
    run = tmp_path_factory.mktemp("whole") / "run"
    _reset_accelerate()
    out = run_train(coco_shards, run, bank, *WHOLE)
    _reset_accelerate()
    assert out["step"] == 6 and [p.name for p in checkpoint_dirs(run)] == [f"step-{n}" for n in range(1, 7)]
    return run


# --------------------------------------------------------------------------- 1. killed at random moments


def _newest_step(run: Path) -> int:
    found = checkpoint_dirs(run)
    return int(found[-1].name[len("step-") :]) if found else 0


@pytest.mark.slow  # > 10 s in CI (--durations, 2026-12-02)
def test_killed_at_random_moments_resumes_bit_identical(coco_shards, bank, whole, tmp_path):
    rng = random.Random(20240917)
    # 2 or 3 kills, the k-th after checkpoint step-s_k appeared (s_k increasing among 1..4) plus 0-0.5 s
    targets = sorted(rng.sample(range(1, 5), rng.choice([2, 3])))
    run = tmp_path / "killed"
    cmd = [sys.executable, "-m", "jc2a", *train_cli(coco_shards, run, bank, *EXACT)]
    kills, deadline = [], time.monotonic() + 600
    for attempt in range(len(targets) + 2):
        start = _newest_step(run)
        with open(tmp_path / f"stderr-{attempt}.txt", "w") as err:
            proc = subprocess.Popen(
                cmd + (["--resume"] if attempt else []), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=err,
                start_new_session=True,
            )  # fmt: skip
            if len(kills) < len(targets):
                target = max(targets[len(kills)], start + 1)
                while _newest_step(run) < target and proc.poll() is None:
                    assert time.monotonic() < deadline, "no new checkpoint"
                    time.sleep(0.02)
                time.sleep(rng.uniform(0.0, 0.5))
                if proc.poll() is None:
                    os.killpg(proc.pid, signal.SIGKILL)  # the run and its two loader workers
                    writing = sorted(p.name for p in (run / "checkpoints").glob(".*"))
                    kills.append({"from": start, "newest": _newest_step(run), "writing": writing})
            code = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        if code == 0:
            break
        assert code == -signal.SIGKILL, (tmp_path / f"stderr-{attempt}.txt").read_text()[-3000:]
    print("kills:", kills)  # shown when the test fails: where each kill landed
    assert code == 0 and len(kills) >= 2, kills
    assert all(k["newest"] > k["from"] for k in kills)  # each resumed run got further before it was killed
    summary = json.loads((run / "train_summary.json").read_text())
    assert summary["step"] == 6 and summary["skipped_steps"] == 0
    assert_same_model(whole / "model.safetensors", run / "model.safetensors")


# --------------------------------------------------------------------------- 2. broken records mid-stream


def _zero_jpegs(src: Path, dst: Path, keys: set[str]) -> None:
    """Copy the shards; the JPEG members of `keys` zeroed in place (every shard keeps its size)."""
    shutil.copytree(src, dst)
    index = json.loads((dst / "train-index.json").read_text())
    names = [s["name"] for s in index["shards"]]
    hit = [r for r in index["records"] if r["key"] in keys]
    assert len(hit) == len(keys)
    for record in hit:
        offset, size = record["offsets"]["jpg"]
        with open(dst / names[record["shard"]], "r+b") as f:
            f.seek(offset)
            f.write(bytes(size))


@pytest.fixture(scope="module")
def broken(coco_shards, tmp_path_factory) -> tuple[Path, set[str]]:
    """The toy shards with a zeroed JPEG in every training shard (its first record with a usable base class) and in
    the two queries the training stream decodes first, so that a broken record comes up in the first step."""
    from jc2a.data.episodes import train_loader
    from jc2a.folds import base_classes

    cfg = load_config(TOY, overrides(coco_shards, tmp_path_factory.mktemp("probe"), None, "data.num_workers=0"))
    loader = train_loader(cfg.data, cfg.train.seed, cfg.train.batch_size, (0.485, 0.456, 0.406), rank=0, world=1)
    loader.set_epoch(0)
    first = next(iter(loader))  # the headers, pools and draws do not depend on the JPEG bytes
    base = {str(c) for c in base_classes("coco20i", 0)}
    index = json.loads((coco_shards / "train-index.json").read_text())
    keys = set(first["query_key"])
    for shard in range(len(index["shards"])):
        keys.add(
            next(
                r["key"] for r in index["records"]
                if r["shard"] == shard and any(k in base and n >= 200 for k, n in r["classes"].items())
            )
        )  # fmt: skip
    out = tmp_path_factory.mktemp("broken") / "coco"
    _zero_jpegs(coco_shards, out, keys)
    return out, keys


def test_broken_records_mid_stream_are_skipped_and_counted(broken, bank, tmp_path, caplog):
    shards, keys = broken
    run = tmp_path / "run"
    out = run_train(shards, run, bank, "train.max_steps=3", "train.trace_ranks=true", "data.num_workers=0")
    assert out["step"] == 3 and out["skipped_steps"] == 0
    summary = json.loads((run / "train_summary.json").read_text())
    assert summary["skipped_records"] >= 1
    logged = [m["skipped_records"] for m in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
              if "skipped_records" in m]  # fmt: skip
    assert len(logged) == 3 and logged[0] >= 1 and logged == sorted(logged)
    assert logged[-1] == summary["skipped_records"]
    trace = [json.loads(line) for line in (run / "trace/rank-0.jsonl").read_text().splitlines()]
    assert not keys.intersection(q for t in trace for q in t["queries"])  # no broken record reached a step
    assert any(k in caplog.text for k in keys)  # the warning names the record
    tensors = read_model_file(run / "model.safetensors")[0]
    assert all(torch.isfinite(t).all() for t in tensors.values() if t.is_floating_point())


def test_a_broken_record_in_the_bank_pass_is_skipped_and_counted(broken, tmp_path, caplog):
    shards, keys = broken
    run = tmp_path / "run"
    out = run_train(shards, run, None, "train.max_steps=1", "data.num_workers=0")
    assert out["step"] == 1 and (run / "bank.safetensors").is_file()
    assert any(f"CKMM bank: skipped record {k}" in caplog.text for k in keys)  # named, as the stream names them
    assert "unreadable image(s) of rank 0 skipped" in caplog.text


# --------------------------------------------------------------------------- 3. a half-written checkpoint


def test_a_half_written_checkpoint_is_never_trusted(coco_shards, bank, whole, tmp_path, caplog):
    run = copy_run(whole, tmp_path / "run", [1, 2, 3])
    # killed while writing step 4: a temporary folder with its trainer state and truncated weights and optimizer
    partial = run / "checkpoints/.step-4.tmp"
    partial.mkdir()
    shutil.copy(whole / "checkpoints/step-4/trainer_state.json", partial)
    for name in ("model.safetensors", "optimizer.bin"):
        data = (whole / "checkpoints/step-4" / name).read_bytes()
        (partial / name).write_bytes(data[: len(data) // 2])
    out = run_train(coco_shards, run, bank, *WHOLE, resume=True)
    assert out["step"] == 6
    assert f"resumed from {run / 'checkpoints/step-3'} at step 3" in caplog.text
    assert not partial.exists() and [p.name for p in checkpoint_dirs(run)] == [f"step-{n}" for n in range(1, 7)]
    assert_same_model(whole / "model.safetensors", run / "model.safetensors")


# --------------------------------------------------------------------------- 4. untrusted files stay data


@pytest.mark.parametrize("name", ["optimizer.bin", "scheduler.bin"])
def test_a_pickle_in_a_checkpoint_is_refused_and_never_run(coco_shards, bank, whole, tmp_path, name):
    run = copy_run(whole, tmp_path / "run", [5])
    marker = tmp_path / "unpickled"
    torch.save(_Payload(marker), run / "checkpoints/step-5" / name)
    reseal(run / "checkpoints/step-5")
    with pytest.raises(ValueError, match=r"step-5: checkpoint refused \(UnpicklingError: Weights only load") as info:
        run_train(coco_shards, run, bank, *WHOLE, resume=True)
    assert len(str(info.value).splitlines()) == 1
    assert not marker.exists() and not (run / "model.safetensors").exists()


@pytest.mark.parametrize("name", ["model.safetensors", "rng-0.safetensors"])
def test_a_pickle_in_place_of_checkpoint_safetensors_never_runs(coco_shards, bank, whole, tmp_path, name):
    run = copy_run(whole, tmp_path / "run", [5])
    marker = tmp_path / "unpickled"
    torch.save(_Payload(marker), run / "checkpoints/step-5" / name)
    reseal(run / "checkpoints/step-5")
    with pytest.raises(Exception, match="header"):  # safetensors reads a header, never a pickle
        run_train(coco_shards, run, bank, *WHOLE, resume=True)
    assert not marker.exists() and not (run / "model.safetensors").exists()


@pytest.mark.parametrize("name", ["model.safetensors", "rng-0.safetensors"])
def test_a_pickle_in_place_of_checkpoint_safetensors_is_one_line(coco_shards, bank, whole, tmp_path, name):
    run = copy_run(whole, tmp_path / "run", [5])
    torch.save(_Payload(tmp_path / "unpickled"), run / "checkpoints/step-5" / name)
    reseal(run / "checkpoints/step-5")
    try:
        run_train(coco_shards, run, bank, *WHOLE, resume=True)
    except Exception as exc:  # noqa: BLE001 - what it raises is the point
        error = exc
    assert isinstance(error, ValueError) and str(error).startswith(f"{run / 'checkpoints/step-5'}: checkpoint refused")


def test_a_pickled_rng_state_is_never_run(coco_shards, bank, whole, tmp_path):
    """accelerate reads random_states_0.pkl weights-only and ignores it when that fails; jc2a's own RNG file
    (rng-0.safetensors) restores the torch RNG, so the resumed run is still exact."""
    run = copy_run(whole, tmp_path / "run", [5])
    marker = tmp_path / "unpickled"
    torch.save(_Payload(marker), run / "checkpoints/step-5/random_states_0.pkl")
    reseal(run / "checkpoints/step-5")
    assert run_train(coco_shards, run, bank, *WHOLE, resume=True)["step"] == 6
    assert not marker.exists()
    assert_same_model(whole / "model.safetensors", run / "model.safetensors")


def test_cli_resume_from_a_pickled_optimizer_is_one_line(coco_shards, bank, whole, tmp_path):
    run = copy_run(whole, tmp_path / "run", [5])
    marker = tmp_path / "unpickled"
    torch.save(_Payload(marker), run / "checkpoints/step-5/optimizer.bin")
    reseal(run / "checkpoints/step-5")
    cmd = [sys.executable, "-m", "jc2a", *train_cli(coco_shards, run, bank, *WHOLE), "--resume"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    line = one_error_line(proc.stderr)
    assert f"{run / 'checkpoints/step-5'}: checkpoint refused (UnpicklingError" in line
    assert not marker.exists()


def test_a_changed_checkpoint_file_is_refused_by_its_manifest(coco_shards, bank, whole, tmp_path):
    """A checkpoint proves itself: a file changed after it was written (a pickle in place of the optimizer here,
    the manifest left as it was) is refused before anything of it is read."""
    run = copy_run(whole, tmp_path / "run", [5])
    marker = tmp_path / "unpickled"
    torch.save(_Payload(marker), run / "checkpoints/step-5/optimizer.bin")
    with pytest.raises(ValueError, match=r"step-5: optimizer.bin differs from what was written") as info:
        run_train(coco_shards, run, bank, *WHOLE, resume=True)
    assert len(str(info.value).splitlines()) == 1 and not marker.exists()
    (run / "checkpoints/step-5/extra.bin").write_bytes(b"x")
    reseal(run / "checkpoints/step-5")
    (run / "checkpoints/step-5/other.bin").write_bytes(b"y")
    with pytest.raises(ValueError, match=r"step-5: other.bin is not one of the files it was written with"):
        run_train(coco_shards, run, bank, *WHOLE, resume=True)


def test_a_checkpoint_whose_state_disagrees_with_its_folder_is_refused(coco_shards, bank, whole, tmp_path):
    """A trainer state saying step 99 inside step-2/ was accepted, reported as finished and saved as the final
    model; now the step, the config and the files are checked against each other before a resume."""
    run = copy_run(whole, tmp_path / "run", [2])
    state_file = run / "checkpoints/step-2/trainer_state.json"
    state = json.loads(state_file.read_text())
    state_file.write_text(json.dumps({**state, "step": 99}))
    with pytest.raises(ValueError, match=r"step-2: its trainer state says step 99, its folder says step-2"):
        run_train(coco_shards, run, bank, *WHOLE, resume=True)
    assert not (run / "model.safetensors").exists()
    state_file.write_text(json.dumps({**state, "config": "0" * 64}))
    with pytest.raises(ValueError, match=r"step-2: computed with another config"):
        run_train(coco_shards, run, bank, *WHOLE, resume=True)
    state_file.write_text(json.dumps({k: v for k, v in state.items() if k != "files"}))
    with pytest.raises(ValueError, match=r"step-2: no manifest"):
        run_train(coco_shards, run, bank, *WHOLE, resume=True)


def test_a_pickled_model_file_is_refused(whole, tmp_path):
    marker = tmp_path / "unpickled"
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(whole / "config.yaml", run)
    torch.save(_Payload(marker), run / "model.safetensors")
    for source in (run, run / "model.safetensors"):  # a run folder, a model file
        with pytest.raises(ValueError, match=r"model.safetensors: not a safetensors jc2a model file") as info:
            load_trained_model(source)
        assert len(str(info.value).splitlines()) == 1
    assert not marker.exists()


def test_a_pickled_bank_file_is_refused_before_any_step(coco_shards, tmp_path, capsys):
    marker = tmp_path / "unpickled"
    bank_file = tmp_path / "bank.safetensors"
    torch.save(_Payload(marker), bank_file)
    run = tmp_path / "run"
    assert main(train_cli(coco_shards, run, bank_file, "train.max_steps=1", "data.num_workers=0")) == 2
    line = one_error_line(capsys.readouterr().err)
    assert f"{bank_file}: not a safetensors prototype bank" in line
    assert not marker.exists() and not (run / "checkpoints").exists() and not (run / "metrics.jsonl").exists()


# --------------------------------------------------------------------------- 5. configuration before heavy work


@pytest.mark.parametrize(
    "bad, says",
    [
        ("train.lr=-1", "train.lr"),
        ("data.image_size=128", "data.image_size"),
        ("data.shards={missing}", "{missing}"),
        ("data.dataset=pascal5i", "pascal5i"),
    ],
    ids=["negative-lr", "image-size", "missing-shards", "other-dataset"],
)
def test_a_bad_config_fails_in_seconds_before_any_bank_or_step(coco_shards, tmp_path, capsys, bad, says):
    missing = tmp_path / "no-such-folder"
    run = tmp_path / "run"
    tick = time.perf_counter()
    code = main(train_cli(coco_shards, run, None, "train.max_steps=1", bad.format(missing=missing)))
    seconds = time.perf_counter() - tick
    line = one_error_line(capsys.readouterr().err)
    assert code == 2 and says.format(missing=missing) in line, line
    assert seconds < 15, f"{seconds:.1f} s"
    assert not (run / "checkpoints").exists() and not (run / "bank.safetensors").exists()


# --------------------------------------------------------------------------- 6. an unwritable run folder


def _make_read_only_before_step_2(monkeypatch, run: Path, simulate: bool) -> dict:
    """Before the checkpoint of step 2: the run folder and its checkpoints folder made read-only (chmod), or with
    `simulate` (root ignores modes) every folder creation under it refused with EACCES. Returns the sha256 of
    step-1's files at that moment."""
    import jc2a.runs.train as train_module

    real_save = train_module.save_checkpoint
    real_makedirs, real_mkdir = os.makedirs, os.mkdir
    before: dict = {}

    def refuse(path) -> None:
        if before and Path(path).resolve().is_relative_to(run.resolve()):
            raise PermissionError(errno.EACCES, "Permission denied", os.fspath(path))

    def makedirs(name, mode=0o777, exist_ok=False):
        refuse(name)
        return real_makedirs(name, mode, exist_ok)

    def mkdir(path, mode=0o777, *, dir_fd=None):
        refuse(path)
        return real_mkdir(path, mode, dir_fd=dir_fd)

    def save_checkpoint(accelerator, target, state, keep=None, cfg=None):
        if target.name == "step-2":
            step1 = run / "checkpoints/step-1"
            before.update({p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in step1.iterdir()})
            if not simulate:
                for folder in (run / "checkpoints", run):
                    folder.chmod(0o555)
        return real_save(accelerator, target, state, keep, cfg)

    monkeypatch.setattr(train_module, "save_checkpoint", save_checkpoint)
    if simulate:
        monkeypatch.setattr(os, "makedirs", makedirs)
        monkeypatch.setattr(os, "mkdir", mkdir)
    return before


def _check_unwritable(run: Path, before: dict, err: str) -> None:
    line = one_error_line(err)
    assert f"{run / 'checkpoints/step-2'}: checkpoint not written (PermissionError: [Errno 13]" in line, line
    assert line.endswith("the earlier checkpoints are intact")
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-1"]  # no temporary folder left
    after = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in (run / "checkpoints/step-1").iterdir()}
    assert before and after == before


@pytest.mark.skipif(os.geteuid() == 0, reason="running as root: chmod cannot make a folder read-only for root "
                    "(test_an_unwritable_run_folder_simulated covers the case with EACCES)")  # fmt: skip
def test_a_read_only_run_folder_is_one_clear_error(coco_shards, bank, tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    before = _make_read_only_before_step_2(monkeypatch, run, simulate=False)
    try:
        code = main(train_cli(coco_shards, run, bank, "train.max_steps=3", "train.save_every=1",
                              "data.num_workers=0"))  # fmt: skip
    finally:
        for folder in (run, run / "checkpoints"):
            folder.chmod(0o755)
    assert code == 2
    _check_unwritable(run, before, capsys.readouterr().err)


def test_an_unwritable_run_folder_simulated(coco_shards, bank, tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    before = _make_read_only_before_step_2(monkeypatch, run, simulate=True)
    code = main(train_cli(coco_shards, run, bank, "train.max_steps=3", "train.save_every=1", "data.num_workers=0"))
    monkeypatch.undo()
    assert code == 2
    _check_unwritable(run, before, capsys.readouterr().err)
