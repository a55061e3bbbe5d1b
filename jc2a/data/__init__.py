"""Datasets, webdataset shards, episodes and transforms."""
