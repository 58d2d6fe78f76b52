"""The native task ledger (native/ledger.pyx)."""
from __future__ import annotations

import dataclasses
import gc
import os
import pathlib
import pickle
import random
import shutil
import subprocess
import sys
import time
import tracemalloc
import zipfile

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from benchmarks.bench_ledger import DictTaskLedger
from fastrollout import Status
from fastrollout._native import ledger
from fastrollout._native.ledger import (
    BATCH_TASK_FIELDS,
    STATE_NAMES,
    TASK_DONE,
    TASK_FAILED,
    TASK_FREE,
    TASK_PENDING,
    TASK_RUNNING,
    BatchProgress,
    StatusError,
    TaskLedger,
)
from fastrollout.errors import FastRolloutError

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_layout_and_constants():
    assert [getattr(ledger, "TASK_" + n) for n in STATE_NAMES] == list(range(6))
    assert ledger.SLOT_BYTES == ledger.TASK_DTYPE.itemsize < 128
    assert issubclass(StatusError, FastRolloutError) and issubclass(StatusError, RuntimeError)


# -- every (state, operation) pair, table-driven ---------------------------------------

def _make(table, bslot, state):
    """A task of 2 runs brought to `state` by legal moves."""
    slot = table.add_task(bslot, 2)
    if state in ("RUNNING", "DONE", "FAILED"):
        table.start(slot)
    if state == "DONE":
        table.finish_subtask(slot, 2, 0)
    if state == "FAILED":
        table.finish_subtask(slot, 1, 1)
    if state in ("CANCELLED", "FREE"):
        table.cancel(slot)
    if state == "FREE":
        table.release(slot)
    return slot


OPS = {
    "start": lambda t, s: t.start(s),
    "finish": lambda t, s: t.finish_subtask(s, 2, 0),
    "cancel": lambda t, s: t.cancel(s),
    "release": lambda t, s: t.release(s),
}
# (from state, operation) -> resulting state; missing pairs must raise StatusError.
LEGAL = {
    ("PENDING", "start"): "RUNNING", ("PENDING", "cancel"): "CANCELLED",
    ("RUNNING", "start"): "RUNNING", ("RUNNING", "finish"): "DONE",
    ("RUNNING", "cancel"): "CANCELLED",
    ("DONE", "release"): "FREE", ("FAILED", "release"): "FREE", ("CANCELLED", "release"): "FREE",
}
# Batch counters (expected, completed, failed, running, cancelled) of one task in a state.
COUNTS = {"PENDING": (1, 0, 0, 0, 0), "RUNNING": (1, 0, 0, 1, 0), "DONE": (1, 1, 0, 0, 0),
          "FAILED": (1, 1, 1, 0, 0), "CANCELLED": (1, 0, 0, 0, 1)}


@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize("state", STATE_NAMES)
def test_transition(state, op):
    table = TaskLedger()
    bslot = table.add_batch()
    slot = _make(table, bslot, state)
    before = table.batch_counts(bslot)
    target = LEGAL.get((state, op))
    if target is None:
        with pytest.raises(StatusError, match=rf"(?i)task slot {slot}\b.*{state}") as info:
            OPS[op](table, slot)
        if state != "FREE":
            assert f"batch {bslot}" in str(info.value)
        assert STATE_NAMES[table.state(slot)] == state
        assert table.batch_counts(bslot) == before
    else:
        OPS[op](table, slot)
        assert STATE_NAMES[table.state(slot)] == target
        # Releasing keeps the batch's tally; every other move shows in the counters.
        assert table.batch_counts(bslot) == (before if target == "FREE" else COUNTS[target])
    table._check()


def test_illegal_transition_message_names_both_states():
    table = TaskLedger()
    slot = table.add_task(table.add_batch(), 1)
    with pytest.raises(StatusError, match=rf"^task slot {slot} \(batch 0\): "
                                          r"illegal transition PENDING -> FREE$"):
        table.release(slot)


