"""fastrollout.compat.trinity.RolloutCoordinator against Trinity-RFT 0.6.0's real classes.

Trinity's own Config, Task, Workflow, ModelWrapper, ExperiencePipeline (GRPO advantages)
and SQL experience buffer, on local Ray. The engines are Ray actors implementing Trinity's
``InferenceModel`` with a deterministic echo "model" (as Trinity's own scheduler tests use
dummy model actors): what is under test is the coordination, and these engines can hang a
request on demand and count the requests cancelled in them. Some engines also serve an
OpenAI-compatible HTTP API (aiohttp), which Trinity's wrapper uses for auxiliary models.
Trinity's vLLM model actors drive the real Explorer in ``test_compat_explorer.py``.

The same batches also run on Trinity's own coordinator, and the buffers and metric keys
are compared (``test_same_buffer_and_metric_keys_as_trinity``).
"""
from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import uuid

import pytest
import ray
import torch
from aiohttp import web
from trinity.common.config import Config, InferenceModelConfig, StorageConfig
from trinity.common.experience import Experience
from trinity.common.models.model import InferenceModel, ModelWrapper
from trinity.common.workflows import Task
from trinity.common.workflows.workflow import Workflow

from fastrollout.compat.trinity import RolloutCoordinator

NAMESPACE = "fastrollout-compat-test"
ENV_KEY = "FASTROLLOUT_COMPAT_TEST"


# -- engines: Trinity InferenceModel actors ----------------------------------------------------

