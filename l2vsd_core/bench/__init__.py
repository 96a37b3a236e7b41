"""Benchmarks that print ratios measured in one run: ``python -m l2vsd_core.bench step``."""