def test_subtasks_attempts_and_outcome():
    table = TaskLedger()
    bslot = table.add_batch()
    ok, bad = table.add_task(bslot, 4, subtasks=2), table.add_task(bslot, 4, subtasks=2)
    for slot in (ok, bad):
        table.start(slot)
        table.start(slot)   # the second sub-task's attempt
    table.start(bad)        # a retry
    assert table.finish_subtask(ok, 2, 0) == TASK_RUNNING
    assert table.finish_subtask(ok, 2, 0) == TASK_DONE
    assert table.finish_subtask(bad, 2, 0) == TASK_RUNNING
    assert table.finish_subtask(bad, 1, 0) == TASK_FAILED   # one run never accounted for
    assert table.runs(ok) == (4, 0, 4) and table.runs(bad) == (3, 0, 4)
    cols = table.columns()
    assert cols["attempts"][ok] == 2 and cols["attempts"][bad] == 3
    assert cols["finished_subtasks"][ok] == 2
    assert table.batch_counts(bslot) == (2, 2, 1, 0, 0)
    assert table.batch_completed(bslot) == 2 and table.batch_running(bslot) == 0


def test_zero_run_task_is_done():
    table = TaskLedger()
    slot = table.add_task(table.add_batch(), 0)
    table.start(slot)
    assert table.finish_subtask(slot, 0, 0) == TASK_DONE


@pytest.mark.parametrize("args", [(-1, 0), (0, -1), (3, 0), (2, 1)])
def test_finish_subtask_rejects_runs_that_do_not_fit(args):
    table = TaskLedger()
    slot = table.add_task(table.add_batch(), 2)
    table.start(slot)
    with pytest.raises(ValueError, match=f"task slot {slot}"):
        table.finish_subtask(slot, *args)
    assert table.runs(slot) == (0, 0, 2) and table.state(slot) == TASK_RUNNING


@pytest.mark.parametrize("args", [(-1, 1), (1, 0)])
def test_add_task_rejects_bad_sizes(args):
    table = TaskLedger()
    with pytest.raises(ValueError, match="batch slot 0"):
        table.add_task(table.add_batch(), *args)
    assert len(table) == 0


def test_timestamps_are_monotonic_ns_and_durations():
    table = TaskLedger()
    bslot = table.add_batch()
    t0 = time.monotonic_ns()
    done, failed, cancelled, pending = (table.add_task(bslot, 1) for _ in range(4))
    for slot in (done, failed, cancelled):
        table.start(slot)
    table.finish_subtask(done, 1, 0)
    table.finish_subtask(failed, 0, 1)
    table.cancel(cancelled)
    t1 = time.monotonic_ns()
    cols = table.columns()
    for slot in (done, failed, cancelled):
        assert t0 <= cols["start_ns"][slot] <= cols["end_ns"][slot] <= t1
    assert cols["start_ns"][pending] == cols["end_ns"][pending] == 0
    expected = sorted((cols["end_ns"][[done, failed]] - cols["start_ns"][[done, failed]]) * 1e-9)
    assert sorted(table.durations(bslot)) == pytest.approx(expected)
    table.release(done)   # released tasks leave the durations
    assert len(table.durations(bslot)) == 1


# -- slots: bad ids, reuse, growth, batches --------------------------------------------

TASK_CALLS = [lambda t, s: t.start(s), lambda t, s: t.finish_subtask(s, 0, 0),
              lambda t, s: t.cancel(s), lambda t, s: t.release(s), lambda t, s: t.task_batch(s),
              lambda t, s: t.runs(s), lambda t, s: t.state(s)]
BATCH_CALLS = [lambda t, b: t.add_task(b, 1), lambda t, b: t.drop_batch(b),
               lambda t, b: t.batch_counts(b), lambda t, b: t.batch_completed(b),
               lambda t, b: t.batch_running(b), lambda t, b: t.durations(b)]


