"""The runner: one attempt of a workflow in each concurrency mode, run ids, reuse of resettable
workflows, and what a workflow's result must be for its task to succeed."""
from __future__ import annotations

import pathlib
import subprocess
import sys
import types

import pytest

from fastrollout import Workflow
from fastrollout.engines import SimulatedEngine
from harness import Harness, make_config, tasks
from workflows import (
    CALLS,
    AsyncWorkflow,
    RepeatWorkflow,
    ResettableWorkflow,
    SyncWorkflow,
)


@pytest.fixture(autouse=True)
def _fresh_call_counts():
    CALLS.clear()


@pytest.mark.parametrize("repeat,mean", [(4, 1.5), (8, 3.5)])
async def test_repeatable_workflow_metrics(repeat, mean):
    async with Harness() as coord:
        await coord.submit_batch(batch_id=0, tasks=tasks(3, RepeatWorkflow, repeat=repeat),
                                 batch_type="train")
        result = await coord.finalize_train_batch(0)
        assert result["metrics"]["rollout/run_metrics/mean"] == mean


async def test_non_repeatable_runs_get_run_ids_and_reset_reuse():
    ResettableWorkflow.instances = 0
    async with Harness(make_config(runner_per_model=1)) as coord:
        await coord.submit_batch(batch_id=0, tasks=tasks(3, ResettableWorkflow, repeat=4),
                                 batch_type="train")
        await coord.finalize_train_batch(0)
        exps = coord.take_experiences(0).to_experiences()
        assert sorted(e.eid.run for e in exps if e.eid.task == 1) == [0, 1, 2, 3]
        # One slot, sequential mode: one instance reset for every later run.
        assert ResettableWorkflow.instances == 1


@pytest.mark.parametrize("mode", ["sequential", "asynchronous", "multi-threading"])
@pytest.mark.parametrize("workflow", [SyncWorkflow, AsyncWorkflow])
async def test_concurrent_modes(mode, workflow):
    async with Harness(make_config(concurrent_mode=mode)) as coord:
        await coord.submit_batch(batch_id=0, tasks=tasks(3, workflow, repeat=3), batch_type="train")
        result = await coord.finalize_train_batch(0)
        assert result["finished_task_count"] == 3
        assert result["metrics"]["rollout/score/mean"] == 1.0
        exps = coord.take_experiences(0).to_experiences()
        ids = sorted((e.eid.task, e.eid.run) for e in exps)
        assert ids == [(t, r) for t in range(3) for r in range(3)]
        assert all(e.info["model_version"] == 0 and e.info["use_count"] == 0 for e in exps)


class _ReturnsNonsense(Workflow):
    """Returns something that has metrics but is no experience (no eid, no info)."""

    can_repeat = True
    is_async = True

    async def run_async(self):
        return [types.SimpleNamespace(metrics={})]


@pytest.mark.parametrize("workflow", [_ReturnsNonsense, "sequential"])
async def test_a_workflow_returning_nonsense_fails_its_task_not_the_coordinator(workflow):
    # Reading the experiences (their metrics, ids) is part of the run: a workflow that returns
    # something else fails its own task, with the error in the status; the batch finishes.
    if workflow == "sequential":
        class workflow(_ReturnsNonsense):
            can_repeat = False
    async with Harness(make_config(max_retry_times=1), [SimulatedEngine()]) as coord:
        await coord.submit_batch(batch_id=0, tasks=tasks(3, workflow, repeat=2)
                                 + tasks(1, RepeatWorkflow, repeat=2), batch_type="train")
        state = coord.pending_batches[0]
        result = await coord.finalize_train_batch(0, timeout=5)
        assert result["finished_task_count"] == 4
        assert len(coord.take_experiences(0)) == 2      # RepeatWorkflow's two runs
        assert [state.statuses[i].ok for i in range(4)] == [False, False, False, True]
        assert "experience 0: expected an Experience, got SimpleNamespace" \
            in state.statuses[0].message


# ---- a workflow that raises SystemExit or KeyboardInterrupt fails its task, not the process ----

_EXITS = r'''
import asyncio, sys
sys.path[:0] = {paths!r}
from fastrollout import Experience, Workflow
from harness import Harness, make_config, tasks

class Exits(Workflow):
    is_async = {is_async}
    def run(self):
        raise {error}
    async def run_async(self):
        raise {error}

async def main():
    async with Harness(make_config(concurrent_mode="{mode}")) as coord:
        await coord.submit_batch(batch_id=0, tasks=tasks(1, Exits) + tasks(2), batch_type="train")
        state = coord.pending_batches[0]
        result = await coord.finalize_train_batch(0, timeout=5)
        print(result["finished_task_count"], [state.statuses[i].ok for i in range(3)],
              "{name}" in state.statuses[0].message)

asyncio.run(main())
'''


@pytest.mark.parametrize("error", ["SystemExit(3)", "KeyboardInterrupt()"])
@pytest.mark.parametrize("is_async,mode", [(False, "sequential"), (True, "sequential"),
                                           (False, "multi-threading")])
def test_system_exit_and_keyboard_interrupt_in_a_workflow_fail_only_its_task(error, is_async,
                                                                              mode):
    # In a subprocess: before the fix these ended the whole process (the test runner too).
    tests = pathlib.Path(__file__).parent
    script = _EXITS.format(paths=[str(tests), str(tests.parent)], is_async=is_async,
                           error=error, mode=mode, name=error.split("(")[0])
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "3 [False, True, True] True", done.stderr[-3000:]
