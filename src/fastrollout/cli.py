"""``fastrollout``: the command line.

- ``fastrollout run [CONFIG] [--set key=value ...]``: run a job (``fastrollout.job``; with no
  file the embedded default: the tiny model on vLLM, arithmetic questions, the math
  workflow), with a live progress display, into ``runs/<name>/`` (``fastrollout.driver``).
- ``fastrollout bench ...``: latency of coordinator + engine on a synthetic workload
  (``fastrollout.bench``), as a table, JSON and plots.
- ``fastrollout inspect FILE``: summarize and check an experience payload or log.

Exit status: 0 done, 1 the job failed, 2 a bad config or argument, 130 interrupted (SIGINT).
"""
from __future__ import annotations

import argparse
import gc
import json
import sys
from pathlib import Path

from .errors import ConfigError, FastRolloutError, TasksetError

EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 1, 2, 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastrollout", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run a job: rollouts on real or simulated engines",
                         description="Run a job described by CONFIG (YAML, TOML or JSON) over "
                                     "the embedded default; without CONFIG, the default itself.")
    run.add_argument("config", nargs="?", help="the job file (default: the embedded job)")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override one key, e.g. --set steps=2 --set engines.backend=simulated")
    run.add_argument("--progress", choices=["auto", "rich", "plain", "none"], default="auto",
                     help="live display on a terminal (auto), or plain lines")
    run.add_argument("--show-config", action="store_true",
                     help="print the job as resolved (YAML) and exit")

    from .bench import add_arguments  # the bench's own flags live with it
    add_arguments(sub.add_parser("bench", help="latency benchmark of coordinator + engine",
                                 description="Run a synthetic workload through the coordinator "
                                             "and report task latency, time to first token, "
                                             "tokens/s, engine utilization, stragglers and the "
                                             "coordinator's own overhead."))

    inspect = sub.add_parser("inspect", help="summarize and check a payload or experience log")
    inspect.add_argument("path", help="an FRXP/TRXP payload file or a durable log folder")
    inspect.add_argument("--json", action="store_true", help="print the summary as JSON")
    return parser


def _run(args: argparse.Namespace) -> int:
    from .driver import run_job
    from .job import load_job
    from .progress import make_display

    job = load_job(args.config, args.overrides)
    if args.show_config:
        print(job.to_yaml(), end="")
        return 0
    base = Path(args.config).resolve().parent if args.config else Path.cwd()
    display = make_display(args.progress)
    try:
        result = _event_loop(run_job(job, base, display))
    finally:
        display.close()
        gc.collect()    # vLLM's engine objects go now, not at interpreter exit (when they fail)
    print(f"{result.status}: {result.train_steps} train step(s), "
          f"{len(result.finalized)} batch(es) finalized; see {result.run_dir}")
    return EXIT_INTERRUPTED if result.status == "interrupted" else 0


def _bench(args: argparse.Namespace) -> int:
    from .bench import run_from_args

    return run_from_args(args)


def _inspect(args: argparse.Namespace) -> int:
    from .inspector import inspect_path, render

    summary = inspect_path(args.path)
    print(json.dumps(summary, indent=1) if args.json else render(summary))
    return 0


def _event_loop(coro):
    try:
        import uvloop
    except ImportError:
        import asyncio
        return asyncio.run(coro)
    return uvloop.run(coro)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    command = {"run": _run, "bench": _bench, "inspect": _inspect}[args.command]
    try:
        return command(args)
    except (ConfigError, TasksetError) as exc:
        print(f"fastrollout {args.command}: config error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"fastrollout {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (FastRolloutError, OSError) as exc:
        print(f"fastrollout {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