class EchoModel(InferenceModel):
    """Answers ``"<prompt>#<i>"`` for each of ``n`` samples; a prompt starting with "hang"
    waits until cancelled (and counts the cancellation)."""

    def __init__(self, config: InferenceModelConfig) -> None:
        super().__init__(config)
        self.version = 0
        self.cancelled = 0
        self.requests = 0
        self.hanging = 0    # requests waiting now
        self.url: str | None = None

    async def prepare(self) -> None:
        if self.config.enable_openai_api:
            app = web.Application()
            app.router.add_get("/health", lambda _: web.Response(text="ok"))
            app.router.add_post("/v1/chat/completions", self._completion)
            runner = web.AppRunner(app)
            await runner.setup()
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            port = site._server.sockets[0].getsockname()[1]
            self.url = f"http://127.0.0.1:{port}"

    async def _completion(self, request: web.Request) -> web.Response:
        body = await request.json()
        content = f"aux:{body['messages'][-1]['content']}"
        return web.json_response({
            "id": "c", "object": "chat.completion", "created": 0, "model": body["model"],
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": content}}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}})

    def get_api_server_url(self) -> str | None:
        return self.url

    async def _answer(self, prompt: str, n: int) -> list[Experience]:
        self.requests += 1
        if prompt.startswith("hang"):
            self.hanging += 1
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                self.cancelled += 1
                raise
            finally:
                self.hanging -= 1
        base = sum(map(ord, prompt)) % 50
        return [Experience(tokens=torch.tensor([1, 2, base + 3, i + 3]), prompt_length=2,
                           logprobs=torch.tensor([-0.5, -0.25 * (i + 1)]),
                           prompt_text=prompt, response_text=f"{prompt}#{i}")
                for i in range(n)]

    async def chat(self, messages: list[dict], lora_request=None, **kwargs) -> list[Experience]:
        exps = await self._answer(messages[-1]["content"], kwargs.get("n", 1))
        for exp in exps:
            exp.messages = list(messages)
        return exps

    async def generate(self, prompt: str, lora_request=None, **kwargs) -> list[Experience]:
        return await self._answer(prompt, kwargs.get("n", 1))

    async def sync_model_weights(self, model_version: int, method=None, timeout=1200) -> None:
        self.version = model_version

    def get_model_version(self) -> int:
        return self.version

    def hanging_now(self) -> int:
        return self.hanging

    def counts(self) -> dict[str, int]:
        """Requests and cancellations since the last call (a test's own)."""
        counts = {"requests": self.requests, "cancelled": self.cancelled}
        self.requests = self.cancelled = 0
        return counts


# -- workflows (Trinity's Workflow API, run unchanged) ------------------------------------------

class EchoWorkflow(Workflow):
    """Repeatable: one chat call makes all ``n`` runs. ``raw_task``: ``prompt``, ``fail``
    (raise), ``steps`` (experiences per run)."""

    can_repeat = True
    can_reset = True

    def __init__(self, *, task, model, auxiliary_models=None):
        super().__init__(task=task, model=model, auxiliary_models=auxiliary_models)
        self.reset(task)

    def reset(self, task):
        self.task = task
        self.raw = task.raw_task

    def set_repeat_times(self, repeat_times, run_id_base):
        self.repeat_times = repeat_times
        self.run_id_base = run_id_base

    def _finish(self, exps):
        if self.raw.get("fail"):
            raise ValueError(f"task {self.raw['prompt']} fails")
        out = []
        for i, exp in enumerate(exps):
            exp.reward = float((i + len(self.raw["prompt"])) % 3)
            exp.metrics = {"accuracy": float(i % 2), "score:max": float(i)}
            exp.eid.run = self.run_id_base + i
            exp.info = {"env": os.environ.get(ENV_KEY, "")}
            out.append(exp)
            for step in range(1, self.raw.get("steps", 1)):
                extra = Experience(tokens=exp.tokens.clone(), prompt_length=2,
                                   logprobs=exp.logprobs.clone(), reward=exp.reward)
                extra.eid.run, extra.eid.step = exp.eid.run, step
                out.append(extra)
        return out

    def run(self):
        return self._finish(self.model.chat([{"role": "user", "content": self.raw["prompt"]}],
                                            n=self.task.rollout_args.n))


class AsyncEchoWorkflow(EchoWorkflow):
    is_async = True

    async def run_async(self):
        return self._finish(await self.model.chat_async(
            [{"role": "user", "content": self.raw["prompt"]}], n=self.task.rollout_args.n))


class PerRunWorkflow(Workflow):
    """Not repeatable: a run per repeat; counts how often the instance was reset."""

    can_reset = True

    def __init__(self, *, task, model, auxiliary_models=None):
        super().__init__(task=task, model=model, auxiliary_models=auxiliary_models)
        self.resets = 0

    def reset(self, task):
        self.task = task
        self.resets += 1

    def run(self):
        exp = self.model.generate([self.task.raw_task["prompt"]])[0]
        exp.reward = 1.0
        exp.metrics = {"resets": float(self.resets)}
        return [exp]


class StateWorkflow(Workflow):
    """Reports its progress with ``set_workflow_state``, then waits on a hanging request."""

    is_async = True

    async def run_async(self):
        await self.model.set_workflow_state({"phase": "asked", "prompt": "hang"})
        return await self.model.chat_async([{"role": "user", "content": "hang"}])


class AuxWorkflow(Workflow):
    """Asks the auxiliary model through the OpenAI client Trinity's Workflow makes for it."""

    can_repeat = True

    def set_repeat_times(self, repeat_times, run_id_base):
        self.repeat_times, self.run_id_base = repeat_times, run_id_base

    def run(self):
        client = self.auxiliary_models[0]
        reply = client.chat.completions.create(
            model=client.model_path, messages=[{"role": "user", "content": "judge"}])
        exps = self.model.chat([{"role": "user", "content": "q"}], n=self.task.rollout_args.n)
        for i, exp in enumerate(exps):
            exp.reward = 1.0
            exp.eid.run = self.run_id_base + i
            exp.info = {"judge": reply.choices[0].message.content}
        return exps


# -- fixtures ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def local_ray():
    # Ray workers import this module's engine and workflow classes.
    here = os.path.dirname(os.path.abspath(__file__))
    path = os.pathsep.join(p for p in (here, os.environ.get("PYTHONPATH")) if p)
    ray.init(address="local", num_cpus=2, include_dashboard=False, namespace=NAMESPACE,
             log_to_driver=False,
             configure_logging=False, runtime_env={"env_vars": {"PYTHONPATH": path}})
    yield
    ray.shutdown()


def make_config(tmp_path, *, engines=1, aux_engines=0, runner_per_model=2, **explorer) -> Config:
    """A Trinity Config as Trinity's explorer passes it: GRPO advantages in the pipeline, the
    trainer's experience buffer an SQLite database under ``tmp_path``."""
    config = Config()
    config.ray_namespace = NAMESPACE
    config.explorer.rollout_model.engine_num = engines
    config.explorer.rollout_model.model_path = "echo"
    config.explorer.rollout_model.ray_namespace = NAMESPACE     # set by Trinity's config check
    config.explorer.runner_per_model = runner_per_model
    config.explorer.max_timeout = 30
    config.explorer.max_retry_times = 1
    for key, value in explorer.items():
        setattr(config.explorer, key, value)
    if aux_engines:
        config.explorer.auxiliary_models = [InferenceModelConfig(
            model_path="judge", engine_num=aux_engines, enable_openai_api=True,
            ray_namespace=NAMESPACE)]
    config.algorithm.algorithm_type = "grpo"
    config.algorithm.advantage_fn = "grpo"
    config.algorithm.advantage_fn_args = {}
    config.data_processor.experience_pipeline.save_input = False
    # Trinity's SQL storage declares a table class per buffer name, once per process.
    config.buffer.trainer_input.experience_buffer = StorageConfig(
        name=f"exp_{uuid.uuid4().hex[:12]}", storage_type="sql",
        path=f"sqlite:///{tmp_path}/exp.db", schema_type="experience", wrap_in_ray=True,
        ray_namespace=NAMESPACE)
    return config


@pytest.fixture(scope="module")
def engines(local_ray):
    """Two rollout engines and one auxiliary engine for the whole module, named and
    namespaced as Trinity's explorer (``explorer.name`` "explorer") creates them; a config
    with one engine uses the first. Their request counters start at zero in each test."""
    models = make_config(None, aux_engines=1).explorer
    rollout = [ray.remote(EchoModel).options(
        name=f"explorer_rollout_model_{i}_0", namespace=NAMESPACE).remote(models.rollout_model)
        for i in range(2)]
    aux = [ray.remote(EchoModel).options(
        name="explorer_auxiliary_0_model_0_0", namespace=NAMESPACE).remote(
        models.auxiliary_models[0])]
    ray.get([a.prepare.remote() for a in rollout + aux])

    def counts() -> dict[str, int]:
        """Requests and cancellations seen by the rollout engines since the last call."""
        totals = [ray.get(a.counts.remote()) for a in rollout]
        return {key: sum(t[key] for t in totals) for key in ("requests", "cancelled")}

    async def until_hanging(count: int) -> None:
        """Wait until ``count`` requests hang in the rollout engines (a request cancelled
        before it reaches an engine is never seen there)."""
        for _ in range(600):
            if sum(await asyncio.gather(*(a.hanging_now.remote() for a in rollout))) >= count:
                return
            await asyncio.sleep(0.05)
        raise AssertionError(f"{count} request(s) never reached the engines")

    counts.until_hanging = until_hanging
    yield counts
    for actor in rollout + aux:
        ray.kill(actor)


def buffer_rows(config: Config) -> list[Experience]:
    """The experiences Trinity's trainer would read, sorted by (batch, task, run, step)."""
    storage = config.buffer.trainer_input.experience_buffer
    path = storage.path.removeprefix("sqlite:///")
    if not os.path.exists(path):
        return []
    with contextlib.closing(sqlite3.connect(path)) as db:
        blobs = [row[0] for row in db.execute(
            f"SELECT experience_bytes FROM {storage.name}_blob")]
    exps = [Experience.deserialize(blob) for blob in blobs]
    return sorted(exps, key=lambda e: (str(e.eid.batch), str(e.eid.task), e.eid.run, e.eid.step))


def tasks(prompts, *, workflow=EchoWorkflow, repeat_times=2, is_eval=False, **raw):
    return [Task(workflow=workflow, repeat_times=repeat_times, is_eval=is_eval,
                 raw_task={"prompt": p, **raw}) for p in prompts]


async def started(config: Config, *args) -> RolloutCoordinator:
    coordinator = RolloutCoordinator(config, *args)
    await coordinator.prepare()
    return coordinator


# -- tests ---------------------------------------------------------------------------------------

async def test_train_batch_reaches_trinity_buffer_with_grpo_advantages(engines, tmp_path):
    config = make_config(tmp_path)
    engines()
    coordinator = await started(config)
    try:
        await coordinator.submit_batch(batch_id=1, tasks=tasks(["a", "bb", "ccc"], repeat_times=4),
                                       batch_type="train")
        result = await coordinator.finalize_train_batch(1)
    finally:
        await coordinator.shutdown()
    assert result["finished_task_count"] == 3
    metrics = result["metrics"]
    assert metrics["rollout/finished_task_count"] == 3.0
    assert metrics["experience_pipeline/experience_count"] == 12.0
    assert "experience_pipeline/group_advantages/reward_std/mean" in metrics
    assert "experience_pipeline/experience_pipeline/time/total" in metrics
    assert {"rollout/accuracy/mean", "rollout/score/max", "rollout/time/task_execution/mean",
            "rollout/time/run_execution/mean"} <= set(metrics)
    rows = buffer_rows(config)
    assert len(rows) == 12
    assert {(e.eid.batch, e.eid.task, e.eid.run) for e in rows} == \
        {(1, t, r) for t in range(3) for r in range(4)}
    for exp in rows:
        assert exp.info["model_version"] == 0 and exp.info["use_count"] == 0
        assert exp.advantages is not None
    # GRPO: a group's advantages sum to zero.
    for t in range(3):
        group = [e for e in rows if e.eid.task == t]
        assert abs(sum(float(e.advantages.sum()) / len(e.advantages) for e in group)) < 1e-4


async def test_actor_forms_namespace_and_env_vars(engines, tmp_path):
    """get_actor(config) finds Trinity's engines by name; get_actor(config, models, aux)
    takes them; the actor lives in config.ray_namespace; explorer.env_vars reach workflows."""
    config = make_config(tmp_path, env_vars={ENV_KEY: "from-config"})
    engines()
    handle = ray.get_actor("explorer_rollout_model_0_0", namespace=NAMESPACE)
    wrapper = ModelWrapper(model=handle, config=config.explorer.rollout_model)
    for args in [(), ([handle], []), ([wrapper], [])]:
        actor = RolloutCoordinator.get_actor(config, *args)
        try:
            await actor.prepare.remote()
            await actor.submit_batch.remote(batch_id=7, tasks=tasks(["x"]), batch_type="train")
            result = await actor.finalize_train_batch.remote(7)
            assert result["finished_task_count"] == 1
            assert await actor.__ray_call__.remote(
                lambda self: ray.get_runtime_context().namespace) == NAMESPACE
        finally:
            await actor.shutdown.remote()
            ray.kill(actor)
    rows = buffer_rows(config)
    assert len(rows) == 6 and {e.info["env"] for e in rows} == {"from-config"}


async def test_batches_in_sequence_and_concurrently(engines, tmp_path):
    config = make_config(tmp_path, engines=2)
    engines()
    coordinator = await started(config)
    try:
        for batch_id in (1, 2, 3):
            await coordinator.submit_batch(batch_id=batch_id, tasks=tasks(["p"] * 4),
                                           batch_type="train")
        results = await asyncio.gather(*(coordinator.finalize_train_batch(b) for b in (3, 1, 2)))
        assert [r["finished_task_count"] for r in results] == [4, 4, 4]
        assert coordinator.pending_batches == {}
        await coordinator.submit_batch(batch_id=1, tasks=tasks(["q"]), batch_type="train")
        assert (await coordinator.finalize_train_batch(1))["finished_task_count"] == 1
    finally:
        await coordinator.shutdown()
    assert len(buffer_rows(config)) == 2 * (12 + 1)


async def test_failed_tasks_are_retried_and_reported(engines, tmp_path):
    config = make_config(tmp_path, max_retry_times=2)
    engines()
    coordinator = await started(config)
    try:
        batch = tasks(["ok"]) + tasks(["bad"], fail=True)
        await coordinator.submit_batch(batch_id=1, tasks=batch, batch_type="train")
        result = await coordinator.finalize_train_batch(1)
    finally:
        await coordinator.shutdown()
    assert result["finished_task_count"] == 2
    # 1 request for the good task, 3 attempts of the failing one.
    assert engines()["requests"] == 4
    rows = buffer_rows(config)
    assert {e.response_text for e in rows} == {"ok#0", "ok#1"}


async def test_over_rollout_cancels_engine_requests_and_batch_id_is_reused(engines, tmp_path):
    config = make_config(tmp_path, runner_per_model=4)
    config.explorer.over_rollout.wait_after_min = 0.0
    engines()
    coordinator = await started(config)
    try:
        batch = tasks(["a", "b"], workflow=AsyncEchoWorkflow) + \
            tasks(["hang1", "hang2"], workflow=AsyncEchoWorkflow)
        await coordinator.submit_batch(batch_id=1, tasks=batch, batch_type="train",
                                       min_wait_num=2)
        await engines.until_hanging(2)
        result = await coordinator.finalize_train_batch(1)
        assert result["finished_task_count"] == 2
        await coordinator.submit_batch(batch_id=1, tasks=tasks(["c"]), batch_type="train")
        assert (await coordinator.finalize_train_batch(1))["finished_task_count"] == 1
    finally:
        await coordinator.shutdown()
    counts = engines()
    assert counts["cancelled"] == 2     # the hanging requests were cancelled in the engine
    assert sorted({e.prompt_text for e in buffer_rows(config)}) == ["a", "b", "c"]


@pytest.mark.parametrize("workflow", [AsyncEchoWorkflow, EchoWorkflow])
async def test_attempt_timeout_cancels_engine_request(engines, tmp_path, workflow):
    """Async workflows await the request; sync ones block on it in a worker thread (which
    the cancelled request then releases)."""
    config = make_config(tmp_path, max_timeout=1, max_retry_times=0)
    engines()
    coordinator = await started(config)
    try:
        await coordinator.submit_batch(batch_id="1/eval", batch_type="eval",
                                       tasks=tasks(["hang"], workflow=workflow, is_eval=True))
        result = await coordinator.finalize_eval_batch("1/eval", timeout=30)
    finally:
        await coordinator.shutdown()
    assert result["finished_task_count"] == 1
    assert result["metrics"]["eval/eval/finished_task_count"] == 1.0
    counts = engines()
    assert counts == {"requests": 1, "cancelled": 1}


async def test_split_runs_multi_step_and_unique_ids(engines, tmp_path):
    config = make_config(tmp_path, max_repeat_times_per_runner=3)
    engines()
    coordinator = await started(config)
    try:
        await coordinator.submit_batch(batch_id=1, tasks=tasks(["s", "t"], repeat_times=8, steps=2),
                                       batch_type="train")
        result = await coordinator.finalize_train_batch(1)
    finally:
        await coordinator.shutdown()
    assert result["finished_task_count"] == 2
    rows = buffer_rows(config)
    ids = [(e.eid.task, e.eid.run, e.eid.step) for e in rows]
    assert sorted(ids) == sorted((t, r, s) for t in range(2) for r in range(8) for s in range(2))


@pytest.mark.parametrize("mode", ["sequential", "asynchronous", "multi-threading"])
async def test_non_repeatable_workflows_in_each_concurrent_mode(engines, tmp_path, mode):
    config = make_config(tmp_path, runner_per_model=1, concurrent_mode=mode)
    engines()
    coordinator = await started(config)
    try:
        await coordinator.submit_batch(batch_id=1, tasks=tasks(["u"], workflow=PerRunWorkflow,
                                                                repeat_times=4),
                                       batch_type="train")
        result = await coordinator.finalize_train_batch(1)
    finally:
        await coordinator.shutdown()
    rows = buffer_rows(config)
    assert sorted(e.eid.run for e in rows) == [0, 1, 2, 3]
    resets = result["metrics"]["rollout/resets/max"]
    # Sequential runs reuse the slot's instance (reset before runs 1, 2, 3: mean 1.5); the
    # other modes make an isolated instance per run.
    assert resets == (1.5 if mode == "sequential" else 0.0)


async def test_runner_state_and_workflow_state(engines, tmp_path):
    config = make_config(tmp_path, runner_per_model=2)
    engines()
    coordinator = await started(config)
    try:
        await coordinator.submit_batch(batch_id=1, tasks=tasks(["s"], workflow=StateWorkflow),
                                       batch_type="train")
        for _ in range(200):
            if await coordinator.get_key_state("phase"):
                break
            await asyncio.sleep(0.05)
        [(runner_id, phase)] = (await coordinator.get_key_state("phase")).items()
        assert phase == "asked"
        state = await coordinator.get_runner_state(runner_id)
        assert state["workflow_id"] == "1/0/0" and state["prompt"] == "hang"
        assert state["model_version"] == 0 and state["running_time"] >= 0
        assert set(await coordinator.get_all_state()) == {0, 1}
        assert await coordinator.get_runner_state(5) == {}
        await coordinator.abort_batch(1, reason="test")
    finally:
        await coordinator.shutdown()


async def test_auxiliary_model_workflow_uses_openai_client(engines, tmp_path):
    config = make_config(tmp_path, aux_engines=1)
    engines()
    coordinator = await started(config)
    try:
        await coordinator.submit_batch(batch_id=1, tasks=tasks(["j"], workflow=AuxWorkflow),
                                       batch_type="train")
        result = await coordinator.finalize_train_batch(1)
    finally:
        await coordinator.shutdown()
    assert result["finished_task_count"] == 1
    assert {e.info["judge"] for e in buffer_rows(config)} == {"aux:judge"}


async def test_eval_batch_metrics_and_no_experiences(engines, tmp_path):
    config = make_config(tmp_path)
    engines()
    coordinator = await started(config)
    try:
        await coordinator.submit_batch(batch_id="3/math", batch_type="eval",
                                       tasks=tasks(["e", "f"], repeat_times=2, is_eval=True))
        result = await coordinator.finalize_eval_batch("3/math")
    finally:
        await coordinator.shutdown()
    assert result["finished_task_count"] == 2
    assert result["metrics"]["eval/math/finished_task_count"] == 2.0
    assert "eval/math/accuracy/mean@2" in result["metrics"]
    assert buffer_rows(config) == []


async def test_modes(engines, tmp_path):
    """bench: no pipeline; serve: no scheduler, process_experiences only; colocate: both."""
    engines()
    config = make_config(tmp_path)
    config.mode = "bench"
    coordinator = await started(config)
    try:
        await coordinator.submit_batch(batch_id=1, tasks=tasks(["b"]), batch_type="train")
        result = await coordinator.finalize_train_batch(1)
        assert result["finished_task_count"] == 1
        assert not any(k.startswith("experience_pipeline/") for k in result["metrics"])
        with pytest.raises(RuntimeError):
            await coordinator.process_experiences([b""])
    finally:
        await coordinator.shutdown()
    assert buffer_rows(config) == []

    config = make_config(tmp_path)
    config.mode = "serve"
    coordinator = await started(config)
    try:
        with pytest.raises(RuntimeError):
            await coordinator.submit_batch(batch_id=1, tasks=tasks(["s"]), batch_type="train")
        assert await coordinator.process_experiences([]) == {}
        payload = Experience.serialize_many([
            Experience(tokens=torch.tensor([1, 2, 3]), prompt_length=2, reward=1.0,
                       logprobs=torch.tensor([-1.0]))])
        metrics = await coordinator.process_experiences([payload])
        assert metrics["experience_pipeline/experience_count"] == 1.0
    finally:
        await coordinator.shutdown()
    assert len(buffer_rows(config)) == 1

    config = make_config(tmp_path)
    config.mode = "colocate"
    coordinator = await started(config)
    try:
        await coordinator.submit_batch(batch_id=2, tasks=tasks(["c"]), batch_type="train")
        assert (await coordinator.finalize_train_batch(2))["metrics"][
            "experience_pipeline/experience_count"] == 2.0
    finally:
        await coordinator.shutdown()


async def test_finalize_twice_empty_batches_and_abort(engines, tmp_path):
    config = make_config(tmp_path)
    engines()
    coordinator = await started(config)
    try:
        await coordinator.submit_batch(batch_id=1, tasks=tasks(["d", "e"]), batch_type="train")
        first, second = await asyncio.gather(coordinator.finalize_train_batch(1),
                                             coordinator.finalize_train_batch(1))
        assert first == second and first["finished_task_count"] == 2
        await coordinator.submit_batch(batch_id=2, tasks=[], batch_type="train")
        assert await coordinator.finalize_train_batch(2) == {
            "batch_id": 2, "batch_type": "train", "finished_task_count": 0,
            "metrics": {"rollout/finished_task_count": 0.0}}
        await coordinator.submit_batch(batch_id=3, batch_type="train",
                                       tasks=tasks(["hang"], workflow=AsyncEchoWorkflow))
        await engines.until_hanging(1)
        await coordinator.abort_batch(3, reason="test")
        with pytest.raises(KeyError):
            await coordinator.finalize_train_batch(3)
    finally:
        await coordinator.shutdown()
    assert len(buffer_rows(config)) == 4    # the pipeline ran once, for batch 1
    assert engines() == {"requests": 3, "cancelled": 1}


async def test_dynamic_timeout_after_warmup_and_not_for_eval(engines, tmp_path):
    """After a full train step, a train attempt gets ratio x the mean sub-task time: a
    hanging one fails long before max_timeout; eval tasks keep max_timeout."""
    config = make_config(tmp_path, max_timeout=60, max_retry_times=0)
    config.explorer.dynamic_timeout.enable = True
    config.explorer.dynamic_timeout.ratio = 20.0
    engines()
    coordinator = await started(config)
    try:
        await coordinator.submit_batch(batch_id=1, tasks=tasks(["w1", "w2"]), batch_type="train")
        await coordinator.finalize_train_batch(1)
        await coordinator.submit_batch(batch_id=2, batch_type="train", tasks=tasks(["w3"]) +
                                       tasks(["hang"], workflow=AsyncEchoWorkflow))
        result = await coordinator.finalize_train_batch(2)
        assert result["finished_task_count"] == 2
        await coordinator.submit_batch(batch_id="2/eval", batch_type="eval",
                                       tasks=tasks(["hang"], workflow=AsyncEchoWorkflow,
                                                   is_eval=True))
        # Still running: eval attempts have max_timeout (60 s); cut off at 1 s.
        result = await coordinator.finalize_eval_batch("2/eval", timeout=1)
        assert result["finished_task_count"] == 0
    finally:
        await coordinator.shutdown()
    assert sorted({e.prompt_text for e in buffer_rows(config)}) == ["w1", "w2", "w3"]
    assert engines()["cancelled"] == 2


async def test_rejects_what_trinity_rejects(engines, tmp_path):
    config = make_config(tmp_path)
    engines()
    coordinator = await started(config)
    try:
        with pytest.raises(TypeError, match="expected a trinity Task"):
            await coordinator.submit_batch(batch_id=1, tasks=[object()], batch_type="train")
        await coordinator.submit_batch(batch_id=1, tasks=tasks(["r"]), batch_type="train")
        with pytest.raises(ValueError, match=r"Batch 1 is already active\."):
            await coordinator.submit_batch(batch_id=1, tasks=tasks(["r"]), batch_type="train")
        with pytest.raises(KeyError, match=r"Batch 9 is not registered\."):
            await coordinator.finalize_train_batch(9)
        with pytest.raises(ValueError, match=r"Batch 1 is train, expected eval\."):
            await coordinator.finalize_eval_batch(1)
        await coordinator.finalize_train_batch(1)
    finally:
        await coordinator.shutdown()


def _comparable(exp: Experience) -> tuple:
    return (exp.eid.batch, exp.eid.task, exp.eid.run, exp.eid.step, exp.tokens.tolist(),
            exp.logprobs.tolist(), exp.reward, [round(a, 6) for a in exp.advantages.tolist()],
            exp.prompt_text, exp.response_text, exp.info["model_version"])


async def test_same_buffer_and_metric_keys_as_trinity(engines, tmp_path):
    """The same batches on Trinity's own coordinator (Ray runner actors) and on this one:
    the buffer holds the same experiences and advantages, the results the same keys."""
    from trinity.explorer.rollout_coordinator import RolloutCoordinator as TrinityCoordinator

    outcomes = {}
    for name, cls in [("trinity", TrinityCoordinator), ("fastrollout", RolloutCoordinator)]:
        where = tmp_path / name
        where.mkdir()
        config = make_config(where, engines=2, max_repeat_times_per_runner=2)
        engines()
        coordinator = cls(config)
        await coordinator.prepare()
        try:
            await coordinator.submit_batch(batch_id=1, batch_type="train",
                                           tasks=tasks(["aa", "b", "cccc"], repeat_times=4))
            await coordinator.submit_batch(
                batch_id="1/eval", batch_type="eval",
                tasks=tasks(["x", "yy"], repeat_times=2, is_eval=True))
            train = await coordinator.finalize_train_batch(1)
            evaluation = await coordinator.finalize_eval_batch("1/eval")
        finally:
            await coordinator.shutdown()
        outcomes[name] = (train, evaluation, [_comparable(e) for e in buffer_rows(config)])
    (t_train, t_eval, t_rows), (f_train, f_eval, f_rows) = outcomes["trinity"], \
        outcomes["fastrollout"]
    assert f_rows == t_rows and len(f_rows) == 12
    assert set(f_train["metrics"]) == set(t_train["metrics"])
    # Eval: Trinity's keys, plus fastrollout's unbiased pass@k of 0/1 metrics (API.md).
    extra = set(f_eval["metrics"]) - set(t_eval["metrics"])
    assert set(t_eval["metrics"]) <= set(f_eval["metrics"])
    assert extra == {"eval/eval/accuracy/pass@2"}
    for key, value in t_train["metrics"].items():
        if "time" not in key:
            assert f_train["metrics"][key] == pytest.approx(value), key
    assert f_train["finished_task_count"] == t_train["finished_task_count"] == 3
