"""Engines in Ray actors (engines/ray_actor.py, engines/ray_launch.py) on a real local Ray:
batches through engine actors, an actor killed mid-batch, abort reaching the remote engine,
restart, a coordinator actor with engine actors, the vLLM CPU tiny model in an actor."""
from __future__ import annotations

import asyncio
import functools
import sys
import threading
import time

import numpy as np
import pytest
import ray
import uvloop

from fastrollout import (
    Config,
    ConfigError,
    EngineDeadError,
    EngineError,
    GenerationConfig,
    RolloutCoordinator,
    Task,
    Workflow,
)
from fastrollout.engines import Completion, RayEngine, SimulatedEngine, launch_engine_actors
from fastrollout.engines.ray_actor import (
    pack_requests,
    pack_results,
    unpack_requests,
    unpack_results,
)
from fastrollout.job import SimulatedEngines, VLLMEngines, build_engines, load_job

# Four engine actors and a coordinator actor fit on 2 CPUs.
CPUS = 0.25


class Sample(Workflow):
    """One request of n = repeat_times samples, with logprobs."""

    can_repeat = True
    is_async = True

    async def run_async(self):
        exps = await self.model.generate_async([self.task.raw_task.get("prompt", "ray")],
                                               n=self.repeat_times, logprobs=0, max_tokens=12,
                                               seed=3)
        for i, exp in enumerate(exps):
            exp.eid.run = self.run_id_base + i
            exp.reward = float(len(exp.tokens))
        return exps


class Chat(Workflow):
    """A chat request (the chat template runs in the coordinator's process)."""

    can_repeat = True
    is_async = True

    async def run_async(self):
        exps = await self.model.chat_async([{"role": "user", "content": "two plus two?"}],
                                           n=self.repeat_times, max_tokens=8, logprobs=0)
        for i, exp in enumerate(exps):
            exp.eid.run = self.run_id_base + i
        return exps


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    # This module is not installed: ship its workflows by value to a coordinator actor.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    yield
    ray.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
    ray.shutdown()


def launch(*factories) -> list[RayEngine]:
    return launch_engine_actors(list(factories), cpus_per_engine=CPUS, name="test")


async def shut(engines: list[RayEngine]) -> None:
    await asyncio.gather(*(e.shutdown() for e in engines))


async def state_until(engine: RayEngine, key: str, predicate, timeout: float = 30.0) -> dict:
    """The remote engine's state once ``predicate(state[key])`` holds (bounded wait)."""
    deadline = time.monotonic() + timeout
    while True:
        state = await engine.remote_state()
        if predicate(state[key]) or time.monotonic() > deadline:
            return state
        await asyncio.sleep(0.01)


# -- what crosses Ray ------------------------------------------------------------------------

def test_results_cross_as_one_array_per_column_and_come_back_whole():
    with_lp = Completion(np.arange(3, dtype=np.int32), np.array([-1, -2, -3], np.float32),
                         "stop", "abc", -6.0)
    without = Completion(np.arange(5, 7, dtype=np.int32), None, "length", "xy")
    empty = Completion(np.empty(0, np.int32), np.empty(0, np.float32), "abort", "")
    error = EngineError("request b failed")
    results = [("a", [with_lp, without]), ("b", error), ("c", [empty, with_lp])]
    packed = pack_results(results)
    arrays = [x for x in packed if isinstance(x, np.ndarray)]
    assert [a.dtype for a in arrays] == [np.int64, np.int32, np.float32]
    out = unpack_results(packed)
    assert [rid for rid, _ in out] == ["a", "b", "c"]
    assert out[1][1] is error
    for (_, got), (_, want) in zip(out[::2], results[::2], strict=True):
        for g, w in zip(got, want, strict=True):
            np.testing.assert_array_equal(g.token_ids, w.token_ids)
            assert (g.logprobs is None) == (w.logprobs is None)
            if w.logprobs is not None:
                np.testing.assert_array_equal(g.logprobs, w.logprobs)
                assert g.logprobs.flags.writeable
            assert (g.finish_reason, g.text, g.cumulative_logprob) == \
                (w.finish_reason, w.text, w.cumulative_logprob)


