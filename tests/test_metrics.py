"""fastrollout.metrics against Trinity-RFT 0.6.0's own metrics.py, and exact best/worst/pass
against brute-force enumeration."""
from __future__ import annotations

import itertools
import math
import re
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from benchmarks.trinity_ref import trinity_module
from fastrollout import metrics as M
from fastrollout._native.tally import single_run_metrics

T = trinity_module("utils/metrics.py")

KEYS = ["acc", "acc:mean", "score", "x:sum", "x:sum:mean", "x:max", "x:min", "y:last", "z:foo",
        "a:", "time/task_execution", "eval/time/run_execution", "p/acc:max"]

finite = st.floats(-1e6, 1e6, allow_nan=False)
numbers = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True), finite, st.integers(-2**70, 2**70),
    st.booleans(), st.sampled_from([0.0, -0.0, 1.0, math.nan, math.inf, -math.inf]),
    finite.map(np.float64))
skipped = st.one_of(st.none(), st.text(max_size=3), st.integers(-5, 5).map(np.int64),
                    finite.map(np.float32), st.just([1.0]))
values = st.one_of(numbers, numbers, numbers, skipped)


@st.composite
def metric_dicts(draw, max_rows=8, value=values):
    """Lists of metric dicts: either every dict with the same keys in the same order (the
    common layout) or each with its own subset and order of the keys."""
    keys = draw(st.lists(st.sampled_from(KEYS), max_size=5, unique=True))
    uniform = draw(st.booleans())
    rows = []
    for _ in range(draw(st.integers(0, max_rows))):
        row_keys = keys if uniform or not keys else draw(
            st.lists(st.sampled_from(keys), unique=True))
        rows.append({k: draw(value) for k in row_keys})
    return rows


def reference(fn, *args, **kwargs):
    with np.errstate(all="ignore"):  # Trinity's numpy calls warn on NaN/inf; ours must not
        return fn(*args, **kwargs)


def assert_same(ours: dict, ref: dict) -> None:
    assert list(ours) == list(ref)
    for key, expected in ref.items():
        got = ours[key]
        assert type(got) is type(expected), key
        assert got == expected or (math.isnan(got) and math.isnan(expected)), (key, got, expected)


def rng_state():
    return np.random.get_state(legacy=False)


@pytest.fixture
def untouched_global_rng():
    np.random.seed(1234)
    before = rng_state()
    yield
    after = rng_state()
    assert after["state"]["key"].tolist() == before["state"]["key"].tolist()
    assert after["state"]["pos"] == before["state"]["pos"]


# --- worked examples (TRINITY.md) ---------------------------------------------------------

WORKED = [
    ("accuracy", [1, 0, 0], {"mean@3": 0.3333333333333333, "std@3": 0.4714045207910317,
                             "best@2": 0.574, "worst@2": 0.115, "best@3": 0.716, "worst@3": 0.036}),
    ("score", list(range(8)), {"mean@8": 3.5, "std@8": 2.29128784747792, "best@2": 4.746,
                               "worst@2": 2.162, "best@4": 5.834, "worst@4": 1.165,
                               "best@8": 6.525, "worst@8": 0.49}),
]


@pytest.mark.parametrize("key, runs, expected", WORKED)
def test_worked_examples_trinity_mode(key, runs, expected, untouched_global_rng):
    ours = M.calculate_task_level_metrics([{key: v} for v in runs], True, bootstrap="trinity")
    assert ours == {f"{key}/{k}": v for k, v in expected.items()}


@pytest.mark.parametrize("key, runs, expected", WORKED)
def test_worked_examples_match_trinity_itself(key, runs, expected):
    ref = reference(T.calculate_task_level_metrics, [{key: v} for v in runs], True)
    assert ref == {f"{key}/{k}": v for k, v in expected.items()}


