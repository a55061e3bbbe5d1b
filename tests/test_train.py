"""Training: the loop on CPU, exact resume after SIGKILL, 2 gloo processes, the CKMM bank, MLflow, faults."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from jc2a.config import load_config
from jc2a.runs.files import read_model_file
from jc2a.runs.network import load_trained_model

ROOT = Path(__file__).resolve().parents[1]
# the toy config at 65 px with a narrow head: a step takes a fraction of a second on 2 cores
TINY = [
    "data.image_size=65",
    "model.feat_dim=32",
    "data.min_pixels=200",
    "data.eval_episodes=8",
    "train.batch_size=2",
    "train.tracking=none",
    "train.log_every=1",
    "train.val_episodes=4",
    "train.val_every=0",
]


def tiny(coco_shards, run_dir, *extra):
    return [f"data.shards={coco_shards}", f"train.output_dir={run_dir}", *TINY, *extra]


def run_train(coco_shards, run_dir, *extra, resume=None):
    from jc2a.runs.train import train

    cfg = load_config(ROOT / "configs/toy.yaml", tiny(coco_shards, run_dir, *extra))
    return train(cfg, resume=resume, progress=False)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(args, n: int = 2, timeout: int = 600, config="configs/accelerate/cpu_2proc.yaml", env=None):
    """`accelerate launch` of `python -m jc2a ARGS` with n CPU processes (gloo)."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ROOT / config)]
    cmd += ["--num_processes", str(n), "--main_process_port", str(free_port()), "-m", "jc2a", *args]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=full_env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc


def params(path: Path) -> dict:
    return read_model_file(path)[0]


# --------------------------------------------------------------------------- the loop and its files


def test_training_writes_checkpoints_model_and_metrics(coco_shards, tmp_path):
    run = tmp_path / "run"
    out = run_train(coco_shards, run, "train.max_steps=4", "train.save_every=2", "train.keep_checkpoints=1")
    assert out["step"] == 4 and out["skipped_steps"] == 0 and 0 <= out["val_miou"] <= 100
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step-4"]  # rotated: the newest one kept
    state = json.loads((run / "checkpoints/step-4/trainer_state.json").read_text())
    assert state["step"] == 4 and state["total_steps"] == 4 and state["batch"] == 4
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [m["step"] for m in lines if "loss" in m]
    assert steps == [1, 2, 3, 4] and all(m["loss"] > 0 for m in lines if "loss" in m)
    lrs = [m["lr"] for m in lines if "lr" in m]
    # 0.025 per 4 episodes at a global batch of 2 (1 process x 2), then poly over the planned steps
    assert lrs[0] == pytest.approx(0.025 * 2 / 4 * (1 - 1 / 4) ** 0.9) and lrs[-1] == 0.0
    model, cfg = load_trained_model(run)  # model.safetensors + config.yaml: every tensor, the bank included
    bank = load_file(str(run / "bank.safetensors"))
    assert torch.equal(model.prototype_bank.sums, bank["sums"]) and int(bank["counts"].sum()) > 0
    assert (run / "best/model.safetensors").is_file() and cfg.data.image_size == 65


def test_train_bn_rebuilds_the_bank_and_moves_the_statistics(coco_shards, tmp_path):
    """`model.backbone.train_bn`: the frozen backbone's BatchNorm statistics move during training, so CKMM's bank,
    taken from its layer4, is rebuilt (at the end here) as for a trainable backbone."""
    run = tmp_path / "run"
    run_train(coco_shards, run, "train.max_steps=2", "model.backbone.frozen=true", "model.backbone.train_bn=true")
    summary = json.loads((run / "train_summary.json").read_text())
    assert summary["bank"].startswith("rebuilt")
    tensors = params(run / "model.safetensors")
    assert not torch.equal(tensors["backbone.features.bn1.running_mean"], torch.zeros(64))  # it moved from init
    frozen = tmp_path / "frozen"
    run_train(coco_shards, frozen, "train.max_steps=2", "model.backbone.frozen=true")
    assert not json.loads((frozen / "train_summary.json").read_text())["bank"].startswith("rebuilt")
    assert torch.equal(params(frozen / "model.safetensors")["backbone.features.bn1.running_mean"], torch.zeros(64))