@pytest.mark.parametrize("bad", [-1, 1, 2, 4, 2**40])
@pytest.mark.parametrize("call", TASK_CALLS)
def test_bad_task_slot(call, bad):
    table = TaskLedger(capacity=4)
    table.add_task(table.add_batch(), 1)
    with pytest.raises(StatusError, match=f"task slot {bad} is out of range"):
        call(table, bad)


@pytest.mark.parametrize("call", TASK_CALLS[:-1])   # state() of a free slot is TASK_FREE
def test_freed_task_slot(call):
    table = TaskLedger()
    slot = _make(table, table.add_batch(), "FREE")
    with pytest.raises(StatusError, match=f"task slot {slot} is free"):
        call(table, slot)
    assert table.state(slot) == TASK_FREE


@pytest.mark.parametrize("bad", [-1, 1, 2**40])
@pytest.mark.parametrize("call", BATCH_CALLS)
def test_bad_batch_slot(call, bad):
    table = TaskLedger()
    table.add_batch()
    with pytest.raises(StatusError, match=f"batch slot {bad} is out of range"):
        call(table, bad)


@pytest.mark.parametrize("call", BATCH_CALLS)
def test_dropped_batch_slot(call):
    table = TaskLedger()
    bslot = table.add_batch()
    table.drop_batch(bslot)
    with pytest.raises(StatusError, match=f"batch slot {bslot} is free"):
        call(table, bslot)


def test_slot_reuse_is_lifo_and_fresh():
    table = TaskLedger(capacity=8)
    bslot = table.add_batch()
    slots = [_make(table, bslot, "DONE") for _ in range(8)]
    table.release(slots[3])
    table.release(slots[5])
    assert table.add_task(bslot, 7, subtasks=3) == slots[5]
    assert table.add_task(bslot, 1) == slots[3]
    assert table.runs(slots[5]) == (0, 0, 7) and table.state(slots[5]) == TASK_PENDING
    assert table.columns()[slots[5]]["attempts"] == 0
    table.release(slots[0])
    for _ in range(1000):   # churn through one free slot never grows the table
        table.release(_make(table, bslot, "CANCELLED"))
    assert table.capacity == 8 and len(table) == 7
    table._check()


def test_growth_keeps_old_views_alive_and_readable():
    table = TaskLedger(capacity=2)
    bslot = table.add_batch()
    first = _make(table, bslot, "RUNNING")
    old = table.columns()
    assert old.shape == (2,) and old["state"][first] == TASK_RUNNING
    slots = [table.add_task(bslot, 3) for _ in range(1000)]
    assert table.capacity == 1024 and len(table) == 1001
    table.finish_subtask(first, 1, 1)
    # The old view shows the rows as they were when the table grew ...
    assert old["state"][first] == TASK_RUNNING and old["batch"][0] == bslot
    new = table.columns()
    assert new["state"][first] == TASK_FAILED
    assert (new["state"][slots] == TASK_PENDING).all() and (new["total_runs"][slots] == 3).all()
    assert (new["batch"][1002:] == -1).all()
    # ... and stays valid after the table and its newer buffers are gone.
    del table, new
    gc.collect()
    assert old["state"][first] == TASK_RUNNING and old["total_runs"][first] == 2


def test_columns_are_live_zero_copy_and_read_only():
    table = TaskLedger()
    slot = table.add_task(table.add_batch(), 1)
    cols = table.columns()
    assert np.shares_memory(cols, table.columns())
    table.start(slot)
    assert cols["state"][slot] == TASK_RUNNING and cols["attempts"][slot] == 1
    with pytest.raises(ValueError, match="read-only"):
        cols["state"][slot] = TASK_DONE
    for field in ("batch", "state", "completed_runs", "total_runs", "attempts", "start_ns",
                  "end_ns"):
        assert field in cols.dtype.names


