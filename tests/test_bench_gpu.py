"""`jc2a bench gpu` on a machine without CUDA: every item says why it is skipped, the exit status is 0, it is quick."""

from __future__ import annotations

import time

import pytest
import torch

from jc2a.bench.gpu import ITEMS
from jc2a.cli import main


def _rows(text: str) -> dict[str, str]:
    """The item rows of the section's table: item label -> the rest of its line."""
    rows = {}
    for line in text.splitlines():
        for label in ITEMS:
            if line.startswith(label):
                rows[label] = line[len(label) :].strip()
    return rows


def _check(argv: list[str], capsys, reason: str) -> None:
    start = time.perf_counter()
    status = main(argv)
    seconds = time.perf_counter() - start
    out = capsys.readouterr().out
    rows = _rows(out)
    assert status == 0, out
    assert list(rows) == list(ITEMS), out  # all six, in order
    assert all(result.startswith(f"skipped: {reason}") for result in rows.values()), out
    assert "total wall time" in out and "all targets met" in out
    assert seconds < 30, seconds  # nothing is built, generated or launched


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: `jc2a bench gpu` would run for real")
def test_bench_gpu_without_cuda_skips_every_item(capsys):
    _check(["bench", "gpu"], capsys, "no CUDA device")


def test_bench_gpu_on_a_cpu_device_skips_every_item(capsys):
    reason = "--device cpu is not a CUDA device" if torch.cuda.is_available() else "no CUDA device"
    _check(["bench", "gpu", "--device", "cpu"], capsys, reason)
