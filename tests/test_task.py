"""Task and GenerationConfig: what one attempt of a started task sees (``attempt_view``)."""
import dataclasses

import pytest

from fastrollout import GenerationConfig, Task
from fastrollout.task import attempt_view


def _every_field_set(cls, **fixed):
    """An instance of the dataclass ``cls`` whose fields all differ from their defaults."""
    values = {}
    for i, f in enumerate(dataclasses.fields(cls)):
        values[f.name] = fixed.get(f.name, {"a": i} if f.type in ("dict",) else
                                   f"v{i}" if "str" in str(f.type) else i + 7)
    return cls(**values)


def test_attempt_view_copies_every_field_as_replace_does():
    args = _every_field_set(GenerationConfig, n=2)
    task = _every_field_set(Task, workflow=object, rollout_args=args)
    view = attempt_view(task, "3/eval", 5, 8)
    assert view == dataclasses.replace(task, batch_id="3/eval", task_id=5,
                                       rollout_args=dataclasses.replace(args, n=8))
    assert type(view) is Task and type(view.rollout_args) is GenerationConfig
    # the caller's objects are untouched
    assert (task.batch_id, task.task_id, args.n) != ("3/eval", 5, 8) and args.n == 2
    assert view.workflow_args is task.workflow_args


def test_each_attempt_gets_its_own_rollout_args_and_raw_task():
    # A workflow changing max_tokens must not change other tasks, the caller's object or a
    # retry; one popping a key of raw_task must not break the retry (Trinity's runners get
    # both anew with every attempt, over Ray).
    shared = GenerationConfig(max_tokens=16, n=4)
    task = Task(workflow=object, repeat_times=4, rollout_args=shared, raw_task={"q": "x"})
    first = attempt_view(task, 0, 0, 4)
    first.rollout_args.max_tokens = 1
    first.raw_task.pop("q")
    retry = attempt_view(task, 0, 0, 4)
    other = attempt_view(Task(workflow=object, rollout_args=shared), 0, 1, 4)
    assert retry.rollout_args.max_tokens == 16 and retry.raw_task == {"q": "x"}
    assert other.rollout_args.max_tokens == 16 and shared.max_tokens == 16
    assert task.raw_task == {"q": "x"}
    assert retry.rollout_args is not first.rollout_args is not shared


def test_attempt_view_keeps_subclasses_and_their_fields():
    @dataclasses.dataclass
    class MyArgs(GenerationConfig):
        stop: str = ""

    @dataclasses.dataclass
    class MyTask(Task):
        level: int = 0

    task = MyTask(workflow=object, rollout_args=MyArgs(stop="x"), level=3, raw_task={"a": 1})
    view = attempt_view(task, 1, 0, 4)
    assert type(view) is MyTask and view.level == 3 and view.task_id == 0
    assert type(view.rollout_args) is MyArgs and view.rollout_args.stop == "x"
    assert view.rollout_args.n == 4 and task.rollout_args.n == 1
    assert view.raw_task == {"a": 1} and view.raw_task is not task.raw_task


def test_a_task_without_generation_config_cannot_start():
    with pytest.raises(TypeError,
                       match=r"Task\.rollout_args must be a GenerationConfig, got NoneType"):
        attempt_view(Task(workflow=object, rollout_args=None), 0, 0, 1)