def test_drop_batch_releases_all_its_slots():
    table = TaskLedger()
    keep, drop = table.add_batch(), table.add_batch()
    kept = [_make(table, keep, s) for s in ("PENDING", "RUNNING", "DONE")]
    dropped = [_make(table, drop, s) for s in ("PENDING", "RUNNING", "DONE", "FAILED", "CANCELLED")]
    table.drop_batch(drop)
    assert len(table) == 3
    assert all(table.state(s) == TASK_FREE for s in dropped)
    assert [table.state(s) for s in kept] == [TASK_PENDING, TASK_RUNNING, TASK_DONE]
    assert table.batch_counts(keep) == (3, 1, 0, 1, 0)
    assert table.add_batch() == drop and table.batch_counts(drop) == (0, 0, 0, 0, 0)
    assert table.add_task(drop, 1) in dropped
    table._check()


def test_batch_table_grows():
    table = TaskLedger(batch_capacity=1)
    bslots = [table.add_batch() for _ in range(100)]
    assert bslots == list(range(100))
    for b in bslots:
        table.add_task(b, 1)
    assert all(table.batch_counts(b) == (1, 0, 0, 0, 0) for b in bslots)


def test_capacity_must_be_positive():
    with pytest.raises(ValueError, match="capacity"):
        TaskLedger(capacity=0)


def test_check_detects_corruption():
    # _check is the oracle of the randomized tests; it must be able to fail.
    table = TaskLedger()
    slot = _make(table, table.add_batch(), "RUNNING")
    raw = table.columns().base     # the owning buffer, writable
    raw["state"][slot] = TASK_PENDING
    with pytest.raises(AssertionError, match="running"):
        table._check()


# -- randomized sequences against the dict model ---------------------------------------

OP_NAMES = ("add_batch", "drop_batch", "add_task", "start", "finish_subtask", "cancel", "release")


def _apply(native, model, op, a, b, c):
    """Runs one operation on both tables; they must agree on result or error type."""
    outcomes = []
    for table in (native, model):
        try:
            if op == "add_batch":
                result = table.add_batch()
            elif op == "drop_batch":
                result = table.drop_batch(a)
            elif op == "add_task":
                result = table.add_task(a, b, 1 + c % 3)
            elif op == "start":
                result = table.start(a)
            elif op == "finish_subtask":
                result = table.finish_subtask(a, b, c)
            elif op == "cancel":
                result = table.cancel(a)
            else:
                result = table.release(a)
        except (StatusError, ValueError) as exc:
            result = type(exc)
        outcomes.append(result)
    assert outcomes[0] == outcomes[1], (op, a, b, c, outcomes)


def _compare(native, model):
    assert len(native) == len(model)
    for bslot in model.batches:
        assert native.batch_counts(bslot) == model.batch_counts(bslot), bslot
    cols = native.columns()
    for slot in range(model._top):
        assert native.state(slot) == model.state(slot), slot
        if slot in model.tasks:
            task = model.tasks[slot]
            assert native.runs(slot) == model.runs(slot), slot
            assert native.task_batch(slot) == task["batch"]
            assert cols["attempts"][slot] == task["attempts"]
            assert cols["finished_subtasks"][slot] == task["finished_subtasks"]
    native._check()


def _run_sequence(ops):
    native, model = TaskLedger(capacity=2, batch_capacity=1), DictTaskLedger()
    for op, a, b, c in ops:
        _apply(native, model, op, a, b, c)
        _compare(native, model)


ops_strategy = st.lists(st.tuples(st.sampled_from(OP_NAMES), st.integers(-1, 12),
                                  st.integers(-1, 4), st.integers(-1, 4)), max_size=80)


@settings(max_examples=150, deadline=None, print_blob=True)
@given(ops_strategy)
def test_random_sequences_match_model(ops):
    _run_sequence(ops)