def test_full_validation_picks_best(coco_shards, tmp_path):
    """`train.val_full_every`: every N steps the whole evaluation list (data.eval_episodes) is scored, logged as
    val_full_*, and best/ is picked on it alone (PFENet's selection), not on the short validations between."""
    run = tmp_path / "run"
    run_train(coco_shards, run, "train.max_steps=4", "train.val_every=1", "train.val_full_every=2",
              "model.backbone.frozen=true")  # fmt: skip
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines if "val_miou" in m] == [1, 2, 3, 4]
    full = {m["step"]: m["val_full_miou"] for m in lines if "val_full_miou" in m}
    assert sorted(full) == [2, 4]
    state = json.loads((run / "best/trainer_state.json").read_text())
    assert state["best_step"] in (2, 4) and state["best_miou"] == max(full.values())


@pytest.mark.slow  # > 10 s in CI (--durations, 2026-12-02)
def test_resume_after_sigkill_is_bit_identical(coco_shards, tmp_path):
    extra = ["train.max_steps=6", "train.save_every=3", "train.deterministic=true", "data.num_workers=2"]
    whole = tmp_path / "whole"
    run_train(coco_shards, whole, *extra)
    # the same run in a process killed right after its checkpoint at step 3, then resumed
    killed = tmp_path / "killed"
    cmd = [sys.executable, "-m", "jc2a", "train", "--no-progress", "--config", str(ROOT / "configs/toy.yaml")]
    cmd += tiny(coco_shards, killed, *extra)
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 600
    while not (killed / "checkpoints/step-3/trainer_state.json").is_file():
        assert proc.poll() is None and time.monotonic() < deadline, "the run ended before its first checkpoint"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "model.safetensors").exists()
    run_train(coco_shards, killed, *extra, resume=True)
    a, b = params(whole / "model.safetensors"), params(killed / "model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:5]


def test_resume_refuses_another_config(coco_shards, tmp_path):
    from jc2a.config import ConfigError

    run = tmp_path / "run"
    run_train(coco_shards, run, "train.max_steps=2", "train.save_every=1", "model.backbone.frozen=true")
    with pytest.raises(ConfigError, match="trained with train.lr=0.025, this command says 0.001"):
        run_train(coco_shards, run, "train.max_steps=2", "model.backbone.frozen=true", "train.lr=0.001", resume=True)


# --------------------------------------------------------------------------- precision and faults


def test_bf16_on_cpu_trains(coco_shards, tmp_path):
    out = run_train(coco_shards, tmp_path / "run", "train.max_steps=2", "train.mixed_precision=bf16")
    assert out["step"] == 2 and out["skipped_steps"] == 0 and out["loss"] == out["loss"]


def test_fp16_on_cpu_trains_through_the_loop_with_a_loss_scaler(coco_shards, tmp_path, monkeypatch):
    """`train.cpu_fp16`: the loop's forward runs in float16 (torch's CPU autocast) and its steps go through torch's
    GradScaler, whose scale is logged and resumes with the checkpoint (accelerate runs fp16 on GPUs only)."""
    from jc2a.model.jc2a import JC2A

    real, dtypes = JC2A.loss, set()

    def loss(self, output, mask):
        logits = output if isinstance(output, torch.Tensor) else output.logits
        dtypes.add(logits.dtype)
        return real(self, output, mask)

    monkeypatch.setattr(JC2A, "loss", loss)
    run = tmp_path / "run"
    extra = ["train.max_steps=3", "train.mixed_precision=fp16", "train.cpu_fp16=true", "model.backbone.frozen=true"]
    out = run_train(coco_shards, run, *extra, "train.save_every=2")
    assert out["step"] == 3 and out["skipped_steps"] == 0 and out["loss"] == out["loss"]
    assert torch.float16 in dtypes
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert [m["loss_scale"] for m in lines] == [2.0**16] * 3  # GradScaler's initial scale, no overflow
    state = json.loads((run / "checkpoints/step-2/trainer_state.json").read_text())
    assert state["loss_scale"]["scale"] == 2.0**16  # in the trainer state's JSON: no pickle to load on resume
    assert not list((run / "checkpoints/step-2").glob("custom_checkpoint*"))
    model, _ = load_trained_model(run)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_nonfinite_loss_is_skipped_counted_and_never_reaches_the_weights(coco_shards, tmp_path, monkeypatch):
    from jc2a.model.jc2a import JC2A

    real = JC2A.loss
    calls = {"n": 0}

    def loss(self, output, mask):
        value = real(self, output, mask)
        if isinstance(output, torch.Tensor):  # the aux-free recomputation for logging
            return value
        calls["n"] += 1
        return value * float("nan") if calls["n"] == 2 else value

    monkeypatch.setattr(JC2A, "loss", loss)
    run = tmp_path / "run"
    out = run_train(coco_shards, run, "train.max_steps=3", "train.trace_ranks=true", "model.backbone.frozen=true")
    assert out["skipped_steps"] == 1
    trace = [json.loads(line) for line in (run / "trace/rank-0.jsonl").read_text().splitlines()]
    assert trace[0]["params"] == trace[1]["params"] != trace[2]["params"]  # step 2 left the weights as they were
    model, _ = load_trained_model(run)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["skipped_steps"] for m in metrics if "skipped_steps" in m] == [0, 1, 1]


