"""``fastrollout inspect``: summarize and check an experience payload file (FRXP, or Trinity's
TRXP) or a durable experience log folder: every record is read and decoded, so a corrupt
input raises the codec's or the log's error (``PayloadError``, ``LogCorruptError``) naming
where it is."""
from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["inspect_path", "render"]


def inspect_path(path: str | Path) -> dict[str, Any]:
    """The summary of the payload file or log folder at ``path``."""
    from .experience import ExperienceBatch, decode_any

    path = Path(path)
    if path.is_dir():
        from .sinks import DurableLogReader

        batches, ids = [], []
        with DurableLogReader(path) as reader:
            for record in reader:
                batches.append(record.batch())
                ids.append(record.batch_id)
            end = reader.position
        size = sum(p.stat().st_size for p in path.glob("*.frlog"))
        out = {"kind": "durable log", "path": str(path), "records": len(ids),
               "batch_ids": ids, "bytes": size, "log_end": end}
        if size > end:
            out["torn_tail_bytes"] = size - end   # a write cut short: the next writer drops it
        return {**out, **_summary(ExperienceBatch.concat(batches))}
    raw = path.read_bytes()
    batch = decode_any(raw)
    return {"kind": f"{raw[:4].decode('ascii')} payload", "path": str(path),
            "bytes": len(raw), **_summary(batch)}


def _stats(values: np.ndarray) -> dict[str, float] | None:
    if not len(values):
        return None
    return {"min": float(values.min()), "mean": float(values.mean()),
            "max": float(values.max())}


def _summary(batch: Any) -> dict[str, Any]:
    n = len(batch)
    out: dict[str, Any] = {"experiences": n}
    if not n:
        return out
    rewards = batch.rewards[~np.isnan(batch.rewards)]
    versions = Counter(info.get("model_version") for info in batch.meta("info")
                       if isinstance(info, dict))
    versions.pop(None, None)
    out.update({
        "tasks": len({(e.batch, e.task) for e in (item.eid for item in batch.items)}),
        "prompt_tokens": _stats(batch.prompt_lengths),
        "response_tokens": _stats(batch.response_lengths()),
        "rewards": _stats(rewards), "without_reward": int(n - len(rewards)),
        "model_versions": {str(k): v for k, v in sorted(versions.items())},
        "columns": sorted(batch.columns),
    })
    return out


def render(summary: dict[str, Any]) -> str:
    lines = []
    for key, value in summary.items():
        if isinstance(value, dict):
            value = "  ".join(f"{k}={_fmt(v)}" for k, v in value.items()) or "-"
        elif isinstance(value, list):
            shown = ", ".join(map(str, value[:20]))
            value = shown + (f", ... ({len(value)} in all)" if len(value) > 20 else "")
        lines.append(f"{key.replace('_', ' '):>16}: {_fmt(value)}")
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "-" if value is None else str(value)
