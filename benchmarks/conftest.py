"""Prints each benchmark's ``extra_info`` (throughput, bytes per item, ...) after
pytest-benchmark's timing tables, which show only times."""
from __future__ import annotations

import pytest

# benchmarks/trinity/ runs in the Trinity environment (.venv-trinity: make test-trinity builds
# it), which this one cannot import.
collect_ignore = ["trinity"]


@pytest.hookimpl(trylast=True)
def pytest_terminal_summary(terminalreporter, config):
    session = getattr(config, "_benchmarksession", None)
    rows = [b for b in getattr(session, "benchmarks", ()) if b.extra_info]
    if not rows:
        return
    terminalreporter.section("benchmark extra_info")
    for bench in rows:
        info = ", ".join(f"{key}={value}" for key, value in bench.extra_info.items())
        terminalreporter.write_line(f"{bench.fullname}: {info}")
