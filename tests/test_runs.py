"""The run layer as users drive it: resume from a folder, start from trained weights, preemption that loses nothing,
a kill during a checkpoint write, a real full disk, and accelerate's other trackers."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from jc2a.runs.files import read_model_file

ROOT = Path(__file__).resolve().parents[1]
TINY = ["data.image_size=65", "model.feat_dim=32", "data.min_pixels=200", "data.eval_episodes=8",
        "train.batch_size=2", "train.tracking=none", "train.log_every=1", "train.val_episodes=4", "train.val_every=0",
        "model.backbone.frozen=true"]  # fmt: skip
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def overrides(shards: Path, run: Path, *extra: str) -> list[str]:
    return [f"data.shards={shards}", f"train.output_dir={run}", *TINY, *extra]


def args(shards: Path, run: Path, *extra: str) -> list[str]:
    return ["--config", str(ROOT / "configs/toy.yaml"), *overrides(shards, run, *extra)]


def jc2a(*argv, cwd: Path = ROOT, timeout: int = 600) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "jc2a", *map(str, argv)]
    return subprocess.run(cmd, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=timeout)


def same_model(a: Path, b: Path) -> list[str]:
    """Names of the tensors that differ between two model files (none: bit-identical)."""
    x, y = read_model_file(a)[0], read_model_file(b)[0]
    assert x.keys() == y.keys()
    return [k for k in x if not torch.equal(x[k], y[k])]


@pytest.fixture(scope="module")
def whole(coco_shards, tmp_path_factory) -> Path:
    """An uninterrupted, deterministic 6-step run with a checkpoint every 2 steps."""
    run = tmp_path_factory.mktemp("whole") / "run"
    proc = jc2a("train", "--no-progress", *args(coco_shards, run, *DETERMINISTIC))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run


DETERMINISTIC = ["train.max_steps=6", "train.save_every=2", "train.keep_checkpoints=5", "train.deterministic=true",
                 "data.num_workers=0"]  # fmt: skip


@pytest.mark.slow  # > 10 s in CI (--durations, 2026-12-02)
def test_resume_dir_alone_takes_the_runs_own_config(coco_shards, whole, tmp_path):
    """`jc2a train --resume DIR` with nothing else resumes DIR as it was configured, from any folder, writing
    nothing outside DIR; a key that would change what the run computes is refused in one line naming it; the
    keys that may change (listed in --help) do; a finished run is left as it is."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(whole, run)
    for later in ("checkpoints/step-4", "checkpoints/step-6", "best"):  # as if it stopped after step 2
        shutil.rmtree(run / later, ignore_errors=True)
    (run / "model.safetensors").unlink()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    refused = jc2a("train", "--resume", run, "train.lr=0.5", cwd=elsewhere)
    assert refused.returncode == 2 and "train.lr" in refused.stderr and len(refused.stderr.strip().splitlines()) == 1
    proc = jc2a("train", "--no-progress", "--resume", run, "train.log_every=2", cwd=elsewhere)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert list(elsewhere.iterdir()) == []  # nothing written where the command ran
    assert same_model(whole / "model.safetensors", run / "model.safetensors") == []
    start = time.monotonic()
    again = jc2a("train", "--no-progress", "--resume", run, cwd=elsewhere)
    assert again.returncode == 0 and "finished at step 6 of 6" in again.stderr
    assert time.monotonic() - start < 60  # no bank pass, no training
    helptext = jc2a("train", "--help").stdout
    assert "train.val_every" in helptext and "train.log_every" in helptext


