"""``fastrollout bench``: the latency of coordinator + engine on a synthetic workload.

The workload: ``--batches`` train batches of ``--tasks`` tasks; each task asks for
``--repeat`` samples in one request, with a prompt of ``--prompt-len`` tokens and a
``max_tokens`` drawn per task from ``--output-len`` (the simulated engine and the tiny model
always run to it; a real model may stop earlier). ``--concurrency`` task slots in all (split
over the engines, rounded up); ``--over-rollout R`` finalizes each batch once ``(1 - R)`` of
its tasks are done and cancels the rest. Engines: ``simulated`` (default; a latency model of
``--ttft`` + ``--tpot`` per further token, ``--capacity`` sequences at once), ``vllm``
(``--model``: a folder, a hub name or ``tiny``) or an OpenAI-compatible URL.

What is measured (``time.monotonic()``, the task ledger's clock), as JSON (``--json``):

- ``task_latency_s``: a task's first start on a slot to its booking (all its attempts);
- ``completion_s``: the batch's submission to the task's booking (queueing included);
- ``ttft_s``: per request, time to first token, where the engine tells it (``meter.py``:
  simulated: from its latency model; vLLM: its own ``first_token_latency``; OpenAI URLs: null);
- ``coordinator_overhead_s``: per task, ``task_latency`` minus the time of its engine
  requests: dispatch, workflow, checks, experiences and booking;
- ``output_tokens_per_s``: response tokens over the batches' wall time (submission to
  finalize returned);
- ``engine_utilization``: per engine, the share of the wall time it had a request in
  flight, averaged over the engines (``engines`` lists each);
- ``straggler_share``: the share of a batch's wall time spent after 90% of its tasks were
  done, averaged over the batches.

Each latency figure has ``p50``, ``p90``, ``p99``, ``max`` and ``mean`` (``numpy.percentile``,
linear interpolation) of the raw values under ``samples``; ``requests`` lists every engine
request ``[engine, start, first_token, end, output_tokens]`` (seconds from the first
submission). ``--plot DIR`` draws them (``plots.py``); ``--sweep concurrency=8,32,128`` runs the
workload once per value (``sweep``); ``--compare trinity`` runs it through Trinity-RFT
0.6.0's own coordinator too (``compare.trinity``; needs a source checkout, whose
``benchmarks/trinity_coordinator.py`` runs it in one process, and ``trinity-rft``).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from .config import Config
from .coordinator import RolloutCoordinator
from .errors import ConfigError
from .job import OpenAIEngines, SimulatedEngines, VLLMEngines, build_engines
from .lengths import Fixed, LengthSpec, parse_length
from .meter import MeteredEngine
from .progress import format_value
from .task import GenerationConfig, Task
from .workflow import Workflow

__all__ = ["Workload", "EngineChoice", "run_bench", "add_arguments", "run_from_args",
           "percentiles", "LATENCIES"]

LATENCIES = ("task_latency_s", "completion_s", "ttft_s", "coordinator_overhead_s")
STRAGGLER_QUANTILE = 0.9
# A length no request reaches: the simulated engine then runs every request to max_tokens.
_UNBOUNDED = 1 << 30
# Text whose token ids make the prompts, cycled to each prompt's length.
_PROMPT_TEXT = ("Rollouts sample responses from a policy; the trainer updates the weights. "
                "What is 17 + 25? The answer is 42. 0 1 2 3 4 5 6 7 8 9 ")


@dataclass
class Workload:
    tasks: int = 256
    repeat: int = 8
    batches: int = 1
    prompt_len: LengthSpec = field(default_factory=lambda: Fixed(value=64))
    output_len: LengthSpec = field(default_factory=lambda: parse_length("lognormal:64:0.6:256"))
    concurrency: int = 64
    over_rollout: float = 0.0
    seed: int = 0

    def describe(self) -> dict[str, Any]:
        out = asdict(self)
        out["prompt_len"], out["output_len"] = _spec(self.prompt_len), _spec(self.output_len)
        return out


@dataclass
class EngineChoice:
    """``simulated``, ``vllm`` or an OpenAI-compatible URL, with its settings."""

    kind: str = "simulated"
    count: int = 2
    model: str = "tiny"
    ttft: float = 0.02
    tpot: float = 0.002
    capacity: int | None = 256
    gpus: int | None = None
    tensor_parallel_size: int = 1
    engine_args: dict[str, Any] = field(default_factory=dict)

    def config(self) -> SimulatedEngines | VLLMEngines | OpenAIEngines:
        if self.kind == "simulated":
            return SimulatedEngines(count=self.count, ttft=self.ttft, tpot=self.tpot,
                                    capacity=self.capacity, output_len=Fixed(value=_UNBOUNDED))
        if self.kind == "vllm":
            return VLLMEngines(model=self.model, cpu_engines=self.count, gpus=self.gpus,
                               tensor_parallel_size=self.tensor_parallel_size,
                               engine_args=dict(self.engine_args))
        return OpenAIEngines(base_url=self.kind, model=self.model)

    def describe(self) -> dict[str, Any]:
        if self.kind == "simulated":
            return {"backend": "simulated", "count": self.count, "ttft": self.ttft,
                    "tpot": self.tpot, "capacity": self.capacity}
        if self.kind == "vllm":
            return {"backend": "vllm", "model": self.model, "count": self.count,
                    "gpus": self.gpus, "tensor_parallel_size": self.tensor_parallel_size,
                    "engine_args": self.engine_args}
        return {"backend": "openai", "base_url": self.kind, "model": self.model}


def _spec(spec: LengthSpec) -> dict[str, Any]:
    import msgspec
    return msgspec.to_builtins(spec)


class BenchWorkflow(Workflow):
    """One request of ``repeat_times`` samples: the prompt ids and ``max_tokens`` come with
    the task; each sample becomes an experience with a reward, as a math workflow's would."""

    can_repeat = True
    is_async = True

    async def run_async(self) -> list:
        from .experience import Experience

        raw = self.task.raw_task
        prompt = raw["prompt"]
        completions = await self.model.generate_tokens_async(prompt, n=self.repeat_times,
                                                             max_tokens=raw["max_tokens"])
        exps = []
        for i, c in enumerate(completions):
            exp = Experience(tokens=np.concatenate((prompt, c.token_ids)),
                             prompt_length=len(prompt), logprobs=c.logprobs,
                             reward=float(i % 2))
            exp.eid.run = self.run_id_base + i
            exps.append(exp)
        return exps


