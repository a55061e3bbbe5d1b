"""Runs: the jobs a user starts (train, bank, eval, predict, preview, demo), wiring the model to the data."""
