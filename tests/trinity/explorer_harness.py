"""Runs Trinity-RFT's own Explorer end to end on local Ray, the way Trinity's launcher does.

Everything on the path is Trinity's: its YAML loader and validators build the config, its
``Allocator`` starts its vLLM model actors (the CPU build, serving the tiny test model), its
taskset reader feeds ``explore_step``, its coordinator (or whatever ``RolloutCoordinator``
names once a setup hook has run in Ray's workers) runs its workflows, and its
``ExperiencePipeline`` writes the experience buffer, which is read back with Trinity's own
SQL storage. What the Explorer logs is captured by ``RecordingMonitor``, a Trinity monitor
chosen by its dotted path in the config.

Two concessions to a machine without a GPU, both outside Trinity's code:

- Ray is started with as many logical GPUs as the config asks for (vLLM's CPU build ignores
  the ``CUDA_VISIBLE_DEVICES`` Ray then sets), so Trinity's placement groups and validators
  see the cluster they expect.
- The config runs mode ``both`` with NCCL weight sync, Trinity's defaults, so that
  ``Explorer.prepare`` leaves the weight-sync group to the trainer, which never starts here:
  Trinity's weight transfer (even ``checkpoint``) broadcasts over NCCL on CUDA devices. For
  the same reason ``serve`` mode is exercised on the coordinator alone (``serve_experiences``):
  ``Explorer.prepare`` in serve mode opens one NCCL group per engine.

vLLM's CPU build also needs the ``trinity_cpu_worker`` plugin (``vllm_cpu_worker/``), which
re-bases Trinity's GPU worker class onto vLLM's CPU worker.
"""
from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray
import yaml
from trinity.common.config import Config, load_config
from trinity.utils.monitor import Monitor

from fastrollout.tinymodel import TINY_ENGINE_ARGS, TINY_ENV

HERE = Path(__file__).resolve().parent

# Taskset rows name their workflow (format.workflow_key), so one batch mixes all three kinds.
MATH = "math_workflow"
OPENAI = "trinity_test_workflows.OpenAIAnswerWorkflow"
JUDGED = "trinity_test_workflows.JudgedAnswerWorkflow"
WORKFLOWS = (MATH, OPENAI, JUDGED)

# The vLLM plugins the model actors load: Trinity's own and the CPU-worker one.
VLLM_PLUGINS = "vllm_patch,trinity_cpu_worker"
# Logical CPUs for Ray: one per model placement bundle plus room for the explorer, the
# coordinator and the synchronizer, which need one to be scheduled (not to run).
RAY_CPUS = 4


class RecordingMonitor(Monitor):
    """A Trinity monitor that appends each ``log`` call to ``<monitor dir>/<role>.jsonl``.

    The Explorer owns its monitor inside its Ray actor, so the record goes through a file.
    """

    def __init__(self, project: str, group: str, name: str, role: str,
                 config: Config | None = None) -> None:
        super().__init__(project, name, role, config)
        self.path = monitor_file(config, role)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("a")

    def log(self, data: dict, step: int, commit: bool = False) -> None:
        values = {k: float(v) for k, v in data.items()}
        self._file.write(json.dumps({"step": step, "metrics": values}) + "\n")
        self._file.flush()

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()


def monitor_file(config: Config, role: str) -> Path:
    return Path(config.monitor.cache_dir) / f"{role}.jsonl"


