"""Benchmarks: each script starts what it measures and compares side by side in one run."""