@pytest.mark.parametrize("seed", [0, 1, 2, 20240601])
def test_long_random_walk_matches_model(seed):
    # Long runs with mostly legal moves; a failure names the seed (msgspec's habit).
    rng = random.Random(seed)
    native, model = TaskLedger(capacity=4, batch_capacity=1), DictTaskLedger()
    try:
        for step in range(4000):
            live = list(model.tasks) or [0]
            batches = list(model.batches) or [0]
            op = rng.choices(OP_NAMES, weights=(2, 1, 20, 20, 25, 4, 20))[0]
            a = rng.choice(batches) if op in ("drop_batch", "add_task") else rng.choice(live)
            total = rng.randint(0, 4)
            if op == "add_task":
                _apply(native, model, op, a, total, rng.randint(0, 2))
            else:
                _apply(native, model, op, a, rng.randint(0, 2), rng.randint(0, 1))
            if step % 50 == 0:
                _compare(native, model)
        _compare(native, model)
    except AssertionError as exc:
        raise AssertionError(f"random walk failed with seed={seed} at step {step}: {exc}") from exc


# -- reference counts and leaks --------------------------------------------------------

def _workload(table, rounds):
    bslot = table.add_batch()
    for i in range(rounds):
        slot = table.add_task(bslot, 2, subtasks=2)
        table.start(slot)
        table.finish_subtask(slot, 1, 0)
        table.state(slot), table.runs(slot), table.batch_counts(bslot), table.task_batch(slot)
        for bad, args in ((table.release, (slot,)), (table.start, (10**9,)),
                          (table.finish_subtask, (slot, 5, 5))):
            try:
                bad(*args)
            except (StatusError, ValueError):
                pass
        if i % 2:
            table.cancel(slot)
        else:
            table.finish_subtask(slot, 1, 0)
        table.release(slot)
        table.durations(bslot)
    table.drop_batch(bslot)


def test_no_reference_or_memory_leaks():
    table = TaskLedger()
    view = table.columns()
    _workload(table, 200)   # warm up caches and interned strings
    gc.collect()
    refs = (sys.getrefcount(table), sys.getrefcount(view.base), sys.getrefcount(None))
    tracemalloc.start()
    try:
        before, _ = tracemalloc.get_traced_memory()
        _workload(table, 20_000)
        gc.collect()
        after, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert (sys.getrefcount(table), sys.getrefcount(view.base)) == refs[:2]
    assert after - before < 64 * 1024, f"{after - before} bytes kept after 20k cycles"


def test_tables_are_freed():
    def live():
        return sum(type(o) is TaskLedger for o in gc.get_objects())

    gc.collect()
    base = live()
    tables = [TaskLedger(capacity=16) for _ in range(50)]
    views = [t.columns() for t in tables]
    assert live() == base + 50
    del tables
    gc.collect()
    assert live() == base
    assert all(v["batch"][0] == -1 for v in views)   # views outlive their table


def test_live_counter_is_debug_only():
    if ledger.DEBUG:   # run by test_debug_build
        base = ledger._debug_live_ledgers()
        with pytest.raises(ValueError):
            TaskLedger(capacity=0)   # a failed constructor still runs __dealloc__
        gc.collect()
        assert ledger._debug_live_ledgers() == base
    else:
        with pytest.raises(StatusError, match="debug builds"):
            ledger._debug_live_ledgers()


DEBUG_PROBE = """
import gc
from fastrollout._native import ledger
assert ledger.DEBUG, ledger.__file__
base = ledger._debug_live_ledgers()
tables = [ledger.TaskLedger(4) for _ in range(100)]
assert ledger._debug_live_ledgers() == base + 100
del tables
gc.collect()
assert ledger._debug_live_ledgers() == base, ledger._debug_live_ledgers()
print(ledger.__file__)
"""