def write_taskset(folder: Path, rows: Sequence[dict], split: str) -> Path:
    """Write ``rows`` as ``folder/<split>.jsonl`` (Trinity's file taskset reads a folder)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{split}.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return folder


def math_rows(count: int, workflows: Sequence[str] = WORKFLOWS, start: int = 0) -> list[dict]:
    """``count`` addition questions with their answers, cycling through ``workflows``."""
    return [{"question": f"What is {i} + {i + 3}?", "answer": str(2 * i + 3),
             "workflow": workflows[i % len(workflows)]} for i in range(start, start + count)]


def explorer_config(workdir: Path, model: Path, *, name: str, batch_size: int = 6,
                    repeat_times: int = 4, eval_rows: int = 3, auxiliary: bool = True,
                    mode: str = "both", overrides: dict | None = None) -> Config:
    """A Trinity config, as YAML, loaded and validated by Trinity (Ray must be up).

    The train taskset holds two batches of ``batch_size`` tasks; the eval taskset
    ``eval_rows`` math tasks repeated twice. ``overrides`` is merged into the YAML tree
    (nested dicts merge, anything else replaces).
    """
    tasks = workdir / "tasks"
    write_taskset(tasks, math_rows(2 * batch_size), "train")
    write_taskset(tasks, math_rows(eval_rows, (MATH,), start=100), "test")
    engine = {
        "engine_type": "vllm", "engine_num": 1, "tensor_parallel_size": 1,
        "enforce_eager": TINY_ENGINE_ARGS["enforce_eager"], "dtype": TINY_ENGINE_ARGS["dtype"],
        "seed": TINY_ENGINE_ARGS["seed"],
        "extra_engine_args": {"kv_cache_memory_bytes": TINY_ENGINE_ARGS["kv_cache_memory_bytes"]},
    }
    fmt = {"prompt_key": "question", "response_key": "answer", "workflow_key": "workflow"}
    tree: dict[str, Any] = {
        "mode": mode,
        "project": "fastrollout-trinity",
        "group": "explorer",
        "name": name,
        "checkpoint_root_dir": str(workdir / "checkpoints"),
        "continue_from_checkpoint": False,
        "algorithm": {"algorithm_type": "grpo", "repeat_times": repeat_times},
        "model": {"model_path": str(model), "max_model_len": TINY_ENGINE_ARGS["max_model_len"],
                  "max_prompt_tokens": 128, "max_response_tokens": 16, "temperature": 1.0,
                  "logprobs": 0},
        "cluster": {"node_num": 1, "gpu_per_node": gpus_needed(auxiliary)},
        "buffer": {
            "batch_size": batch_size,
            "total_epochs": 1,
            "explorer_input": {
                "taskset": {"name": "math", "storage_type": "file", "path": str(tasks),
                            "split": "train", "format": fmt},
                "eval_tasksets": [{"name": "math_eval", "storage_type": "file",
                                   "path": str(tasks), "split": "test", "repeat_times": 2,
                                   "format": fmt}],
                "default_workflow_type": MATH,
            },
            "trainer_input": {"experience_buffer": {
                "name": "experiences", "storage_type": "sql",
                "path": "sqlite:///" + str(workdir / "experiences.db")}},
        },
        "explorer": {
            "runner_per_model": 2,
            "max_timeout": 120,
            "max_retry_times": 1,
            "eval_interval": 1,
            "eval_on_startup": False,
            "rollout_model": {**engine, "enable_openai_api": True, "enable_history": True},
            "auxiliary_models": ([{**engine, "model_path": str(model)}] if auxiliary else []),
        },
        "synchronizer": {"sync_method": "nccl", "sync_style": "fixed", "sync_interval": 1},
        "monitor": {"monitor_type": f"{RecordingMonitor.__module__}.RecordingMonitor"},
    }
    _merge(tree, overrides or {})
    path = workdir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(tree))
    return load_config(str(path)).check_and_update()


def gpus_needed(auxiliary: bool) -> int:
    """Logical GPUs for mode ``both``: one per engine plus the (idle) trainer's."""
    return 1 + int(auxiliary) + 1


def _merge(tree: dict, overrides: dict) -> None:
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(tree.get(key), dict):
            _merge(tree[key], value)
        else:
            tree[key] = value


def worker_env(workdir: Path) -> dict[str, str]:
    """Environment of every Ray worker: the tiny model's vLLM settings, caches in
    ``workdir``, and this folder importable (the custom workflows, the monitor)."""
    caches = str(workdir / "caches")
    return {
        **TINY_ENV,
        "VLLM_PLUGINS": VLLM_PLUGINS,
        "VLLM_RPC_BASE_PATH": caches, "VLLM_CACHE_ROOT": caches,
        "TORCHINDUCTOR_CACHE_DIR": caches,
        "TORCHDYNAMO_DISABLE": "1",
        # Two engines share two cores: no thread pinning to core 0.
        "VLLM_CPU_OMP_THREADS_BIND": "nobind",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(HERE), os.environ.get("PYTHONPATH")])),
    }


