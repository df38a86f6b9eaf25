"""Benchmarks: run as ``python -m benchmarks.kernels`` from the repository root."""
