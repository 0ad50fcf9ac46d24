"""Benchmarks for dockyard: `python -m bench` prints each figure beside its baseline."""