@contextmanager
def local_ray(workdir: Path, *, gpus: int, setup_hook: str | None = None) -> Iterator[None]:
    """A local Ray cluster for one run. ``setup_hook`` (``"module.function"``) runs in every
    worker process before it does anything else, e.g. to swap Trinity's coordinator."""
    (workdir / "caches").mkdir(parents=True, exist_ok=True)
    runtime_env: dict[str, Any] = {"env_vars": worker_env(workdir)}
    if setup_hook is not None:
        runtime_env["worker_process_setup_hook"] = setup_hook
    ray.init(address="local", num_cpus=RAY_CPUS, num_gpus=gpus, include_dashboard=False,
             runtime_env=runtime_env, log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()


@dataclass
class ExplorerRun:
    """What one run left behind, in the order Trinity produced it."""

    experiences: list            # trinity.common.experience.Experience, from the buffer
    logs: list[tuple[int, dict[str, float]]] = field(default_factory=list)  # monitor calls
    # Wall seconds of each phase seen from the driver: "prepare", "explore" (the explore
    # steps and the eval submission), "finish" (every finalize), "shutdown".
    seconds: dict[str, float] = field(default_factory=dict)

    def metrics(self, step: int) -> dict[str, float]:
        """Everything logged for ``step``, merged."""
        merged: dict[str, float] = {}
        for logged_step, values in self.logs:
            if logged_step == step:
                merged.update(values)
        return merged


def run_explorer(config: Config, *, steps: int = 2, evaluate: bool = True) -> ExplorerRun:
    """Drive Trinity's Explorer actor through ``prepare``, ``steps`` explore steps, an eval
    of the last step, the finish of every pending step, and ``shutdown``."""
    from trinity.explorer.explorer import Explorer

    seconds: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(phase: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        seconds[phase] = now - clock
        clock = now

    explorer = Explorer.get_actor(config)
    try:
        ray.get(explorer.prepare.remote())
        lap("prepare")
        for _ in range(steps):
            if not ray.get(explorer.explore_step.remote()):
                raise AssertionError("the Explorer stopped before the steps asked for")
        if evaluate:
            ray.get(explorer.eval.remote())
        lap("explore")
        ray.get(explorer.finish_current_steps.remote())
        lap("finish")
    finally:
        ray.get(explorer.shutdown.remote())
        ray.kill(explorer)
        lap("shutdown")
    return ExplorerRun(experiences=read_buffer(config),
                       logs=read_monitor(config, config.explorer.name), seconds=seconds)


def read_buffer(config: Config) -> list:
    """Every experience in ``trainer_input.experience_buffer``, in write order, through
    Trinity's own SQL storage (no Ray actor; reading does not consume)."""
    from trinity.buffer.storage.sql import SQLExperienceStorage

    buffer = config.buffer.trainer_input.experience_buffer
    storage = SQLExperienceStorage(buffer.to_storage_config())

    async def read() -> list:
        total = await storage.count()
        experiences = await storage.query(offset=0, limit=total) if total else []
        await storage.engine.dispose()
        return experiences

    return asyncio.run(read())


def read_monitor(config: Config, role: str) -> list[tuple[int, dict[str, float]]]:
    path = monitor_file(config, role)
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return [(row["step"], row["metrics"]) for row in rows]


def serve_experiences(config: Config, payloads: list[bytes]) -> dict:
    """Serve mode: Trinity's coordinator (as named in a worker) built for ``config``
    (mode ``serve``), prepared, fed ``payloads`` through ``process_experiences``, shut down.
    Returns the pipeline metrics. Runs in a Ray task, so a setup hook applies to it."""
    return ray.get(_serve.remote(config, payloads))


@ray.remote(num_cpus=0)
def _serve(config: Config, payloads: list[bytes]) -> dict:
    from trinity.explorer.rollout_coordinator import RolloutCoordinator

    coordinator = RolloutCoordinator.get_actor(config)
    try:
        ray.get(coordinator.prepare.remote())
        return ray.get(coordinator.process_experiences.remote(payloads))
    finally:
        ray.get(coordinator.shutdown.remote())
        ray.kill(coordinator)