class _TimedCoordinator(RolloutCoordinator):
    """Stamps each task's booking, with its first start read from the task ledger. The
    coordinator has no public per-task hook yet; this overrides its private one."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.booked: list[tuple[Any, int, float, float]] = []

    def _task_finished(self, state: Any, record: Any, status: Any) -> None:
        start = float(self._scheduler.ledger.columns()[record.row]["start_ns"]) * 1e-9
        self.booked.append((state.batch_id, record.task_id, start, time.monotonic()))
        super()._task_finished(state, record, status)


def make_tasks(workload: Workload, batch: int, prompt_ids: list[int]) -> list[Task]:
    rng = random.Random(workload.seed * 1_000_003 + batch)
    prompt_len = workload.prompt_len.sampler(rng)
    output_len = workload.output_len.sampler(rng)
    cycle = prompt_ids * (1 + 4096 // max(len(prompt_ids), 1))
    tasks = []
    for i in range(workload.tasks):
        n = prompt_len()
        while len(cycle) < n:
            cycle = cycle + cycle
        tasks.append(Task(workflow=BenchWorkflow, repeat_times=workload.repeat,
                          rollout_args=GenerationConfig(temperature=1.0, logprobs=0, seed=i),
                          raw_task={"prompt": np.asarray(cycle[:n], np.int32),
                                    "max_tokens": output_len()}))
    return tasks


def coordinator_config(workload: Workload, engines: int) -> Config:
    return Config.from_dict({
        "explorer": {"runner_per_model": max(1, math.ceil(workload.concurrency / engines)),
                     "max_retry_times": 0, "max_timeout": 600.0,
                     "over_rollout": {"ratio": workload.over_rollout, "wait_after_min": 0.0}},
        "pipeline": {"sink": "discard"},
    })


def min_wait_num(workload: Workload) -> int | None:
    if workload.over_rollout <= 0:
        return None
    return max(1, math.ceil(workload.tasks * (1 - workload.over_rollout)))


async def run_bench(workload: Workload, engine: EngineChoice,
                    engines: list[MeteredEngine] | None = None) -> dict[str, Any]:
    """Run ``workload``; its report (see the module doc). ``engines``: started metered
    engines to reuse (a sweep starts vLLM once); else they are made and shut down here."""
    own = engines is None
    if engines is None:
        engines = [MeteredEngine(e, record=True) for e in build_engines(engine.config())]
    config = coordinator_config(workload, len(engines))
    coordinator = _TimedCoordinator(config, engines)
    await coordinator.prepare()
    try:
        prompt_ids = engines[0].encode(_PROMPT_TEXT)
        windows: list[tuple[float, float]] = []
        for b in range(workload.batches):
            tasks = make_tasks(workload, b, prompt_ids)
            start = time.monotonic()
            await coordinator.submit_batch(batch_id=b, batch_type="train", tasks=tasks,
                                           min_wait_num=min_wait_num(workload))
            await coordinator.finalize_train_batch(b)
            windows.append((start, time.monotonic()))
    finally:
        await coordinator.shutdown()
        if own:
            await asyncio.gather(*(e.shutdown() for e in engines), return_exceptions=True)
    return _report(workload, engine, engines, coordinator.booked, windows)


def percentiles(values: Any) -> dict[str, float] | None:
    """p50 / p90 / p99 / max / mean of ``values`` (None when there are none)."""
    arr = np.asarray(values, dtype=np.float64)
    arr = arr[~np.isnan(arr)]
    if not len(arr):
        return None
    p50, p90, p99 = np.percentile(arr, [50, 90, 99])
    return {"p50": float(p50), "p90": float(p90), "p99": float(p99), "max": float(arr.max()),
            "mean": float(arr.mean())}


def _report(workload: Workload, engine: EngineChoice, engines: list[MeteredEngine],
            booked: list[tuple[Any, int, float, float]],
            windows: list[tuple[float, float]]) -> dict[str, Any]:
    t0 = windows[0][0]
    submit = {b: start for b, (start, _) in enumerate(windows)}
    engine_time: dict[tuple[int, int], float] = {}
    requests = []
    for index, metered in enumerate(engines):
        log = metered.take_log()
        for rid, s, f, e, n in zip(log.request_ids, log.start, log.first_token, log.end,
                                   log.output_tokens, strict=True):
            batch, task = _task_of(rid)
            engine_time[batch, task] = engine_time.get((batch, task), 0.0) + (e - s)
            requests.append([index, s - t0, f - t0, e - t0, n])
    latency = [end - start for _, _, start, end in booked]
    completion = [end - submit[b] for b, _, _, end in booked]
    overhead = [(end - start) - engine_time.get((b, t), 0.0) for b, t, start, end in booked]
    ttft = [r[2] - r[1] for r in requests]
    wall = sum(end - start for start, end in windows)
    tokens = sum(r[4] for r in requests)
    per_engine = []
    for index, metered in enumerate(engines):
        spans = [(r[1], r[3]) for r in requests if r[0] == index]
        per_engine.append({"name": metered.name, "requests": len(spans),
                           "output_tokens": sum(r[4] for r in requests if r[0] == index),
                           "busy_share": _busy(spans, windows, t0) / wall if wall else 0.0})
    stragglers = []
    for b, (start, end) in enumerate(windows):
        done = sorted(c for (bb, _, _, c) in booked if bb == b)
        if done and end > start:
            k = max(0, math.ceil(STRAGGLER_QUANTILE * len(done)) - 1)
            stragglers.append((end - done[k]) / (end - start))
    samples = {"task_latency_s": latency, "completion_s": completion, "ttft_s": ttft,
               "coordinator_overhead_s": overhead}
    report: dict[str, Any] = {
        "workload": workload.describe(), "engine": engine.describe(),
        "concurrency": coordinator_config(workload, len(engines)).explorer.runner_per_model
        * len(engines),
        "tasks": workload.tasks * workload.batches, "finished_tasks": len(booked),
        "wall_s": wall,
        **{name: percentiles(values) for name, values in samples.items()},
        "output_tokens": tokens, "output_tokens_per_s": tokens / wall if wall else 0.0,
        "engine_utilization": float(np.mean([e["busy_share"] for e in per_engine])),
        "engines": per_engine,
        "straggler_share": float(np.mean(stragglers)) if stragglers else None,
        "samples": {k: [None if math.isnan(v) else v for v in vals]
                    for k, vals in samples.items()},
        "requests": [[i, s, None if math.isnan(f) else f, e, n] for i, s, f, e, n in requests],
    }
    return report


def _task_of(request_id: str) -> tuple[int, int]:
    """(batch, task) of a request id ``{batch}/{task}/{run_id_base}/{attempt}-{k}``."""
    batch, task, _, _ = request_id.rsplit("/", 3)
    return int(batch), int(task)


def _busy(spans: list[tuple[float, float]], windows: list[tuple[float, float]],
          t0: float) -> float:
    """Seconds within ``windows`` covered by at least one span (spans relative to ``t0``)."""
    total = 0.0
    for start, end in windows:
        lo, hi = start - t0, end - t0
        cur_start = cur_end = None
        for s, e in sorted((max(s, lo), min(e, hi)) for s, e in spans if e > lo and s < hi):
            if cur_end is None or s > cur_end:
                if cur_end is not None:
                    total += cur_end - cur_start
                cur_start, cur_end = s, e
            else:
                cur_end = max(cur_end, e)
        if cur_end is not None:
            total += cur_end - cur_start
    return total


# -- sweeps and Trinity ----------------------------------------------------------------------

SWEEPABLE = {"concurrency": int, "tasks": int, "repeat": int, "over_rollout": float,
             "batches": int}


def parse_sweep(text: str) -> tuple[str, list[Any]]:
    key, sep, values = text.partition("=")
    if not sep or key not in SWEEPABLE:
        raise ConfigError(f"--sweep: expected KEY=V1,V2,... with KEY one of "
                          f"{', '.join(SWEEPABLE)}, got {text!r}")
    try:
        parsed = [SWEEPABLE[key](v) for v in values.split(",") if v]
    except ValueError:
        raise ConfigError(f"--sweep {key}: {values!r} is not a list of numbers") from None
    if not parsed:
        raise ConfigError(f"--sweep {key}: no values")
    return key, parsed


async def run_sweep(workload: Workload, engine: EngineChoice, key: str,
                    values: list[Any]) -> list[dict[str, Any]]:
    """The workload once per value of ``key``, on the same engines (started once)."""
    engines = [MeteredEngine(e, record=True) for e in build_engines(engine.config())]
    try:
        await asyncio.gather(*(e.prepare() for e in engines))
        return [{key: value, **_brief(await run_bench(replace(workload, **{key: value}),
                                                      engine, engines))}
                for value in values]
    finally:
        await asyncio.gather(*(e.shutdown() for e in engines), return_exceptions=True)


def _brief(report: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in report.items() if k not in ("samples", "requests", "workload",
                                                            "engine")}


async def run_trinity(workload: Workload, engine: EngineChoice) -> dict[str, Any]:
    from .trinity_bench import run_trinity_workload

    return await run_trinity_workload(workload, engine)


# -- command line ----------------------------------------------------------------------------

def add_arguments(p: argparse.ArgumentParser) -> None:
    w, e = Workload(), EngineChoice()
    g = p.add_argument_group("workload")
    g.add_argument("--tasks", type=int, default=w.tasks, help="tasks per batch")
    g.add_argument("--repeat", type=int, default=w.repeat, help="samples per task (one request)")
    g.add_argument("--batches", type=int, default=w.batches)
    g.add_argument("--prompt-len", default="fixed:64",
                   help="prompt tokens: N, uniform:LOW:HIGH, lognormal:MEDIAN:SIGMA[:MAX], "
                        "replay:FILE")
    g.add_argument("--output-len", default="lognormal:64:0.6:256",
                   help="max_tokens per task, same forms")
    g.add_argument("--concurrency", type=int, default=w.concurrency, help="task slots in all")
    g.add_argument("--over-rollout", type=float, default=w.over_rollout,
                   help="finalize when (1 - R) of the tasks are done")
    g.add_argument("--seed", type=int, default=w.seed)
    g = p.add_argument_group("engine")
    g.add_argument("--engine", default=e.kind,
                   help="simulated, vllm, or an OpenAI-compatible URL (http://host:port/v1)")
    g.add_argument("--engines", type=int, default=e.count,
                   help="simulated engines, or vLLM engines on the CPU build")
    g.add_argument("--model", default=e.model,
                   help="vllm: a model folder, hub name or 'tiny'; URL: the served model")
    g.add_argument("--gpus", type=int, default=None, help="vllm: GPUs to use (default: all)")
    g.add_argument("--tensor-parallel-size", type=int, default=1)
    g.add_argument("--engine-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="a vLLM engine argument (value read as YAML), repeatable")
    g.add_argument("--ttft", type=float, default=e.ttft, help="simulated: seconds to first token")
    g.add_argument("--tpot", type=float, default=e.tpot, help="simulated: seconds per token")
    g.add_argument("--capacity", type=int, default=e.capacity,
                   help="simulated: sequences decoded at once per engine")
    g = p.add_argument_group("output")
    g.add_argument("--json", metavar="PATH",
                   help="write the report as JSON ('-': print it instead of the table)")
    g.add_argument("--plot", metavar="DIR", help="write PNG plots into DIR (needs matplotlib)")
    g.add_argument("--sweep", metavar="KEY=V1,V2",
                   help=f"run once per value of one of {', '.join(SWEEPABLE)}")
    g.add_argument("--compare", choices=["trinity"],
                   help="also run the workload through Trinity-RFT 0.6.0's coordinator")


def _from_args(args: argparse.Namespace) -> tuple[Workload, EngineChoice]:
    import yaml

    for name in ("tasks", "repeat", "batches", "concurrency", "engines"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name}: must be >= 1, got {getattr(args, name)}")
    if not 0 <= args.over_rollout < 1:
        raise ConfigError(f"--over-rollout: must be in [0, 1), got {args.over_rollout}")
    for name in ("ttft", "tpot"):
        if getattr(args, name) < 0:
            raise ConfigError(f"--{name}: must be >= 0, got {getattr(args, name)}")
    kind = args.engine
    if kind not in ("simulated", "vllm") and not kind.startswith(("http://", "https://")):
        raise ConfigError(f"--engine: expected simulated, vllm or an http(s) URL, got {kind!r}")
    engine_args = {}
    for item in args.engine_arg:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--engine-arg: expected KEY=VALUE, got {item!r}")
        engine_args[key] = yaml.safe_load(value)
    workload = Workload(tasks=args.tasks, repeat=args.repeat, batches=args.batches,
                        prompt_len=parse_length(args.prompt_len, "--prompt-len"),
                        output_len=parse_length(args.output_len, "--output-len"),
                        concurrency=args.concurrency, over_rollout=args.over_rollout,
                        seed=args.seed)
    engine = EngineChoice(kind=kind, count=args.engines, model=args.model, ttft=args.ttft,
                          tpot=args.tpot, capacity=args.capacity, gpus=args.gpus,
                          tensor_parallel_size=args.tensor_parallel_size,
                          engine_args=engine_args)
    return workload, engine


async def _bench_all(args: argparse.Namespace, workload: Workload,
                     engine: EngineChoice) -> dict[str, Any]:
    sweep = parse_sweep(args.sweep) if args.sweep else None
    report = await run_bench(workload, engine)
    if sweep is not None:
        report["sweep"] = {"key": sweep[0], "runs": await run_sweep(workload, engine, *sweep)}
    if args.compare == "trinity":
        report["compare"] = {"trinity": await run_trinity(workload, engine)}
    return report


def run_from_args(args: argparse.Namespace) -> int:
    from .cli import _event_loop

    workload, engine = _from_args(args)
    if args.sweep:
        parse_sweep(args.sweep)     # a bad flag fails before anything runs
    report = _event_loop(_bench_all(args, workload, engine))
    if args.json and args.json != "-":
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report) + "\n")
    if args.json == "-":
        print(json.dumps(report))
    else:
        print(render(report))
    if args.plot:
        from .plots import write_plots

        for path in write_plots(report, Path(args.plot)):
            print(f"plot: {path}", file=sys.stderr if args.json == "-" else sys.stdout)
    return 0


def render(report: dict[str, Any]) -> str:
    """The report as a text table (side by side with Trinity's when compared)."""
    other = report.get("compare", {}).get("trinity")
    head = ["", "fastrollout"] + (["trinity-rft 0.6.0"] if other else [])
    rows = [head]

    def add(label: str, value: Any, theirs: Any = None) -> None:
        rows.append([label, format_value(value)] + ([format_value(theirs)] if other else []))

    add("tasks finished", f"{report['finished_tasks']}/{report['tasks']}",
        f"{other['finished_tasks']}/{other['tasks']}" if other else None)
    add("wall s", report["wall_s"], other and other["wall_s"])
    for name in LATENCIES:
        mine, theirs = report.get(name), other.get(name) if other else None
        for q in ("p50", "p90", "p99", "max"):
            if mine is not None or theirs is not None:
                add(f"{name[:-2].replace('_', ' ')} {q} ms", mine and mine[q] * 1e3,
                    theirs and theirs[q] * 1e3)
    add("output tokens/s", report["output_tokens_per_s"], other and other["output_tokens_per_s"])
    add("engine utilization", report["engine_utilization"],
        other and other["engine_utilization"])
    add("straggler share", report["straggler_share"], other and other["straggler_share"])
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in
                       enumerate(zip(r, widths, strict=True))) for r in rows]
    sweep = report.get("sweep")
    if sweep:
        key = sweep["key"]
        lines.append("")
        lines.append(f"{key:>12}  {'p50 ms':>9}  {'p99 ms':>9}  {'tokens/s':>10}  {'util':>5}")
        for run in sweep["runs"]:
            lat = run["task_latency_s"] or {"p50": math.nan, "p99": math.nan}
            lines.append(f"{run[key]:>12}  {lat['p50'] * 1e3:>9.2f}  {lat['p99'] * 1e3:>9.2f}  "
                         f"{run['output_tokens_per_s']:>10,.0f}  "
                         f"{run['engine_utilization']:>5.2f}")
    return "\n".join(lines)
