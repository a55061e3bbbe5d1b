"""Benchmarks of `jc2a bench`: the command, its measuring tools (harness) and one module per section."""