def test_worked_examples_exact_mode():
    acc = M.calculate_task_level_metrics([{"accuracy": v} for v in [1, 0, 0]], True)
    # one success in three runs: best@s = 1 - (2/3)^s, worst@s = (1/3)^s, pass@2 = 1 - C(2,2)/C(3,2)
    assert acc["accuracy/best@2"] == pytest.approx(5 / 9, rel=1e-15)
    assert acc["accuracy/worst@2"] == pytest.approx(1 / 9, rel=1e-15)
    assert acc["accuracy/best@3"] == pytest.approx(19 / 27, rel=1e-15)
    assert acc["accuracy/worst@3"] == pytest.approx(1 / 27, rel=1e-15)
    assert acc["accuracy/pass@2"] == pytest.approx(2 / 3, rel=1e-15)
    assert acc["accuracy/pass@3"] == 1.0
    score = M.calculate_task_level_metrics([{"score": v} for v in range(8)], True)
    assert score["score/best@2"] == pytest.approx(
        sum(max(a, b) for a in range(8) for b in range(8)) / 64)
    assert not any("pass@" in k for k in score)


# --- parity with Trinity on generated inputs ------------------------------------------------

@settings(max_examples=150, deadline=None)
@given(dicts=metric_dicts(max_rows=40), prefix=st.sampled_from(["", "rollout", "eval/x"]),
       stats=st.sampled_from([None, [], ["std", "mean"], ["max", "nope", "max", "min"]]))
def test_batch_aggregation_matches_trinity(dicts, prefix, stats):
    before = rng_state()
    assert_same(M.aggregate_metrics(dicts, prefix, stats),
                reference(T.aggregate_metrics, dicts, prefix, stats))
    assert_same(M.aggregate_metrics(dicts, prefix=prefix),
                reference(T.aggregate_metrics, dicts, prefix=prefix))
    for detailed in (False, True):
        assert_same(M.aggregate_eval_metrics(dicts, prefix, stats, detailed),
                    reference(T.aggregate_eval_metrics, dicts, prefix, stats, detailed))
    assert_same(M.aggregate_run_level_metrics(dicts),
                reference(T.aggregate_run_level_metrics, dicts))
    assert_same(M.calculate_task_level_metrics(dicts, False),
                reference(T.calculate_task_level_metrics, dicts, False))
    assert rng_state()["state"]["key"].tolist() == before["state"]["key"].tolist()


@settings(max_examples=60, deadline=None)
@given(dicts=metric_dicts(max_rows=6))
def test_eval_task_metrics_trinity_mode_bit_identical(dicts):
    np.random.seed(7)
    before = rng_state()
    ours = M.calculate_task_level_metrics(dicts, True, bootstrap="trinity")
    assert rng_state()["state"]["key"].tolist() == before["state"]["key"].tolist()
    assert_same(ours, reference(T.calculate_task_level_metrics, dicts, True))


def brute_best_worst(values, s):
    draws = list(itertools.product(values, repeat=s))
    return (math.fsum(map(max, draws)) / len(draws), math.fsum(map(min, draws)) / len(draws))


def brute_pass(values, s):
    subsets = list(itertools.combinations(values, s))
    return sum(1 in c for c in subsets) / len(subsets)


@settings(max_examples=60, deadline=None)
@given(dicts=metric_dicts(max_rows=5, value=st.one_of(finite, st.integers(0, 1), st.booleans(),
                                                      st.none())))