def test_requests_cross_as_one_token_array_with_equal_parameters_shared():
    a, b = GenerationConfig(n=2), GenerationConfig(n=2)
    requests = [("x", [1, 2, 3], a), ("y", np.array([4], np.int32), b),
                ("z", [], GenerationConfig(n=1))]
    rids, lengths, tokens, params = packed = pack_requests(requests)
    assert rids == ["x", "y", "z"]
    assert tokens.tolist() == [1, 2, 3, 4] and lengths.tolist() == [3, 1, 0]
    assert params[0] is params[1] and params[2] != params[1]
    out = unpack_requests(packed)
    assert [(rid, prompt, p) for rid, prompt, p in out] == \
        [("x", [1, 2, 3], a), ("y", [4], b), ("z", [], GenerationConfig(n=1))]
    assert all(type(t) is int for _, prompt, _ in out for t in prompt)
    assert unpack_requests(pack_requests([])) == []     # a call that carries aborts only


# -- batches ---------------------------------------------------------------------------------

async def test_train_and_eval_batches_through_engine_actors():
    engines = launch(SimulatedEngine, SimulatedEngine)
    coordinator = RolloutCoordinator(
        Config.from_dict({"explorer": {"runner_per_model": 4}}), engines)
    try:
        await coordinator.prepare()
        tasks = [Task(workflow=Sample, repeat_times=3, raw_task={"prompt": f"q{i}"})
                 for i in range(24)]
        await coordinator.submit_batch(batch_id=0, tasks=tasks, batch_type="train")
        result = await coordinator.finalize_train_batch(0, timeout=60)
        assert result["finished_task_count"] == 24
        exps = coordinator.take_experiences(0).to_experiences()
        assert len(exps) == 72
        # The same samples, token for token, as the engine gives in this process.
        local = SimulatedEngine()
        for exp in exps[:6]:
            prompt = exp.tokens[:exp.prompt_length]
            (expected, *_) = await local.generate(
                prompt.tolist(), GenerationConfig(n=1, logprobs=0, max_tokens=12, seed=3),
                request_id="ref")
            tokens = exp.tokens[exp.prompt_length:]
            if exp.eid.run % 3 == 0:        # sample index 0 of its request
                np.testing.assert_array_equal(tokens, expected.token_ids)
                np.testing.assert_array_equal(exp.logprobs, expected.logprobs)
            assert exp.logprobs.dtype == np.float32 and len(exp.logprobs) == len(tokens)
        eval_tasks = [Task(workflow=Sample, repeat_times=2, is_eval=True) for _ in range(8)]
        await coordinator.submit_batch(batch_id="0/ev", tasks=eval_tasks, batch_type="eval")
        result = await coordinator.finalize_eval_batch("0/ev", timeout=60)
        assert result["finished_task_count"] == 8
        served = [(await e.remote_state())["requests_received"] for e in engines]
        assert sum(served) == 24 + 8 and min(served) > 0
    finally:
        await coordinator.shutdown()
        await shut(engines)


# -- failures --------------------------------------------------------------------------------

async def test_killing_an_engine_actor_mid_batch_retries_its_work_elsewhere_then_restart():
    slow = functools.partial(SimulatedEngine, ttft=0.3)
    engines = launch(slow, SimulatedEngine)
    coordinator = RolloutCoordinator(
        Config.from_dict({"explorer": {"runner_per_model": 4, "max_retry_times": 0}}), engines)
    try:
        await coordinator.prepare()
        tasks = [Task(workflow=Sample, repeat_times=2) for _ in range(16)]
        await coordinator.submit_batch(batch_id=0, tasks=tasks, batch_type="train")
        state = await state_until(engines[0], "engine_unfinished", lambda n: n > 0)
        assert state["engine_unfinished"] > 0
        ray.kill(engines[0].actor, no_restart=True)
        result = await coordinator.finalize_train_batch(0, timeout=60)
        # No attempt is left for a failed run: every task succeeded on the other engine.
        assert result["finished_task_count"] == 16
        assert len(coordinator.take_experiences(0)) == 32   # every run of every task
        assert engines[0].is_dead and not engines[1].is_dead
        with pytest.raises(EngineDeadError, match="test0"):
            await engines[0].generate([1, 2], GenerationConfig(), request_id="late")

        await engines[0].restart()
        assert not engines[0].is_dead
        await coordinator.submit_batch(batch_id=1, tasks=[Task(workflow=Sample)
                                                          for _ in range(16)],
                                       batch_type="train")
        result = await coordinator.finalize_train_batch(1, timeout=60)
        assert result["finished_task_count"] == 16
        assert (await engines[0].remote_state())["requests_received"] > 0   # it rejoined
    finally:
        await coordinator.shutdown()
        await shut(engines)