def test_a_failed_checkpoint_leaves_the_last_one_loadable(coco_shards, tmp_path, monkeypatch):
    import errno

    from accelerate import Accelerator

    real = Accelerator.save_state
    calls = {"n": 0}

    def save_state(self, output_dir=None, **kw):
        calls["n"] += 1
        if calls["n"] == 2:
            Path(output_dir).mkdir(parents=True, exist_ok=True)
            (Path(output_dir) / "partial").write_bytes(b"x")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, output_dir, **kw)

    monkeypatch.setattr(Accelerator, "save_state", save_state)
    run = tmp_path / "run"
    with pytest.raises(OSError, match=r"step-2: checkpoint not written .*No space left on device.*intact"):
        run_train(coco_shards, run, "train.max_steps=3", "train.save_every=1", "model.backbone.frozen=true")
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step-1"]  # no half-written folder
    monkeypatch.setattr(Accelerator, "save_state", real)
    out = run_train(
        coco_shards, run, "train.max_steps=3", "train.save_every=1", "model.backbone.frozen=true", resume=True
    )
    assert out["step"] == 3


def test_cli_reports_an_unwritable_output_in_one_line(coco_shards, tmp_path, capsys):
    from jc2a.cli import main

    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    args = ["train", "--no-progress", "--config", str(ROOT / "configs/toy.yaml")]
    assert main(args + tiny(coco_shards, blocker / "run", "train.max_steps=1")) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("jc2a train: error:") and "file" in err and len(err.splitlines()) == 1


# --------------------------------------------------------------------------- MLflow


def test_mlflow_run_holds_params_metrics_and_artifacts(coco_shards, tmp_path, monkeypatch):
    import mlflow
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    run = tmp_path / "run"
    out = run_train(coco_shards, run, "train.max_steps=2", "train.tracking=mlflow", "model.backbone.frozen=true")
    client = MlflowClient(uri)
    record = client.get_run(out["mlflow_run_id"])
    assert record.data.params["data.image_size"] == "65" and record.data.params["train.lr"] == "0.025"
    params = record.data.params  # the launch's own numbers beside the config's
    assert (params["run.processes"], params["run.global_batch"], params["run.effective_lr"]) == ("1", "2", "0.0125")
    assert record.data.tags["jc2a.backbone_weights"] == "random init"
    assert record.info.run_name == "coco20i-f0-1shot-resnet18-jc2a" and record.data.tags["jc2a.variant"] == "jc2a"
    assert mlflow.get_experiment(record.info.experiment_id).name == "coco20i"
    history = client.get_metric_history(record.info.run_id, "loss")
    assert sorted(m.step for m in history) == [1, 2]
    assert [m.step for m in client.get_metric_history(record.info.run_id, "val_miou")] == [2]
    artifacts = {a.path for a in client.list_artifacts(record.info.run_id)}
    assert {"config.yaml", "bank.safetensors", "model.safetensors", "metrics.jsonl"} <= artifacts