def test_eval_exact_mode_matches_trinity_and_brute_force(dicts):
    ours = M.calculate_task_level_metrics(dicts, True)
    ref = reference(T.calculate_task_level_metrics, dicts, True)
    exact = {k: v for k, v in ours.items() if "pass@" not in k}
    assert list(exact) == list(ref)
    groups = T.group_metrics_by_canonical_key(dicts)
    for key, value in ref.items():
        if "/best@" not in key and "/worst@" not in key:
            assert exact[key] == value, key
    for key, (agg, vals) in groups.items():
        n = len(vals)
        if agg != "mean" or key in ref or n < 2:
            continue
        scale = max(1.0, *map(abs, vals))
        binary = all(v in (0.0, 1.0) for v in vals)
        for s in M._subset_sizes(n):
            best, worst = brute_best_worst(vals, s)
            assert ours[f"{key}/best@{s}"] == pytest.approx(best, rel=1e-12, abs=1e-12 * scale)
            assert ours[f"{key}/worst@{s}"] == pytest.approx(worst, rel=1e-12, abs=1e-12 * scale)
            assert (f"{key}/pass@{s}" in ours) is binary
            if binary:
                assert ours[f"{key}/pass@{s}"] == pytest.approx(brute_pass(vals, s), rel=1e-15)


# --- non-finite values and edge cases --------------------------------------------------------

def exact(runs, **kw):
    return M.calculate_task_level_metrics([{"v": x} for x in runs], True, **kw)


def test_exact_mode_non_finite_policy():
    nan = exact([1.0, math.nan, 2.0])
    assert all(math.isnan(nan[f"v/{s}"]) for s in ("mean@3", "std@3", "best@2", "worst@3"))
    up = exact([1.0, math.inf, 2.0])
    assert up["v/best@2"] == math.inf and up["v/worst@3"] == math.inf  # P(min = inf) = 1/27
    down = exact([1.0, -math.inf, 2.0])
    assert down["v/best@3"] == -math.inf and down["v/worst@2"] == -math.inf
    both = exact([math.inf, -math.inf, 2.0])
    assert math.isnan(both["v/best@2"]) and math.isnan(both["v/worst@2"])


def test_exact_mode_underflowed_probability_does_not_count():
    runs = [-math.inf] + [1.0] * 299        # (1/300)^300 underflows to 0
    out = exact(runs)
    assert out["v/best@300"] == pytest.approx(1.0, rel=1e-12)
    assert out["v/worst@300"] == -math.inf


def test_trinity_mode_nan_counts_only_as_first_draw_like_python_max():
    runs = [{"v": x} for x in [1.0, math.nan, 3.0, 0.5]]
    assert_same(M.calculate_task_level_metrics(runs, True, bootstrap="trinity"),
                reference(T.calculate_task_level_metrics, runs, True))


def test_trinity_mode_chunked_bootstrap_is_identical(monkeypatch):
    runs = [{"a": float(i), "b": float(i * i % 5), "c": i % 2} for i in range(5)]
    monkeypatch.setattr(M, "_CHUNK", 1)     # one key at a time through the bootstrap
    assert_same(M.calculate_task_level_metrics(runs, True, bootstrap="trinity"),
                reference(T.calculate_task_level_metrics, runs, True))


def test_global_rng_untouched_and_trinity_does_touch_it():
    runs = [{"acc": i % 2, "score": float(i)} for i in range(6)]
    np.random.seed(99)
    before = rng_state()
    M.calculate_task_level_metrics(runs, True, bootstrap="trinity")
    M.calculate_task_level_metrics(runs, True)
    M.aggregate_metrics(runs, "rollout")
    assert rng_state()["state"]["key"].tolist() == before["state"]["key"].tolist()
    T.calculate_task_level_metrics(runs, True)
    assert rng_state()["state"]["key"].tolist() != before["state"]["key"].tolist()


def test_skipped_values_follow_trinity():
    runs = [{"a": True, "b": np.float64(2.5), "c": np.int64(3), "d": np.float32(1.0),
             "e": "1.0", "f": None}]
    assert M.aggregate_run_level_metrics(runs) == {"a": 1.0, "b": 2.5}
    assert M.aggregate_run_level_metrics(runs) == T.aggregate_run_level_metrics(runs)