async def test_an_idle_actor_that_dies_is_noticed_without_a_request():
    (engine,) = launch(SimulatedEngine)
    try:
        await engine.prepare()
        ray.kill(engine.actor, no_restart=True)
        # The outstanding results call fails: no request is needed to notice.
        await asyncio.wait_for(engine._poller, 30)
        assert engine.is_dead
    finally:
        await engine.shutdown()


async def test_an_engine_dying_inside_its_actor_makes_the_proxy_dead():
    (engine,) = launch(functools.partial(SimulatedEngine, die_after=1))
    try:
        await engine.prepare()
        await engine.generate([1, 2, 3], GenerationConfig(), request_id="first")
        with pytest.raises(EngineDeadError, match="died after 1 requests"):
            await engine.generate([1, 2, 3], GenerationConfig(), request_id="second")
        assert engine.is_dead
        await engine.restart()      # a fresh engine from the factory
        (out,) = await engine.generate([1, 2, 3], GenerationConfig(), request_id="third")
        assert out.finish_reason == "stop"
    finally:
        await engine.shutdown()


async def test_an_engine_error_fails_that_request_only():
    (engine,) = launch(functools.partial(SimulatedEngine, error_rate=1.0))
    try:
        await engine.prepare()
        with pytest.raises(EngineError, match="injected failure of request r1"):
            await engine.generate([1], GenerationConfig(), request_id="r1")
        assert not engine.is_dead
    finally:
        await engine.shutdown()


async def test_a_request_that_cannot_be_sent_fails_alone():
    (engine,) = launch(SimulatedEngine)
    try:
        await engine.prepare()
        with pytest.raises(EngineError, match="request bad could not be sent"):
            await engine.generate([1], GenerationConfig(seed=threading.Lock()),
                                  request_id="bad")
        (out,) = await engine.generate([1], GenerationConfig(), request_id="good")
        assert out.finish_reason == "stop" and not engine.is_dead
    finally:
        await engine.shutdown()


# -- abort -----------------------------------------------------------------------------------

async def test_abort_reaches_the_remote_engine():
    (engine,) = launch(functools.partial(SimulatedEngine, hang_rate=1.0))
    try:
        await engine.prepare()
        request = asyncio.ensure_future(
            engine.generate([5, 6, 7], GenerationConfig(n=2), request_id="hangs"))
        state = await state_until(engine, "engine_unfinished", lambda n: n == 1)
        assert state["engine_unfinished"] == 1
        await engine.abort(["hangs"])
        outs = await asyncio.wait_for(request, 30)
        assert [c.finish_reason for c in outs] == ["abort", "abort"]
        state = await engine.remote_state()
        assert state["engine_unfinished"] == 0 and state["in_flight"] == 0

        # Cancelling a generate call aborts its request in the remote engine too.
        request = asyncio.ensure_future(
            engine.generate([5, 6, 7], GenerationConfig(), request_id="cancelled"))
        await state_until(engine, "engine_unfinished", lambda n: n == 1)
        request.cancel()
        with pytest.raises(asyncio.CancelledError):
            await request
        state = await state_until(engine, "engine_unfinished", lambda n: n == 0)
        assert state["engine_unfinished"] == 0 and state["in_flight"] == 0
    finally:
        await engine.shutdown()


async def test_a_request_aborted_before_it_starts_never_runs():
    (engine,) = launch(functools.partial(SimulatedEngine, hang_rate=1.0))
    try:
        await engine.prepare()
        request = asyncio.ensure_future(
            engine.generate([1], GenerationConfig(n=3), request_id="early"))
        await asyncio.sleep(0)              # generate() queued it; not sent yet
        await engine.abort(["early"])       # leaves in the same call as the request
        outs = await asyncio.wait_for(request, 30)
        assert [(c.finish_reason, len(c.token_ids)) for c in outs] == [("abort", 0)] * 3
        state = await engine.remote_state()
        assert state["requests_received"] == 0 and state["in_flight"] == 0
    finally:
        await engine.shutdown()


