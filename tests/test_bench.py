"""`jc2a bench`'s plumbing, untimed: the harness's peak memory on a CPU, the command line, the report."""

from __future__ import annotations

import argparse

import torch

from jc2a.bench import command
from jc2a.bench.harness import Report, peak_memory


def test_bench_cpu_peak_memory_is_the_peak_of_live_tensors() -> None:
    def fn() -> torch.Tensor:
        a = torch.ones(1024, 256)  # 1 MiB, freed at return
        b = torch.ones(2048, 256)  # 2 MiB, returned
        c = a + 1.0  # 1 MiB: 4 MiB live at the peak
        del a, c
        return b

    peak = peak_memory(fn, torch.device("cpu"))
    assert 4 * 2**20 <= peak < 4 * 2**20 + 1024  # (plus a wrapped scalar or two)


def test_bench_command_line() -> None:
    parser = argparse.ArgumentParser()
    command.add_arguments(parser)
    args = parser.parse_args(["hpam", "--repeats", "3"])
    assert (args.section, args.repeats, args.device, args.out) == ("hpam", 3, "auto", None)
    assert parser.parse_args([]).section == "all"
    assert list(command.SECTIONS) == ["hpam", "data", "train", "eval", "memory", "gpu"]
    report = Report("T", [["a", "b"], ["1", "2"]], ["note"])
    assert report.markdown() == "## T\n\n| a | b |\n|---|---|\n| 1 | 2 |\n\n- note\n"
