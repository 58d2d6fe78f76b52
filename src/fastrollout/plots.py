"""PNG plots of a ``fastrollout bench`` report (matplotlib, the ``plots`` extra):

- ``latency_cdf.png``: the distributions of task latency, completion time and time to first
  token (with Trinity's task latency and completion time when compared);
- ``timeline.png``: per engine, every request as a bar from its start to its end (a Gantt
  chart, one lane per request in flight at once), a tick at its first token;
- ``tokens_per_s.png``: output tokens/s over time, each request's tokens spread evenly from
  its first token (its start when unknown) to its end;
- ``sweep.png`` (with ``--sweep``): task latency p50/p99 and output tokens/s per value.
"""
from __future__ import annotations

import heapq
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["write_plots"]

_TIME_BINS = 100


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError as exc:
        raise ImportError("--plot needs matplotlib: pip install 'fastrollout[plots]'") from exc
    matplotlib.use("Agg")       # files only: no display needed
    import matplotlib.pyplot as plt
    return plt


def write_plots(report: dict[str, Any], folder: Path) -> list[Path]:
    """Write the plots of ``report`` into ``folder``; the files written."""
    plt = _pyplot()
    folder.mkdir(parents=True, exist_ok=True)
    paths = [_cdf(plt, report, folder / "latency_cdf.png"),
             _timeline(plt, report, folder / "timeline.png"),
             _throughput(plt, report, folder / "tokens_per_s.png")]
    if report.get("sweep"):
        paths.append(_sweep(plt, report["sweep"], folder / "sweep.png"))
    return paths


def _title(report: dict[str, Any]) -> str:
    w, e = report["workload"], report["engine"]
    return (f"{report['tasks']} tasks x {w['repeat']}, concurrency {report['concurrency']}, "
            f"{e.get('count', 1)} {e['backend']} engine(s)")


