"""Benchmarks (pytest-benchmark), each side by side with the alternative users would pick."""