def test_empty_and_iterator_inputs():
    for fn in (M.aggregate_metrics, M.aggregate_eval_metrics, M.aggregate_run_level_metrics):
        assert fn([]) == {}
    assert M.calculate_task_level_metrics([], True) == {}
    assert M.calculate_task_level_metrics([{}, {"s": "x"}], True) == {}
    rows = [{"a": 1.0}, {"a": 3.0}]
    assert M.aggregate_metrics(iter(rows), "r") == M.aggregate_metrics(rows, "r") == {
        "r/a/mean": 2.0, "r/a/max": 3.0, "r/a/min": 1.0}


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="bootstrap must be 'exact' or 'trinity', got 'fast'"):
        M.calculate_task_level_metrics([{"a": 1.0}], True, bootstrap="fast")


@given(key=st.one_of(st.sampled_from(KEYS + ["a:mean:sum", ":", "::last", "a:MEAN"]),
                     st.text(alphabet="ab:meansulx", max_size=12)))
def test_parse_metric_key_matches_trinity(key):
    name, agg = M.parse_metric_key(key)
    ref_name, ref_agg = T.parse_metric_key(key)
    assert (name, agg.value) == (ref_name, ref_agg.value)
    assert agg == ref_agg == ref_agg.value


# --- the running tally and the one-run path ----------------------------------------------

def test_metric_tally_matches_batch_aggregation():
    """The coordinator's running tally gives aggregate_metrics' / aggregate_eval_metrics' keys
    in the same order; sum/max/min/last values identical, mean/std within rounding."""
    import random

    rng = random.Random(7)
    dicts = [{"a": rng.random() * 10, "a:mean": rng.random(), "b:sum": rng.random(),
              "c:max": rng.random(), "s": "skipped", "d:last": rng.random(), "e:min": rng.random(),
              "flag": rng.random() < 0.5} for _ in range(500)]
    tally = M.MetricTally()
    for d in dicts:
        tally.add(d)
    stats = ("mean", "max", "min", "std")
    for ref, got in ((M.aggregate_metrics(dicts, prefix="rollout"), tally.summary("rollout")),
                     (M.aggregate_metrics(dicts, prefix="r", default_output_stats=stats),
                      tally.summary("r", True, stats)),
                     (M.aggregate_eval_metrics(dicts, prefix="eval/x"),
                      tally.summary("eval/x", False))):
        assert list(ref) == list(got)
        for key in ref:
            if (key.endswith(("/mean", "/std")) or key.startswith("eval/x/a")
                    or key == "eval/x/flag"):
                assert math.isclose(ref[key], got[key], rel_tol=1e-12), key
            else:
                assert ref[key] == got[key], key
    nan_tally = M.MetricTally()
    for v in (1.0, float("nan"), 2.0):
        nan_tally.add({"x": v})
    assert all(math.isnan(v) for v in nan_tally.summary("p").values())


@settings(max_examples=300, deadline=None)
@given(dicts=metric_dicts(max_rows=12))
def test_metric_tally_matches_aggregate_metrics_on_any_values(dicts):
    # Hypothesis' values include NaN, inf, bools and skipped types; sum/max/min/last keys must
    # come out identical, mean keys' statistics within rounding (NaN where numpy gives NaN).
    tally = M.MetricTally()
    for d in dicts:
        tally.add(d)
    stats = ("mean", "max", "min", "std")
    ref = reference(M.aggregate_metrics, dicts, prefix="r", default_output_stats=stats)
    got = tally.summary("r", True, stats)
    assert list(got) == list(ref)
    for key, expected in ref.items():
        value = got[key]
        if key.endswith(("/mean", "/std")) and math.isfinite(expected):
            assert math.isclose(value, expected, rel_tol=1e-9, abs_tol=1e-9), key
        elif key.endswith("/std") and math.isfinite(value):
            continue    # inf - inf: numpy's std is NaN where Welford's sum stays finite
        else:
            assert value == expected or (math.isnan(value) and math.isnan(expected)), key