def _save(plt: Any, fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _cdf(plt: Any, report: dict[str, Any], path: Path) -> Path:
    from matplotlib import ticker

    fig, ax = plt.subplots(figsize=(7, 4.2))
    series = [("task latency", report["samples"]["task_latency_s"], "-"),
              ("completion (queue included)", report["samples"]["completion_s"], "-"),
              ("time to first token", report["samples"]["ttft_s"], "-")]
    other = report.get("compare", {}).get("trinity")
    if other:
        series += [("Trinity task latency", other["samples"]["task_latency_s"], "--"),
                   ("Trinity completion", other["samples"]["completion_s"], "--")]
    for label, values, style in series:
        arr = np.sort(np.asarray([v for v in values if v is not None], dtype=np.float64))
        if len(arr):
            ax.step(arr * 1e3, np.arange(1, len(arr) + 1) / len(arr), style, where="post",
                    label=label)
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda x, _: f"{x:g}"))
    ax.xaxis.set_minor_formatter(ticker.NullFormatter())
    ax.set_xlabel("milliseconds")
    ax.set_ylabel("share of tasks / requests")
    ax.set_title(f"Latency CDF: {_title(report)}", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    return _save(plt, fig, path)


def _lanes(starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """A lane per request such that requests in one lane do not overlap (a lane is reused
    once the request that ended first in it is over)."""
    lanes = np.zeros(len(starts), dtype=np.int64)
    busy: list[tuple[float, int]] = []      # (end, lane) of the last request of each lane
    for i in np.argsort(starts, kind="stable"):
        if busy and busy[0][0] <= starts[i]:
            _, lane = heapq.heappop(busy)
        else:
            lane = len(busy)
        lanes[i] = lane
        heapq.heappush(busy, (float(ends[i]), lane))
    return lanes


def _timeline(plt: Any, report: dict[str, Any], path: Path) -> Path:
    requests = report["requests"]
    names = [e["name"] for e in report["engines"]]
    fig, ax = plt.subplots(figsize=(9, 4.8))
    base = 0
    ticks, labels = [], []
    for index, name in enumerate(names):
        rows = [r for r in requests if r[0] == index]
        if not rows:
            continue
        starts = np.array([r[1] for r in rows])
        ends = np.array([r[3] for r in rows])
        lanes = _lanes(starts, ends) + base
        color = f"C{index % 10}"
        ax.hlines(lanes, starts, ends, colors=color, linewidth=2)
        firsts = np.array([np.nan if r[2] is None else r[2] for r in rows])
        known = ~np.isnan(firsts)
        ax.plot(firsts[known], lanes[known], "|", color="black", markersize=3)
        height = int(lanes.max()) - base + 1
        ticks.append(base + height / 2)
        labels.append(f"engine {index}\n{name}")
        base += height + 2
    ax.set_yticks(ticks, labels, fontsize=8)
    ax.set_xlabel("seconds since the first submission")
    ax.set_title(f"Requests per engine (| first token): {_title(report)}", fontsize=10)
    ax.grid(True, axis="x", alpha=0.3)
    return _save(plt, fig, path)


def tokens_over_time(requests: list[list[Any]], bins: int = _TIME_BINS
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Bin edges and output tokens/s per bin, each request's tokens spread evenly over
    [first token (else start), end]."""
    if not requests:
        return np.zeros(1), np.zeros(0)
    a = np.array([r[1] if r[2] is None else r[2] for r in requests], dtype=np.float64)
    b = np.array([r[3] for r in requests], dtype=np.float64)
    n = np.array([r[4] for r in requests], dtype=np.float64)
    edges = np.linspace(0.0, float(b.max()), bins + 1)
    span = np.maximum(b - a, 1e-9)
    # Tokens made by each edge: linear in time from a to b.
    made = n[None, :] * np.clip((edges[:, None] - a[None, :]) / span[None, :], 0.0, 1.0)
    cumulative = made.sum(axis=1)
    return edges, np.diff(cumulative) / np.diff(edges)


def _throughput(plt: Any, report: dict[str, Any], path: Path) -> Path:
    edges, rate = tokens_over_time(report["requests"])
    fig, ax = plt.subplots(figsize=(7, 4.2))
    if len(rate):
        ax.step(edges[:-1], rate, where="post")
        ax.fill_between(edges[:-1], rate, step="post", alpha=0.3)
    ax.axhline(report["output_tokens_per_s"], color="gray", linestyle="--",
               label=f"mean {report['output_tokens_per_s']:,.0f} tokens/s")
    ax.set_xlabel("seconds since the first submission")
    ax.set_ylabel("output tokens/s")
    ax.set_title(f"Throughput: {_title(report)}", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    return _save(plt, fig, path)


def _sweep(plt: Any, sweep: dict[str, Any], path: Path) -> Path:
    key, runs = sweep["key"], sweep["runs"]
    xs = [run[key] for run in runs]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for q, style in (("p50", "o-"), ("p99", "s--")):
        ys = [run["task_latency_s"][q] * 1e3 if run["task_latency_s"] else np.nan
              for run in runs]
        ax.plot(xs, ys, style, label=f"task latency {q}")
    ax.set_xlabel(key)
    ax.set_ylabel("milliseconds")
    if key == "concurrency" and min(xs) > 0:
        from matplotlib import ticker

        ax.set_xscale("log", base=2)
        ax.set_xticks(xs, [str(x) for x in xs])
        ax.xaxis.set_minor_formatter(ticker.NullFormatter())
    right = ax.twinx()
    right.plot(xs, [run["output_tokens_per_s"] for run in runs], "^:", color="C2",
               label="output tokens/s")
    right.set_ylabel("output tokens/s")
    lines = ax.get_legend_handles_labels()
    more = right.get_legend_handles_labels()
    ax.legend(lines[0] + more[0], lines[1] + more[1], fontsize=8)
    ax.set_title(f"Task latency and throughput by {key}", fontsize=10)
    ax.grid(True, alpha=0.3)
    return _save(plt, fig, path)