@pytest.mark.slow  # > 10 s in CI (--durations, 2026-12-02)
def test_init_from_starts_from_trained_weights_with_a_fresh_schedule(coco_shards, whole, tmp_path):
    from jc2a.config import load_config
    from jc2a.runs.network import build_network

    cfg = load_config(ROOT / "configs/toy.yaml", overrides(coco_shards, tmp_path / "new", f"train.init_from={whole}"))
    model = build_network(cfg)
    trained = read_model_file(whole / "model.safetensors")[0]
    assert all(torch.equal(v, trained[k]) for k, v in model.state_dict().items())  # every weight, the bank too
    assert "CKMM bank kept" in model.init_note
    other_fold = load_config(ROOT / "configs/toy.yaml",
                             overrides(coco_shards, tmp_path / "f1", f"train.init_from={whole}", "data.fold=1"))
    refitted = build_network(other_fold)
    assert "CKMM bank rebuilt" in refitted.init_note and int(refitted.prototype_bank.counts.sum()) == 0
    proc = jc2a("train", "--no-progress", *args(coco_shards, tmp_path / "new", f"train.init_from={whole}",
                                                 "train.max_steps=1"))  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [json.loads(x) for x in (tmp_path / "new/metrics.jsonl").read_text().splitlines() if '"lr"' in x]
    assert lines[0]["lr"] == 0.0  # a fresh poly schedule over its own single step
    wider = jc2a("train", *args(coco_shards, tmp_path / "wide", f"train.init_from={whole}", "model.feat_dim=16"))
    assert wider.returncode == 2 and "incompatible config" in wider.stderr and "down_query" in wider.stderr


@pytest.mark.slow  # > 10 s in CI (--durations, 2026-12-02)
def test_sigterm_checkpoints_and_the_resumed_run_is_bit_identical(coco_shards, whole, tmp_path):
    """SIGTERM (what SLURM sends before preempting): the step finishes, a checkpoint is written, the process exits
    with status 75 (launch/slurm.sh requeues on it), and resuming ends bit-identical to the uninterrupted run."""
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "jc2a", "train", "--no-progress", *args(coco_shards, run, *DETERMINISTIC)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not (run / "metrics.jsonl").is_file() or '"step": 3' not in (run / "metrics.jsonl").read_text():
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 75, err[-3000:]
    stopped = [p.name for p in (run / "checkpoints").iterdir() if p.name.startswith("step-")]
    assert "stopped by SIGTERM" in err and stopped and not (run / "model.safetensors").exists()
    resumed = jc2a("train", "--no-progress", "--resume", run)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert same_model(whole / "model.safetensors", run / "model.safetensors") == []


@pytest.mark.slow  # > 10 s in CI (--durations, 2026-12-02)
def test_a_kill_during_a_checkpoint_write_resumes_bit_identical(coco_shards, whole, tmp_path):
    """SIGKILL while step-4 is being written (its temporary folder exists): the resume takes step-2, the last
    complete one, and ends bit-identical to the uninterrupted run."""
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "jc2a", "train", "--no-progress", *args(coco_shards, run, *DETERMINISTIC)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not (run / "checkpoints/.step-4.tmp").exists():
        assert proc.poll() is None and time.monotonic() < deadline, "the run ended before writing step-4"
        time.sleep(0.001)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (run / "checkpoints/step-4").exists()
    resumed = jc2a("train", "--no-progress", "--resume", run)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "step-2" in resumed.stderr
    assert same_model(whole / "model.safetensors", run / "model.safetensors") == []


@pytest.fixture()
def small_disk(tmp_path):
    """A 24 MiB tmpfs (a real file system that fills up: ENOSPC from the kernel), or a skip where mounting is not
    allowed."""
    mount = tmp_path / "disk"
    mount.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(mount)], capture_output=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {made.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], capture_output=True)


@pytest.mark.slow  # > 10 s in CI (--durations, 2026-12-02)
def test_a_full_disk_is_one_line_and_leaves_no_temporary(coco_shards, small_disk):
    """A real ENOSPC while writing a checkpoint (the model alone is ~45 MB, the disk 24 MiB): one line saying how
    much space was needed and how much is free, no half-written temporary folder, exit status 2."""
    run = small_disk / "run"
    proc = jc2a("train", "--no-progress", *args(coco_shards, run, "train.max_steps=2", "train.save_every=1"))
    assert proc.returncode == 2, proc.stderr[-3000:]
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("jc2a train: error:") and "checkpoint not written" in line and "needs about" in line
    assert "MiB are free" in line
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.endswith(".tmp")]