def test_metric_tally_refuses_bad_keys_and_grows():
    tally = M.MetricTally()
    with pytest.raises(TypeError, match=re.escape("metric key 3 (int) is not a str")):
        tally.add({3: 1.0})
    assert tally.summary() == {}
    many = {f"k{i}:sum": float(i) for i in range(100)}      # past the first allocation
    tally.add(many)
    tally.add(many)
    assert tally.summary() == {f"k{i}/sum": 2.0 * i for i in range(100)}
    tally.add({"x": np.float64(2.0), "y": np.int64(3), "z": True})  # as aggregate_metrics
    assert {k for k in tally.summary() if not k.startswith("k")} == {"x/mean", "x/max", "x/min",
                                                                      "z/mean", "z/max", "z/min"}


@settings(max_examples=300, deadline=None)
@given(dicts=metric_dicts(max_rows=1), is_eval=st.booleans())
def test_one_run_fast_path_matches_trinity(dicts, is_eval):
    # One run's dict mostly skips the grouping machinery; the numbers must not change.
    ours = M.calculate_task_level_metrics(dicts, is_eval, bootstrap="trinity")
    assert_same(ours, reference(T.calculate_task_level_metrics, dicts, is_eval))


# --- keys that are not str -------------------------------------------------------------------

# Every entry point a task's metric dict reaches: the coordinator's per-task paths (C) and the
# Python functions, with one run and with many (the transposing path takes 32 or more).
KEY_PATHS = {
    "tally.add": lambda d: M.MetricTally().add(d),
    "single_run_train": lambda d: single_run_metrics(d, False),
    "single_run_eval": lambda d: single_run_metrics(d, True),
    "run_level": lambda d: M.aggregate_run_level_metrics([d]),
    "run_level_uniform": lambda d: M.aggregate_run_level_metrics([d] * 40),
    "run_level_second": lambda d: M.aggregate_run_level_metrics([{"a": 1.0}, d]),
    "task_level_train": lambda d: M.calculate_task_level_metrics([d], False),
    "task_level_eval": lambda d: M.calculate_task_level_metrics([d], True),
    "task_level_eval_runs": lambda d: M.calculate_task_level_metrics([d] * 3, True),
    "batch": lambda d: M.aggregate_metrics([d]),
    "batch_eval_uniform": lambda d: M.aggregate_eval_metrics([d] * 40),
    "parse": lambda d: [M.parse_metric_key(k) for k in d],
}


@pytest.mark.parametrize("path", KEY_PATHS)
@pytest.mark.parametrize("key, name", [(1, "1 (int)"), (("a",), "('a',) (tuple)"),
                                       (None, "None (NoneType)"), (b"acc", "b'acc' (bytes)")])
def test_non_str_key_is_named_on_every_path(path, key, name):
    # A key of a skipped (non-numeric) value is refused too: Trinity would skip it, but a dict
    # with such a key is malformed whatever its values are (and its fate would depend on them).
    for value in (0.5, 2, True, None, "text"):
        with pytest.raises(TypeError, match=re.escape(f"metric key {name} is not a str")):
            KEY_PATHS[path]({"ok": 1.0, key: value})


def test_str_subclass_keys_are_str():
    class Key(str):
        pass

    assert single_run_metrics({Key("a:sum"): 2.0}, False) == {"a:sum": 2.0}
    tally = M.MetricTally()
    tally.add({Key("a:sum"): 2.0})
    assert tally.summary() == {"a/sum": 2.0}


def test_native_tally_imports_only_leaf_modules():
    """tally.pyx depends on metric-key parsing, not on metrics.py (which imports it)."""
    code = ("import sys; from fastrollout._native.tally import MetricTally, single_run_metrics; "
            "MetricTally().add({'a': 1.0, 'b:sum': 2}); single_run_metrics({'a': 1.0}, True); "
            "print(sorted(m for m in sys.modules if m.startswith('fastrollout')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "'fastrollout.metrics'" not in out.stdout
    assert "'fastrollout.metric_keys'" in out.stdout