# -- a coordinator actor with engine actors ----------------------------------------------------

def test_coordinator_actor_and_engine_actors_shut_down_cleanly():
    engines = launch(SimulatedEngine, SimulatedEngine)
    groups = [e.placement_group for e in engines]
    coordinator = RolloutCoordinator.get_actor(
        Config.from_dict({"explorer": {"runner_per_model": 2}}), engines)
    ray.get(coordinator.prepare.remote(), timeout=60)
    tasks = [Task(workflow=Sample, repeat_times=2) for _ in range(6)]
    ray.get(coordinator.submit_batch.remote(batch_id=0, tasks=tasks, batch_type="train"))
    result = ray.get(coordinator.finalize_train_batch.remote(0), timeout=60)
    assert result["finished_task_count"] == 6
    assert len(ray.get(coordinator.take_experiences.remote(0))) == 12
    ray.get(coordinator.shutdown.remote(), timeout=60)
    ray.kill(coordinator)
    # The engines belong to the caller (this process): it shuts them down.
    uvloop.run(shut(engines))
    for engine, group in zip(engines, groups, strict=True):
        assert engine.is_dead
        with pytest.raises(ray.exceptions.RayActorError):
            ray.get(engine.actor.state.remote(), timeout=30)
        assert ray.util.placement_group_table(group)["state"] == "REMOVED"


def test_a_coordinator_actor_restarts_a_dead_engine_and_its_slots_take_work_at_once():
    (engine,) = launch(SimulatedEngine)
    coordinator = RolloutCoordinator.get_actor(
        Config.from_dict({"explorer": {"runner_per_model": 2, "max_retry_times": 0}}), [engine])
    try:
        ray.get(coordinator.prepare.remote(), timeout=60)
        ray.kill(engine.actor, no_restart=True)
        # The coordinator's copy of the engine sees the death: the only engine is dead.
        ray.get(coordinator.submit_batch.remote(
            batch_id=0, tasks=[Task(workflow=Sample)], batch_type="train"))
        with pytest.raises(ray.exceptions.RayTaskError, match="rollout engines are dead"):
            ray.get(coordinator.finalize_train_batch.remote(0, timeout=30), timeout=60)
        with pytest.raises(ray.exceptions.RayTaskError, match="no rollout engine 1"):
            ray.get(coordinator.restart_engine.remote(1), timeout=60)
        ray.get(coordinator.restart_engine.remote(0), timeout=60)
        ray.get(coordinator.submit_batch.remote(
            batch_id=1, tasks=[Task(workflow=Sample) for _ in range(4)], batch_type="train"))
        result = ray.get(coordinator.finalize_train_batch.remote(1, timeout=30), timeout=60)
        assert result["finished_task_count"] == 4
        assert len(ray.get(coordinator.take_experiences.remote(1))) == 4
        ray.get(coordinator.shutdown.remote(), timeout=60)
    finally:
        ray.kill(coordinator)      # the restarted engine actor is the coordinator's: it goes too
        uvloop.run(shut([engine]))


# -- launching ---------------------------------------------------------------------------------

def test_launch_names_what_the_cluster_lacks_and_reserves_nothing():
    before = set(ray.util.placement_group_table())
    with pytest.raises(EngineError, match=r"cannot place 2 engine\(s\) of .*'GPU': 1\.0"):
        launch_engine_actors([SimulatedEngine] * 2, gpus_per_engine=1, ready_timeout=1)
    table = ray.util.placement_group_table()
    assert all(table[g]["state"] == "REMOVED" for g in set(table) - before)


def test_a_job_with_placement_ray_builds_engine_actors():
    spec = SimulatedEngines(placement="ray", count=2, ttft=0.0, tpot=0.0, capacity=None,
                            cpus_per_engine=CPUS, seed=5)
    engines = build_engines(spec)
    try:
        assert [type(e) for e in engines] == [RayEngine, RayEngine]
        seeds = [e.factory.args[0].seed for e in engines]
        assert seeds == [5, 6]
    finally:
        uvloop.run(shut(engines))