def test_tensorboard_and_mlflow_together(coco_shards, tmp_path, monkeypatch):
    """`train.tracking=mlflow,tensorboard`: accelerate's trackers side by side; tensorboard's event files read back
    offline hold the training loss at each step."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from jc2a.config import load_config
    from jc2a.runs.train import train

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = tmp_path / "run"
    cfg = load_config(ROOT / "configs/toy.yaml", overrides(coco_shards, run, "train.max_steps=3",
                                                           "train.tracking=mlflow,tensorboard"))  # fmt: skip
    out = train(cfg, progress=False)
    assert out["mlflow_run_id"]
    folders = sorted({p.parent for p in (run / "tensorboard").rglob("events.out.tfevents.*")})
    scalars = {}
    for folder in folders:
        acc = EventAccumulator(str(folder))
        acc.Reload()
        scalars.update({tag: [e.step for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]})
    assert scalars.get("loss") == [1, 2, 3], scalars


def test_an_uninstalled_tracker_is_one_line(coco_shards, tmp_path):
    proc = jc2a("train", *args(coco_shards, tmp_path / "run", "train.tracking=wandb"))
    assert proc.returncode == 2 and "wandb is not installed (pip install wandb)" in proc.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.slow  # > 10 s in CI (--durations, 2026-12-02)
def test_logs_a_cluster_user_can_read(coco_shards, tmp_path):
    """In a file (not a terminal): no carriage-return bars, a plain progress line instead; DeepSpeed's accelerator
    line is gone; Ctrl-C ends with one line and the shell's status 130, no traceback."""
    run = tmp_path / "run"
    env = {**ENV, "JC2A_PROGRESS_SECONDS": "0"}
    cmd = [sys.executable, "-m", "jc2a", "train", *args(coco_shards, run, "train.max_steps=3")]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "\r" not in done.stderr and "train: 3/3 step" in done.stderr
    assert "Setting accelerator to CPU" not in done.stdout + done.stderr
    long = [sys.executable, "-m", "jc2a", "train", *args(coco_shards, tmp_path / "long", "train.max_steps=500")]
    proc = subprocess.Popen(long, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not (tmp_path / "long/metrics.jsonl").is_file():
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "Traceback" not in err, err[-3000:]
    assert err.strip().splitlines()[-1] == "jc2a train: interrupted"


@pytest.mark.parametrize(
    "command", [[], ["train"], ["eval"], ["predict"], ["bank"], ["summary"], ["demo"], ["pretrain"], ["toy"]]
)
def test_help_answers_in_under_a_second(command):
    """`jc2a --help` and `jc2a COMMAND --help` import no torch: under a second once warm (the best of three, so a
    busy neighbour does not decide it)."""
    jc2a(*command, "--help")  # warm the file cache
    times = []
    for _ in range(3):
        start = time.monotonic()
        proc = jc2a(*command, "--help")
        times.append(time.monotonic() - start)
        assert proc.returncode == 0 and "usage: jc2a" in proc.stdout
    assert min(times) < 1.0, times
    code = "import sys; from jc2a.cli import build_parser; build_parser(None); print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"


@pytest.mark.slow  # > 10 s in CI (--durations, 2026-12-02)
def test_a_second_writer_of_a_run_folder_is_refused(coco_shards, tmp_path):
    """Two `jc2a train` into one train.output_dir: the second is refused in one line naming the folder and the
    owner, and the first's files are untouched; after the first ends, the folder is free again."""
    run = tmp_path / "run"
    first = [sys.executable, "-m", "jc2a", "train", "--no-progress", *args(coco_shards, run, "train.max_steps=300")]
    proc = subprocess.Popen(first, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not (run / "metrics.jsonl").is_file():
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    config_before = (run / "config.yaml").read_bytes()
    second = jc2a("train", *args(coco_shards, run, "train.max_steps=2", "train.lr=0.1"))
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=300)
    assert second.returncode == 2, second.stderr[-2000:]
    line = second.stderr.strip().splitlines()[-1]
    assert str(run) in line and f"pid {proc.pid}" in line and len(second.stderr.strip().splitlines()) <= 2
    assert (run / "config.yaml").read_bytes() == config_before
    assert not (run / ".jc2a.lock").exists()  # released by the first when it stopped