def test_debug_build(tmp_path):
    """Builds a FASTROLLOUT_DEBUG=1 wheel from a copy of the tree (-O0, bounds and invariant
    checks, live-object counters), then runs this whole file against it."""
    tree = tmp_path / "tree"
    ignore = shutil.ignore_patterns("*.so", "*.c", "*.html", "__pycache__", "*.egg-info")
    for name in ("native", "src"):
        shutil.copytree(ROOT / name, tree / name, ignore=ignore)
    for name in ("setup.py", "pyproject.toml", "README.md"):
        if (ROOT / name).exists():
            shutil.copy(ROOT / name, tree / name)
    env = {**os.environ, "FASTROLLOUT_DEBUG": "1"}
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-build-isolation", "--no-deps",
         "--disable-pip-version-check", "-w", str(tmp_path / "dist"), str(tree)],
        env=env, capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stdout + build.stderr
    site = tmp_path / "site"
    (wheel,) = (tmp_path / "dist").glob("fastrollout-*.whl")
    zipfile.ZipFile(wheel).extractall(site)
    assert (site / "fastrollout" / "_native" / "ledger.pxd").exists()
    assert (site / "fastrollout" / "_native" / "ledger.pyi").exists()
    env["PYTHONPATH"] = str(site)
    probe = subprocess.run([sys.executable, "-c", DEBUG_PROBE], env=env, cwd=tmp_path,
                           capture_output=True, text=True, timeout=120)
    assert probe.returncode == 0, probe.stdout + probe.stderr
    assert probe.stdout.strip().startswith(str(site))
    suite = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
         "-k", "not debug_build", str(pathlib.Path(__file__))],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert suite.returncode == 0, suite.stdout[-4000:] + suite.stderr[-4000:]


def test_final_status_is_a_frozen_status_from_the_row():
    table = TaskLedger()
    slot = table.add_task(table.add_batch(), 4, subtasks=2)
    table.start(slot)
    table.finish_subtask(slot, 2, 0)
    task_metrics = {"time/task_execution": 1.0}
    status = table.final_status(slot, Status, task_metrics, "boom")
    message = "2/4 runs completed successfully. First error: boom"
    assert status == Status(2, 4, [task_metrics], message)
    assert type(status) is Status and not status.ok and status.metrics[0] is task_metrics
    # a batch's statuses are not walked by the GC (nothing in them can form a cycle)
    assert not gc.is_tracked(status) and not gc.is_tracked(status.metrics)
    with pytest.raises(dataclasses.FrozenInstanceError):
        status.completed_runs = 4
    assert pickle.loads(pickle.dumps(status)) == status
    table.cancel(slot)
    assert table.final_status(slot, Status, {}, None).message == (
        "2/4 runs completed successfully. Remaining runs were cancelled during scheduler cleanup.")


def test_progress_and_task_rows_of_a_batch():
    table = TaskLedger()
    b = table.add_batch(5)
    assert table.progress(b) == BatchProgress(5, 5, 0, 0, 0, 0, 0)
    done, failed, running, cancelled = (table.add_task(b, 2, task=i) for i in (3, 0, 1, 2))
    for slot in (done, failed, running, cancelled):
        table.start(slot)
    table.start(failed, retry=True)
    table.finish_subtask(done, 2, 0)
    table.finish_subtask(failed, 1, 1)
    table.cancel(cancelled)
    assert table.progress(b) == BatchProgress(submitted=5, queued=1, running=1, done=1, failed=1,
                                              cancelled=1, retries=1)
    rows = table.batch_tasks(b)
    assert rows.dtype.names == BATCH_TASK_FIELDS
    assert rows["task"].tolist() == [0, 1, 2, 3]
    assert [STATE_NAMES[s] for s in rows["state"]] == ["FAILED", "RUNNING", "CANCELLED", "DONE"]
    assert rows["attempts"].tolist() == [2, 1, 1, 1]
    assert rows["completed_runs"].tolist() == [1, 0, 0, 2]
