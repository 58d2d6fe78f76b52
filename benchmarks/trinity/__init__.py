"""Benchmarks against Trinity-RFT's own classes; they run in .venv-trinity (.ci/trinity-venv)."""