def test_ray_keys_are_refused_with_local_placement(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("engines: {backend: vllm, count: 2}\n")
    with pytest.raises(ConfigError, match=r"engines\.count: only with placement: ray"):
        load_job(path)
    job = load_job(path, ["engines.placement=ray", "engines.gpus_per_engine=2"])
    assert job.engines.count == 2 and job.engines.gpus_per_engine == 2


# -- the vLLM CPU tiny model in an actor -------------------------------------------------------

@pytest.mark.vllm
def test_vllm_tiny_model_in_an_engine_actor(tiny_model, tmp_path):
    from fastrollout.tinymodel import TINY_ENGINE_ARGS
    from tinymodel import engine_env, perturb_weights

    spec = VLLMEngines(placement="ray", model=str(tiny_model), cpus_per_engine=CPUS,
                       engine_args=dict(TINY_ENGINE_ARGS), env=engine_env(tmp_path))
    (engine,) = build_engines(spec)

    async def main():
        coordinator = RolloutCoordinator(
            Config.from_dict({"explorer": {"runner_per_model": 4}}), [engine])
        try:
            await coordinator.prepare()
            # The HF tokenizer came from the actor: chat templates apply here.
            assert engine.apply_chat_template([{"role": "user", "content": "hi"}])
            tasks = [Task(workflow=Chat, repeat_times=2) for _ in range(4)]
            await coordinator.submit_batch(batch_id=0, tasks=tasks, batch_type="train")
            result = await coordinator.finalize_train_batch(0, timeout=120)
            assert result["finished_task_count"] == 4
            exps = coordinator.take_experiences(0).to_experiences()
            assert len(exps) == 8
            for exp in exps:
                assert len(exp.logprobs) == len(exp.tokens) - exp.prompt_length > 0
                assert exp.logprobs.dtype == np.float32 and (exp.logprobs <= 0).all()
            # A weight update goes through the actor and bumps the version.
            checkpoint = tmp_path / "ckpt"
            perturb_weights(tiny_model, checkpoint)
            assert await coordinator.update_weights(checkpoint) == 1
            assert (await engine.remote_state())["model_version"] == 1
        finally:
            await coordinator.shutdown()
            await engine.shutdown()

    uvloop.run(main())


# -- a node lost (last: it replaces this module's Ray with a cluster of two nodes) -----------

@pytest.fixture
def two_nodes():
    """A head and a worker node (labelled with the resource "worker") on this machine, with
    Ray's node health checks made fast: 3 misses 0.5 s apart."""
    from ray.cluster_utils import Cluster

    ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "_system_config": {"health_check_period_ms": 500,
                                          "health_check_failure_threshold": 3,
                                          "health_check_initial_delay_ms": 0}})
    worker = cluster.add_node(num_cpus=1, resources={"worker": 1})
    ray.init(address=cluster.address, include_dashboard=False, log_to_driver=False,
             configure_logging=False)
    cluster.wait_for_nodes()
    yield cluster, worker
    ray.shutdown()
    cluster.shutdown()


@pytest.mark.slow
def test_losing_the_node_of_an_engine_actor_fails_its_requests_within_seconds(two_nodes):
    cluster, worker = two_nodes
    (engine,) = launch_engine_actors([functools.partial(SimulatedEngine, hang_rate=1.0)],
                                     resources={"worker": 1}, name="remote")

    async def main():
        try:
            await engine.prepare()
            assert (await engine.remote_state())["node_id"] == worker.node_id
            request = asyncio.ensure_future(
                engine.generate([1], GenerationConfig(), request_id="on-lost-node"))
            await state_until(engine, "engine_unfinished", lambda n: n == 1)
            cluster.remove_node(worker, allow_graceful=False)
            # The request would hang forever: only noticing the lost node ends it.
            with pytest.raises(EngineDeadError, match="request on-lost-node lost"):
                await asyncio.wait_for(request, 60)
            assert engine.is_dead
        finally:
            await engine.shutdown()

    uvloop.run(main())
