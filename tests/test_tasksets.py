"""fastrollout.tasksets: the three formats, keys, seeded epochs, batches, resuming, bad rows."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap

import pytest

from fastrollout import ConfigError, FastRolloutError, GenerationConfig, Task
from fastrollout.demo import ScoreWorkflow
from fastrollout.tasksets import (
    Taskset,
    TasksetConfig,
    TasksetError,
    arithmetic_tasks,
    write_arithmetic_jsonl,
)
from harness import Harness

ROWS = [{"prompt": f"question {i}", "answer": str(i), "level": i % 3, "unused": [i]}
        for i in range(10)]


def write_jsonl(path, rows, *, blank_lines=False):
    with open(path, "w") as f:
        for row in rows:
            f.write((row if isinstance(row, str) else json.dumps(row)) + "\n")
            if blank_lines:
                f.write("\n  \n")
    return path


def write_parquet(path, rows, schema=None):
    import pyarrow as pa
    import pyarrow.parquet as pq
    table = pa.Table.from_pylist(rows, schema=schema)
    pq.write_table(table, path, row_group_size=3)
    return path


def open_taskset(path, **config):
    return Taskset(TasksetConfig.from_dict({"path": str(path), **config}), workflow=ScoreWorkflow)


def drain(taskset, batch_size):
    return [[t.index["index"] for t in batch] for batch in taskset.batches(batch_size)]


@pytest.fixture(params=["jsonl", "json", "json-list-key", "parquet"])
def data_file(request, tmp_path):
    """ROWS in each format, and the config keys that format needs."""
    kind = request.param
    if kind == "jsonl":
        return write_jsonl(tmp_path / "t.jsonl", ROWS, blank_lines=True), {}
    if kind == "json":
        (tmp_path / "t.json").write_text(json.dumps(ROWS))
        return tmp_path / "t.json", {}
    if kind == "json-list-key":
        (tmp_path / "t.json").write_text(json.dumps({"meta": 1, "data": ROWS}))
        return tmp_path / "t.json", {"list_key": "data"}
    return write_parquet(tmp_path / "t.parquet", ROWS), {}


def test_each_format_gives_the_rows_as_tasks(data_file):
    path, extra = data_file
    taskset = open_taskset(path, extra_keys=["level"], repeat_times=4, workflow_args={"k": 1},
                           reward_fn_args={"r": 2}, rollout_args={"temperature": 0.5,
                                                                  "max_tokens": 64}, **extra)
    assert len(taskset) == 10
    tasks = taskset.next_batch(10)
    assert [t.raw_task for t in tasks] == [
        {"prompt": r["prompt"], "answer": r["answer"], "level": r["level"]} for r in ROWS]
    assert [t.index for t in tasks] == [{"index": i} for i in range(10)]
    task = tasks[0]
    assert type(task) is Task and task.workflow is ScoreWorkflow and task.repeat_times == 4
    assert task.rollout_args == GenerationConfig(temperature=0.5, max_tokens=64)
    assert task.workflow_args == {"k": 1}
    assert task.reward_fn_args == {"r": 2} and task.is_eval is False


def test_prompt_and_answer_keys(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"question": "q0", "solution": 7, "x": None}])
    task = open_taskset(path, prompt_key="question", answer_key="solution",
                        extra_keys=["x"]).next_batch(1)[0]
    assert task.raw_task == {"question": "q0", "solution": 7, "x": None}
    no_answer = open_taskset(path, prompt_key="question", answer_key=None).next_batch(1)[0]
    assert no_answer.raw_task == {"question": "q0"}


def test_tasks_do_not_share_mutable_fields(data_file):
    path, extra = data_file
    taskset = open_taskset(path, epochs=2, workflow_args={"k": 1}, **extra)
    first = taskset.next_batch(10)
    first[0].raw_task["prompt"] = "changed"
    first[0].workflow_args["k"] = 2
    first[0].rollout_args.temperature = 0.0
    again = taskset.next_batch(10)
    assert again[0].raw_task["prompt"] == "question 0" and first[1].workflow_args["k"] == 1
    assert again[0].rollout_args.temperature == 1.0


def test_split_folder_reads_shards_in_name_order(tmp_path):
    write_jsonl(tmp_path / "train-00001-of-00002.jsonl", ROWS[5:])
    write_jsonl(tmp_path / "train-00000-of-00002.jsonl", ROWS[:5])
    write_jsonl(tmp_path / "test.jsonl", ROWS[:2])
    (tmp_path / "train.txt").write_text("not a taskset")
    train = open_taskset(tmp_path, shuffle=True, seed=3)
    tasks = train.next_batch(10)
    assert sorted(t.raw_task["prompt"] for t in tasks) == sorted(r["prompt"] for r in ROWS)
    assert all(t.raw_task["answer"] == str(t.index["index"]) for t in tasks)
    assert len(open_taskset(tmp_path, split="test")) == 2
    with pytest.raises(ConfigError, match=r"path: .* split 'validation'"):
        open_taskset(tmp_path, split="validation")


# --- order: shuffling, epochs, batches -----------------------------------------------------

def test_file_order_without_shuffle_and_batches_span_epochs(tmp_path):
    taskset = open_taskset(write_jsonl(tmp_path / "t.jsonl", ROWS), epochs=2)
    assert drain(taskset, 4) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 0, 1], [2, 3, 4, 5],
                                 [6, 7, 8, 9]]
    assert taskset.next_batch(4) == [] and taskset.epoch == 2


def test_drop_last_train_keeps_last_for_eval(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", ROWS)
    assert drain(open_taskset(path), 4) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert drain(open_taskset(path, drop_last=False), 4)[-1] == [8, 9]
    evaluated = open_taskset(path, is_eval=True)
    assert drain(evaluated, 4)[-1] == [8, 9]
    assert open_taskset(path, is_eval=True).next_batch(3)[0].is_eval is True


def test_shuffle_is_seeded_and_each_epoch_is_a_new_permutation(data_file):
    path, extra = data_file
    config = dict(shuffle=True, seed=7, epochs=3, **extra)
    order = [i for batch in drain(open_taskset(path, **config), 5) for i in batch]
    assert order == [i for batch in drain(open_taskset(path, **config), 3) for i in batch]
    epochs = [order[0:10], order[10:20], order[20:30]]
    assert all(sorted(epoch) == list(range(10)) for epoch in epochs)
    assert len({tuple(epoch) for epoch in epochs}) == 3
    assert epochs[0] != list(range(10))
    other = [i for b in drain(open_taskset(path, **{**config, "seed": 8}), 5) for i in b]
    assert other != order


def test_permutation_is_pinned(tmp_path):
    """The order of a seed may not change across releases: saved positions depend on it."""
    taskset = open_taskset(write_jsonl(tmp_path / "t.jsonl", ROWS), shuffle=True, seed=0,
                           epochs=2)
    assert drain(taskset, 10) == [[3, 2, 1, 8, 6, 0, 7, 4, 5, 9], [7, 4, 5, 1, 9, 8, 6, 2, 0, 3]]


@pytest.mark.parametrize("size", [0, -1, 1.5, True, None])
def test_batch_size_must_be_a_positive_int(tmp_path, size):
    taskset = open_taskset(write_jsonl(tmp_path / "t.jsonl", ROWS))
    with pytest.raises(TasksetError, match="batch_size"):
        taskset.next_batch(size)


# --- resuming ------------------------------------------------------------------------------

def test_restored_state_gives_the_batches_that_would_have_come(data_file):
    path, extra = data_file
    config = dict(shuffle=True, seed=11, epochs=3, **extra)
    expected = drain(open_taskset(path, **config), 4)
    first = open_taskset(path, **config)
    head = [[t.index["index"] for t in first.next_batch(4)] for _ in range(4)]
    saved = json.loads(json.dumps(first.state_dict()))
    resumed = open_taskset(path, **config)
    resumed.load_state_dict(saved)
    assert resumed.position == 16 and resumed.epoch == 1
    assert head + drain(resumed, 4) == expected


def test_restored_state_in_a_new_process(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", ROWS)
    config = {"path": str(path), "shuffle": True, "seed": 5, "epochs": 2,
              "workflow": "fastrollout.demo:ScoreWorkflow"}
    taskset = Taskset(TasksetConfig.from_dict(config))
    taskset.next_batch(7)
    state = taskset.state_dict()
    script = textwrap.dedent("""
        import json, sys
        from fastrollout.tasksets import Taskset, TasksetConfig
        config, state = json.loads(sys.argv[1]), json.loads(sys.argv[2])
        taskset = Taskset(TasksetConfig.from_dict(config))
        taskset.load_state_dict(state)
        print(json.dumps([[t.raw_task["prompt"] for t in b] for b in taskset.batches(6)]))
    """)
    out = subprocess.run([sys.executable, "-c", script, json.dumps(config), json.dumps(state)],
                         check=True, capture_output=True, text=True).stdout
    assert json.loads(out) == [[t.raw_task["prompt"] for t in b] for b in taskset.batches(6)]


def test_state_may_continue_with_more_epochs(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", ROWS)
    done = open_taskset(path, shuffle=True)
    drain(done, 5)
    more = open_taskset(path, shuffle=True, epochs=2)
    expected = drain(open_taskset(path, shuffle=True, epochs=2), 5)[2:]
    more.load_state_dict(done.state_dict())
    assert drain(more, 5) == expected


@pytest.mark.parametrize("change, match", [
    ({"num_rows": 11}, "num_rows=11"),
    ({"seed": 1}, "seed=1"),
    ({"shuffle": False}, "shuffle=False"),
    ({"position": 21}, "position 21 is outside 0..20"),
    ({"position": -1}, "position -1"),
    ({"position": "3"}, "position '3'"),
    ({"extra": 1}, "not a taskset state_dict"),
])
def test_a_state_of_another_taskset_is_refused(tmp_path, change, match):
    taskset = open_taskset(write_jsonl(tmp_path / "t.jsonl", ROWS), shuffle=True, epochs=2)
    with pytest.raises(TasksetError, match=match):
        taskset.load_state_dict({**taskset.state_dict(), **change})
    assert taskset.position == 0


def test_seed_does_not_matter_without_shuffle(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", ROWS)
    taskset = open_taskset(path)
    taskset.load_state_dict({**open_taskset(path, seed=1).state_dict(), "position": 3})
    assert taskset.next_batch(1)[0].index == {"index": 3}


# --- bad rows --------------------------------------------------------------------------------

JSONL_BAD = [
    ('{"prompt": "a", "answer": "1"', "line 2: invalid JSON"),
    ("[1, 2]", "line 2: expected a JSON object, got array"),
    ('{"question": "a", "answer": "1"}', "line 2: key 'prompt': missing (the row has keys: "
                                         "question, answer)"),
    ('{"prompt": 3, "answer": "1", "level": 1}',
     "line 2: key 'prompt': expected a string, got integer"),
    ('{"prompt": null, "answer": "1", "level": 1}',
     "line 2: key 'prompt': expected a string, got null"),
    ('{"prompt": "a"}', "line 2: key 'answer': missing"),
    ('{"prompt": "a", "answer": null, "level": 1}', "line 2: key 'answer': is null"),
    ('{"prompt": "a", "answer": "1"}', "line 2: key 'level': missing"),
    ('{"prompt": "a", "answer": "1", "level": 1} x', "line 2: invalid JSON"),
    (b'{"prompt": "\xff", "answer": "1", "level": 1}', "line 2: invalid JSON"),
]


@pytest.mark.parametrize("line, match", JSONL_BAD)
def test_bad_jsonl_row_names_file_line_and_key(tmp_path, line, match):
    path = tmp_path / "bad.jsonl"
    good = json.dumps(ROWS[0]).encode()
    path.write_bytes(good + b"\n" + (line if isinstance(line, bytes) else line.encode()) + b"\n"
                     + good + b"\n")
    with pytest.raises(TasksetError, match="^" + re.escape(f"{path}, {match}")) as info:
        open_taskset(path, extra_keys=["level"])
    assert isinstance(info.value, FastRolloutError) and isinstance(info.value, ValueError)


def test_bad_row_line_numbers_count_blank_lines(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [ROWS[0], {"answer": "1"}], blank_lines=True)
    with pytest.raises(TasksetError, match=r"bad.jsonl, line 4: key 'prompt'"):
        open_taskset(path)


@pytest.mark.parametrize("data, config, match", [
    ([ROWS[0], {"prompt": ["a"], "answer": "1"}], {}, r"\$\[1\]: key 'prompt': expected a "
                                                       r"string, got array"),
    ([ROWS[0], "text"], {}, r"\$\[1\]: expected a JSON object, got string"),
    ({"data": [ROWS[0], {"answer": "1"}]}, {"list_key": "data"}, r"\$\.data\[1\]: key 'prompt'"),
    ({"data": ROWS}, {}, r"expected a list of rows, got object; set list_key"),
    ({"rows": ROWS}, {"list_key": "data"}, r"list_key 'data': no such key .*found: rows"),
    ({"data": {"a": 1}}, {"list_key": "data"}, r"\$\.data: expected a list of rows, got object"),
    (ROWS, {"list_key": "data"}, r"list_key 'data': no such key .*found: array"),
])
def test_bad_json_names_file_item_and_key(tmp_path, data, config, match):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    with pytest.raises(TasksetError, match=f"^{re.escape(str(path))}(, |: ){match}"):
        open_taskset(path, **config)


def test_jsonl_named_json_hints_at_the_format(tmp_path):
    path = write_jsonl(tmp_path / "t.json", ROWS)
    with pytest.raises(TasksetError, match=r"invalid JSON.*set format to jsonl"):
        open_taskset(path)
    assert len(open_taskset(path, format="jsonl")) == 10


def test_bad_parquet_names_file_row_and_key(tmp_path):
    import pyarrow as pa
    rows = [dict(r) for r in ROWS]
    rows[7]["prompt"] = None
    with pytest.raises(TasksetError, match=r"null.parquet, row 7: key 'prompt': is null"):
        open_taskset(write_parquet(tmp_path / "null.parquet", rows))
    rows = [dict(r) for r in ROWS]
    rows[4]["answer"] = None
    with pytest.raises(TasksetError, match=r"answer.parquet, row 4: key 'answer': is null"):
        open_taskset(write_parquet(tmp_path / "answer.parquet", rows))
    path = write_parquet(tmp_path / "ints.parquet", [{"prompt": 1, "answer": "1"}])
    with pytest.raises(TasksetError, match=r"ints.parquet: key 'prompt': expected a column of "
                                           r"strings, got int64"):
        open_taskset(path)
    with pytest.raises(TasksetError, match=r"ints.parquet: key 'level': no such column "
                                           r"\(columns: prompt, answer\)"):
        open_taskset(path, extra_keys=["level"])
    schema = pa.schema([("prompt", pa.dictionary(pa.int32(), pa.large_string())),
                        ("answer", pa.int64())])
    path = write_parquet(tmp_path / "dict.parquet", [{"prompt": "p", "answer": 3}], schema)
    assert open_taskset(path).next_batch(1)[0].raw_task == {"prompt": "p", "answer": 3}


def test_parquet_without_pyarrow_names_the_extra(tmp_path, monkeypatch):
    path = tmp_path / "t.parquet"
    path.write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    with pytest.raises(ImportError, match=r"fastrollout\[data\]"):
        open_taskset(path)


def test_a_file_changed_after_opening_is_an_error(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", ROWS)
    taskset = open_taskset(path)
    write_jsonl(path, ROWS[::-1])
    with pytest.raises(TasksetError, match="changed since the taskset opened it"):
        taskset.next_batch(2)
    assert taskset.position == 0


@pytest.mark.parametrize("name, content", [
    ("empty.jsonl", b""), ("blank.jsonl", b"\n \n\t\n"), ("empty.json", b"[]"),
    ("empty-list.json", b'{"data": []}'),
])
def test_an_empty_taskset_is_an_error(tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(TasksetError, match=f"{path}: no rows"):
        open_taskset(path, list_key="data" if "list" in name else None)


def test_an_empty_parquet_file_is_an_error(tmp_path):
    import pyarrow as pa
    schema = pa.schema([("prompt", pa.string()), ("answer", pa.string())])
    path = write_parquet(tmp_path / "empty.parquet", [], schema)
    with pytest.raises(TasksetError, match=r"empty\.parquet: no rows"):
        open_taskset(path)


def test_an_empty_json_file_is_invalid_json(tmp_path):
    path = tmp_path / "empty.json"
    path.write_bytes(b"")
    with pytest.raises(TasksetError, match=f"^{path}: invalid JSON"):
        open_taskset(path)


# --- config --------------------------------------------------------------------------------

@pytest.mark.parametrize("data, match", [
    ({"path": "x", "epochs": 0}, r"^epochs: expected `int` >= 1"),
    ({"path": "x", "shuffle": "yes"}, r"^shuffle: expected `bool`, got `str`"),
    ({"path": "x", "rollout_args": {"temperature": "hot"}}, r"^rollout_args.temperature: "),
    ({"path": "x", "rollout_args": {"n": 2}}, r"^rollout_args.n: unknown key"),
    ({"path": "x", "prompt": "q"}, r"^prompt: unknown key"),
    ({}, r"^path: required key is missing"),
    ({"path": "x", "format": "csv"}, r"^format: invalid enum value 'csv'"),
    ({"path": "x", "is_eval": True, "shuffle": True}, r"^shuffle: eval tasksets"),
    ({"path": "x", "is_eval": True, "epochs": 2}, r"^epochs: eval tasksets"),
    ({"path": "x", "is_eval": True, "drop_last": True}, r"^drop_last: eval tasksets"),
    (["x"], r"^<top level>: expected `object`, got `array`"),
])
def test_config_errors_name_the_field(data, match):
    with pytest.raises(ConfigError, match=match):
        TasksetConfig.from_dict(data)


def test_config_built_in_python_is_validated(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", ROWS)
    with pytest.raises(ConfigError, match=r"^seed: expected `int` >= 0"):
        Taskset(TasksetConfig(path=str(path), seed=-1), workflow=ScoreWorkflow)
    with pytest.raises(ConfigError, match=r"^epochs: eval tasksets"):
        TasksetConfig(path=str(path), is_eval=True, epochs=3)


@pytest.mark.parametrize("workflow, match", [
    (None, "workflow: none given"),
    ("ScoreWorkflow", r"workflow: unknown workflow 'ScoreWorkflow' \(registered: .*math"),
    (":ScoreWorkflow", "workflow: ':ScoreWorkflow' is not of the form 'module:Class'"),
    ("fastrollout.demo:NoSuch", "workflow: cannot import 'fastrollout.demo:NoSuch'"),
    ("no_such_module_xyz:W", "workflow: cannot import"),
    ("fastrollout.config:Config", "'fastrollout.config:Config' is not a Workflow subclass"),
    ("fastrollout.config:Config.default", "not a Workflow subclass"),
])
def test_workflow_must_name_a_workflow_class(tmp_path, workflow, match):
    path = write_jsonl(tmp_path / "t.jsonl", ROWS)
    with pytest.raises(ConfigError, match=match):
        Taskset(TasksetConfig.from_dict({"path": str(path), "workflow": workflow}))


def test_workflow_by_registered_name(tmp_path):
    from fastrollout.workflows import MathWorkflow

    path = write_jsonl(tmp_path / "t.jsonl", ROWS)
    taskset = Taskset(TasksetConfig.from_dict({"path": str(path), "workflow": "math"}))
    assert taskset.next_batch(1)[0].workflow is MathWorkflow


def test_path_and_format_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"^path: no such file or folder"):
        open_taskset(tmp_path / "missing.jsonl")
    (tmp_path / "t.csv").write_text("prompt,answer\n")
    with pytest.raises(ConfigError, match=r"^format: cannot tell from t\.csv"):
        open_taskset(tmp_path / "t.csv")
    (tmp_path / "d").mkdir()
    write_jsonl(tmp_path / "d" / "train-0.jsonl", ROWS)
    (tmp_path / "d" / "train-1.json").write_text(json.dumps(ROWS))
    with pytest.raises(ConfigError, match=r"^format: cannot tell from train-0\.jsonl, train-1"):
        open_taskset(tmp_path / "d")


# --- the arithmetic taskset ------------------------------------------------------------------

def test_arithmetic_tasks_are_seeded_and_correct():
    rows = list(arithmetic_tasks(200, seed=3))
    assert rows == list(arithmetic_tasks(200, seed=3)) != list(arithmetic_tasks(200, seed=4))
    assert list(arithmetic_tasks(5, seed=3)) == rows[:5]
    ops = set()
    for row in rows:
        a, op, b = row["question"].removeprefix("What is ").removesuffix("?").split()
        ops.add(op)
        expected = {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op]
        assert row["answer"] == str(expected) and expected >= 0
    assert ops == {"+", "-", "*"}
    with pytest.raises(ValueError, match="non-negative int"):
        list(arithmetic_tasks(-1))


def test_arithmetic_jsonl_is_a_taskset(tmp_path):
    path = write_arithmetic_jsonl(tmp_path / "arith.jsonl", 12, seed=1)
    assert not os.path.exists(f"{path}.partial")
    taskset = open_taskset(path, prompt_key="question")
    assert [t.raw_task for t in taskset.next_batch(12)] == list(arithmetic_tasks(12, seed=1))


async def test_tasks_run_on_the_coordinator(tmp_path):
    rows = [{"prompt": r["question"], "answer": r["answer"]} for r in arithmetic_tasks(6)]
    path = write_jsonl(tmp_path / "arith.jsonl", rows)
    taskset = open_taskset(path, repeat_times=2, shuffle=True)
    async with Harness() as coord:
        await coord.submit_batch(batch_id=0, tasks=taskset.next_batch(6), batch_type="train")
        result = await coord.finalize_train_batch(0)
    assert result["finished_task_count"] == 6