@pytest.mark.parametrize("interrupt, status", [(KeyboardInterrupt, "KILLED"), (OSError, "FAILED")])
def test_an_interrupted_run_ends_its_mlflow_run(coco_shards, tmp_path, monkeypatch, interrupt, status):
    """Ctrl-C or an error mid-run: the MLflow run is ended (KILLED / FAILED), not left running, and the next run
    in the same process is tracked (an active run left behind made its start fail)."""
    import mlflow
    from mlflow.tracking import MlflowClient

    import jc2a.runs.train as train_module

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    real_save = train_module.save_checkpoint

    def stop(*args, **kwargs):
        raise interrupt("stopped at the first checkpoint")

    monkeypatch.setattr(train_module, "save_checkpoint", stop)
    with pytest.raises(interrupt):
        run_train(coco_shards, tmp_path / "a", "train.max_steps=2", "train.save_every=1", "train.tracking=mlflow",
                  "model.backbone.frozen=true")  # fmt: skip
    assert mlflow.active_run() is None
    client = MlflowClient(uri)
    (stopped,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert stopped.info.status == status
    assert [m.step for m in client.get_metric_history(stopped.info.run_id, "loss")] == [1]

    monkeypatch.setattr(train_module, "save_checkpoint", real_save)
    from jc2a.runs.session import reset_accelerate_state

    reset_accelerate_state()
    out = run_train(coco_shards, tmp_path / "b", "train.max_steps=1", "train.tracking=mlflow",
                    "model.backbone.frozen=true")  # fmt: skip
    assert out["mlflow_run_id"] is not None and client.get_run(out["mlflow_run_id"]).info.status == "FINISHED"


def test_unreachable_mlflow_store_costs_a_warning_not_the_run(coco_shards, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    run = tmp_path / "run"
    out = run_train(coco_shards, run, "train.max_steps=2", "train.tracking=mlflow", "model.backbone.frozen=true")
    assert out["step"] == 2 and out["mlflow_run_id"] is None
    assert "tracking start failed" in caplog.text
    assert len((run / "metrics.jsonl").read_text().splitlines()) >= 2


# --------------------------------------------------------------------------- several processes


@pytest.mark.slow  # > 10 s in CI (--durations, 2026-12-02)
def test_two_gloo_processes_stay_in_sync_and_draw_different_queries(coco_shards, tmp_path):
    run = tmp_path / "run"
    proc = launch(["train", "--no-progress", "--config", "configs/toy.yaml", *tiny(coco_shards, run,
                   "train.max_steps=3"), "train.trace_ranks=true"])  # fmt: skip
    assert proc.stderr.count("global batch 4 episodes per step") == 1  # INFO from the main process only
    ranks = [[json.loads(x) for x in (run / f"trace/rank-{r}.jsonl").read_text().splitlines()] for r in range(2)]
    assert [t["step"] for t in ranks[0]] == [t["step"] for t in ranks[1]] == [1, 2, 3]
    assert all(a["params"] == b["params"] for a, b in zip(*ranks))  # identical parameters after every step
    assert all(set(a["queries"]).isdisjoint(b["queries"]) for a, b in zip(*ranks))  # different queries
    assert all(a["rng"] != b["rng"] for a, b in zip(*ranks))  # different dropout masks and P2B tie orders
    assert (run / "model.safetensors").is_file()


@pytest.mark.slow  # > 10 s in CI (--durations, 2026-12-02)
def test_two_processes_at_batch_2_optimise_like_one_at_batch_4(coco_shards, tmp_path):
    """The same global batch (2 x 2 = 1 x 4) trains at the same effective lr (0.025) and follows a comparable loss
    curve. The episodes differ (each rank draws its own), so the curves agree statistically, not bit for bit: the
    mean loss of the second half of each run differs by less than 4 standard errors of that difference, the noise
    estimated from each run's own step-to-step differences (robust to the downward trend). 4 standard errors: a
    false alarm about once in 10^4 runs for Gaussian noise."""
    import statistics

    steps = 40
    extra = [f"train.max_steps={steps}", "model.backbone.frozen=true", "train.log_every=1"]
    one = tmp_path / "one"
    run_train(coco_shards, one, *extra, "train.batch_size=4")
    two = tmp_path / "two"
    launch(["train", "--no-progress", "--config", "configs/toy.yaml", *tiny(coco_shards, two, *extra)])

    def curve(run: Path) -> tuple[list[float], list[float]]:
        lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        rows = [m for m in lines if "loss" in m]
        return [m["loss"] for m in rows], [m["lr"] for m in rows]

    (loss_one, lr_one), (loss_two, lr_two) = curve(one), curve(two)
    assert len(loss_one) == len(loss_two) == steps
    assert lr_one == pytest.approx(lr_two) and lr_one[0] == pytest.approx(0.025 * (1 - 1 / steps) ** 0.9)
    half = steps // 2

    def noise(losses: list[float]) -> float:  # per-step std from successive differences
        return statistics.fmean((b - a) ** 2 for a, b in zip(losses, losses[1:])) ** 0.5 / 2**0.5

    se = ((noise(loss_one) ** 2 + noise(loss_two) ** 2) / half) ** 0.5
    late_one, late_two = statistics.fmean(loss_one[half:]), statistics.fmean(loss_two[half:])
    assert abs(late_one - late_two) < 4 * se, (late_one, late_two, se)
    for losses in (loss_one, loss_two):  # both learn: the second half is lower than the first few steps
        assert statistics.fmean(losses[half:]) < statistics.fmean(losses[:5])


def test_bank_of_two_processes_equals_the_one_process_bank(coco_shards, tmp_path):
    from jc2a.runs.bank import bank_main

    args = [f"data.shards={coco_shards}", "data.image_size=65", "data.min_pixels=200", "model.backbone.frozen=true"]
    bank_main([str(ROOT / "configs/toy.yaml")], args, tmp_path / "one.safetensors", progress=False)
    launch(["bank", "--no-progress", "--config", "configs/toy.yaml", "--out", str(tmp_path / "two.safetensors"), *args])
    one, two = load_file(str(tmp_path / "one.safetensors")), load_file(str(tmp_path / "two.safetensors"))
    assert torch.equal(one["counts"], two["counts"]) and int(one["counts"].sum()) > 20
    # The same instances, summed in float64 in another order: exact up to the float32 features themselves, which
    # two processes of one thread compute in other batch compositions and thread counts than one process does
    # (last-bit differences, float32 epsilon 1.2e-7; 3e-7 relative seen on another machine of ours). A relative
    # 1e-5 is 30x that and still fails on any real difference (a lost instance moves a prototype by ~1/count).
    scale = float(one["sums"].abs().max())
    assert torch.allclose(one["sums"], two["sums"], rtol=1e-5, atol=1e-5 * scale)


def _deepspeed_ready() -> str:
    try:
        import deepspeed  # noqa: F401
        import transformers  # noqa: F401
    except Exception as exc:  # not installed, or installed without what it needs
        return f"DeepSpeed through accelerate needs deepspeed and transformers: {type(exc).__name__}: {exc}"
    return ""


@pytest.mark.slow  # > 10 s in CI (--durations, 2026-12-02)
@pytest.mark.skipif(bool(_deepspeed_ready()), reason=_deepspeed_ready() or "ready")
def test_deepspeed_zero2_runs_two_steps_on_cpu(coco_shards, tmp_path):
    run = tmp_path / "run"
    launch(
        ["train", "--no-progress", "--config", "configs/toy.yaml", *tiny(coco_shards, run, "train.max_steps=2"),
         "model.backbone.frozen=true", "train.mixed_precision=no"],
        config="configs/accelerate/deepspeed_zero2.yaml",
        env={"ACCELERATE_MIXED_PRECISION": "no"},
    )  # fmt: skip
    assert json.loads((run / "train_summary.json").read_text())["step"] == 2
    assert (run / "model.safetensors").is_file()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="fp16 with a loss scaler needs CUDA; this machine has none")
def test_fp16_on_cuda_trains_with_a_loss_scaler(coco_shards, tmp_path):
    out = run_train(coco_shards, tmp_path / "run", "train.max_steps=3", "train.mixed_precision=fp16")
    assert out["step"] == 3 and out["loss"] == out["loss"]


def test_gradient_accumulation_and_clipping(coco_shards, tmp_path):
    run = tmp_path / "run"
    out = run_train(coco_shards, run, "train.max_steps=2", "train.grad_accum=2", "train.clip_grad=0.01",
                    "model.backbone.frozen=true")  # fmt: skip
    assert out["step"] == 2
    state = json.loads((run / "checkpoints/step-2/trainer_state.json").read_text())
    assert state["batch"] == 4  # two micro-batches per optimizer step
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert [m["step"] for m in lines] == [1, 2] and all(m["grad_norm"] > 0 for m in lines)


@pytest.mark.slow  # > 10 s in CI (--durations, 2026-12-02)
def test_torchrun_trains_with_two_gloo_processes(coco_shards, tmp_path):
    """The same entry point under torchrun: ranks come from the launcher, not 0 of 1."""
    run = tmp_path / "run"
    extra = ["train.max_steps=2", "train.trace_ranks=true", "model.backbone.frozen=true"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           "-m", "jc2a", "train", "--no-progress", "--config", str(ROOT / "configs/toy.yaml"),
           *tiny(coco_shards, run, *extra)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = [[json.loads(x) for x in (run / f"trace/rank-{r}.jsonl").read_text().splitlines()] for r in range(2)]
    assert all(a["params"] == b["params"] for a, b in zip(*ranks)) and len(ranks[0]) == 2
    assert all(set(a["queries"]).isdisjoint(b["queries"]) for a, b in zip(*ranks))
