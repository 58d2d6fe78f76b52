"""What a workflow's experiences must be for the pipeline to take them.

The pipeline packs the experiences of many tasks together, so one experience it cannot
pack would fail them all. The runner checks each task's experiences with
``check_experiences`` when its attempt ends: a bad one fails that attempt, with a message
naming the experience and the field.
"""
from __future__ import annotations

import numbers
import operator

import numpy as np

from .model import ARRAY_FIELDS, EID, Experience, as_array

_TEXT_FIELDS = ("truncate_status", "response_text", "prompt_text")
_LIST_FIELDS = ("messages", "tools", "chosen_messages", "rejected_messages")
_INT64_MAX = 2**63 - 1


def check_experiences(exps: object) -> None:
    """Raise TypeError/ValueError naming experience ``i`` and its field unless ``exps`` is a
    list of Experience objects that ``ExperienceBatch.from_experiences`` packs and the
    codec encodes: arrays of their field's kind, a numeric or None reward, an int
    ``prompt_length`` within the tokens, an ``EID``, dict ``info``/``metrics``."""
    if not isinstance(exps, list):
        raise TypeError(f"a workflow must return a list of Experience, got "
                        f"{type(exps).__name__}")
    for i, exp in enumerate(exps):
        if not isinstance(exp, Experience):
            raise TypeError(f"experience {i}: expected an Experience, got {type(exp).__name__}")
        tokens = exp.tokens
        if tokens is None:
            raise ValueError(f"experience {i}: tokens: every experience needs tokens")
        for name in ARRAY_FIELDS:
            value = getattr(exp, name)
            if value is not None:
                _check_array(i, name, value)
        _check_prompt_length(i, exp.prompt_length, len(tokens))
        reward = exp.reward
        if reward is not None and not (isinstance(reward, numbers.Real)
                                       or isinstance(reward, np.number)):
            raise TypeError(f"experience {i}: reward must be a number or None, got "
                            f"{type(reward).__name__} {reward!r:.40}")
        if not isinstance(exp.eid, EID):
            raise TypeError(f"experience {i}: eid must be an EID, got {type(exp.eid).__name__}")
        _check_eid(i, exp.eid)
        for name in ("info", "metrics"):
            if type(getattr(exp, name)) is not dict:
                raise TypeError(f"experience {i}: {name} must be a dict, got "
                                f"{type(getattr(exp, name)).__name__}")
        for name in _TEXT_FIELDS:
            value = getattr(exp, name)
            if value is not None and not isinstance(value, str):
                raise TypeError(f"experience {i}: {name} must be a str or None, got "
                                f"{type(value).__name__}")
        for name in _LIST_FIELDS:
            value = getattr(exp, name)
            if value is not None and not isinstance(value, list):
                raise TypeError(f"experience {i}: {name} must be a list or None, got "
                                f"{type(value).__name__}")


def _check_array(i: int, name: str, value: object) -> None:
    try:
        as_array(value, name)
    except (TypeError, ValueError) as exc:
        raise type(exc)(f"experience {i}: {exc}") from None


def _check_prompt_length(i: int, plen: object, n_tokens: int) -> None:
    try:
        value = operator.index(plen) if not isinstance(plen, bool) else None
    except TypeError:
        value = None
    if value is None:
        raise TypeError(f"experience {i}: prompt_length must be an int, got "
                        f"{type(plen).__name__} {plen!r:.40}")
    if not 0 <= value <= n_tokens:
        raise ValueError(f"experience {i}: prompt_length {value} is outside 0..{n_tokens} "
                         f"(the number of tokens)")


def _check_eid(i: int, eid: EID) -> None:
    for name in ("batch", "task"):
        value = getattr(eid, name)
        if not isinstance(value, (int, str)) or isinstance(value, bool):
            raise TypeError(f"experience {i}: eid.{name} must be an int or a str, got "
                            f"{type(value).__name__}")
    for name in ("run", "step"):
        value = getattr(eid, name)
        if type(value) is not int or not -_INT64_MAX <= value <= _INT64_MAX:
            raise TypeError(f"experience {i}: eid.{name} must be an int (64-bit), got "
                            f"{type(value).__name__} {value!r:.40}")
    if not isinstance(eid.suffix, str):
        raise TypeError(f"experience {i}: eid.suffix must be a str, got "
                        f"{type(eid.suffix).__name__}")
