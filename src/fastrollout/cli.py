"""``fastrollout``: command-line entry point.

``fastrollout run`` runs the embedded default job (simulated engines, a scoring
workflow) or the one described by ``--config``, and prints each step's metrics.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

from .config import Config
from .coordinator import RolloutCoordinator
from .errors import FastRolloutError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastrollout", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run train and eval batches on simulated engines")
    run.add_argument("--config", help="YAML, TOML or JSON config (default: the embedded one)")
    run.add_argument("--steps", type=int, default=3, help="train batches to run")
    run.add_argument("--tasks", type=int, default=256, help="tasks per train batch")
    run.add_argument("--repeat", type=int, default=8, help="runs per task")
    run.add_argument("--engines", type=int, default=2, help="simulated engines")
    run.add_argument("--eval-tasks", type=int, default=64, help="tasks of the final eval batch")
    run.add_argument("--json", action="store_true", help="print results as JSON lines")
    return parser


async def _run(args: argparse.Namespace) -> None:
    from . import demo   # imported here: it builds engines, the parser need not

    config = Config.from_file(args.config) if args.config else demo.default_config()
    coordinator = RolloutCoordinator(config, demo.default_engines(args.engines))
    await coordinator.prepare()
    try:
        for step in range(args.steps):
            start = time.perf_counter()
            await coordinator.submit_batch(batch_id=step, batch_type="train",
                                           tasks=demo.make_tasks(step, args.tasks, args.repeat))
            result = await coordinator.finalize_train_batch(step)
            _report(args, result, time.perf_counter() - start, args.tasks)
            coordinator.take_experiences(step)
        if args.eval_tasks:
            start = time.perf_counter()
            batch_id = f"{args.steps}/demo"
            await coordinator.submit_batch(batch_id=batch_id, batch_type="eval",
                                           tasks=demo.make_tasks(args.steps, args.eval_tasks,
                                                                 args.repeat, is_eval=True))
            result = await coordinator.finalize_eval_batch(batch_id)
            _report(args, result, time.perf_counter() - start, args.eval_tasks)
    finally:
        await coordinator.shutdown()


def _report(args: argparse.Namespace, result: dict, seconds: float, tasks: int) -> None:
    if args.json:
        print(json.dumps({**result, "seconds": seconds}))
        return
    print(f"{result['batch_type']} batch {result['batch_id']}: {result['finished_task_count']}"
          f"/{tasks} tasks in {seconds:.3f} s ({tasks / seconds:,.0f} tasks/s)")
    for key, value in sorted(result["metrics"].items()):
        if "/time/" not in key:
            print(f"  {key:48s} {value:.4f}")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        import uvloop
        uvloop.run(_run(args))
    except FastRolloutError as exc:
        print(f"fastrollout: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
