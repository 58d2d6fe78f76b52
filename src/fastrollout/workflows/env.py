"""Environments for the multi-turn workflow: the interface, their registry, and an example.

An ``Env`` is made per episode (``cls(**env_args)``), then ``reset(task)`` gives the first
observation and each ``step(action)`` answers a model reply with ``(observation, reward,
done)``. Either method may be ``async def``. A synchronous one runs on the event loop, so it
must be quick; an env whose sync methods block (I/O, subprocesses) sets ``blocking = True``
and they run in a thread. ``close()`` (sync or async) is called when the episode ends,
however it ends.
"""
from __future__ import annotations

import asyncio
import inspect
import numbers
import re
from typing import TYPE_CHECKING, Any, ClassVar

from ..errors import ConfigError
from .registry import Registry

if TYPE_CHECKING:
    from ..task import Task


class Env:
    blocking: ClassVar[bool] = False

    def reset(self, task: Task) -> str:
        raise TypeError(f"{type(self).__name__} must implement reset(task) -> observation")

    def step(self, action: str) -> tuple[str, float, bool]:
        raise TypeError(f"{type(self).__name__} must implement step(action) -> "
                        f"(observation, reward, done)")

    def close(self) -> None:
        """Release what the episode held; nothing by default."""


ENVS: Registry[type[Env]] = Registry("env", Env)


async def call_env(env: Env, name: str, *args: Any) -> Any:
    """``env.<name>(*args)``, awaited if async, in a thread if the env is ``blocking``."""
    method = getattr(env, name)
    if inspect.iscoroutinefunction(method):
        return await method(*args)
    if env.blocking:
        return await asyncio.to_thread(method, *args)
    return method(*args)


def check_observation(env: Env, observation: Any) -> str:
    if not isinstance(observation, str):
        raise TypeError(f"{type(env).__name__}: an observation must be a str, got "
                        f"{type(observation).__name__}")
    return observation


def check_step(env: Env, result: Any) -> tuple[str, float, bool]:
    """``step``'s result, checked: ``(str, real number, bool)``."""
    if not (isinstance(result, tuple) and len(result) == 3):
        raise TypeError(f"{type(env).__name__}.step must return (observation, reward, done), "
                        f"got {result!r:.80}")
    observation, reward, done = result
    if not isinstance(reward, numbers.Real) or isinstance(reward, bool):
        raise TypeError(f"{type(env).__name__}.step: reward must be a number, got "
                        f"{type(reward).__name__}")
    return check_observation(env, observation), float(reward), bool(done)


def make_env(cls: type[Env], env_args: dict[str, Any], task: Task) -> Env:
    try:
        return cls(**env_args)
    except TypeError as exc:
        raise ConfigError(f"task {task.task_id} of batch {task.batch_id}: "
                          f"workflow_args.env_args: {cls.__name__}: {exc}") from None


@ENVS.register("guess_number")
class GuessNumberEnv(Env):
    """Guess the integer ``raw_task[secret_key]`` from ``low`` to ``high``. Each reply's last
    integer is the guess; the env answers "too low" / "too high", or "Correct!" with reward
    1.0, which ends the episode. A reply without an integer is asked again (reward 0)."""

    _INTEGER = re.compile(r"-?\d+")

    def __init__(self, *, low: int = 1, high: int = 100, secret_key: str = "secret") -> None:
        if not low <= high:
            raise ValueError(f"GuessNumberEnv: need low <= high, got {low}, {high}")
        self.low, self.high, self.secret_key = low, high, secret_key
        self.secret: int | None = None

    def reset(self, task: Task) -> str:
        secret = task.raw_task.get(self.secret_key)
        if isinstance(secret, bool) or not isinstance(secret, int) \
                or not self.low <= secret <= self.high:
            raise ConfigError(f"task {task.task_id} of batch {task.batch_id}: GuessNumberEnv "
                              f"needs raw_task[{self.secret_key!r}], an int from {self.low} to "
                              f"{self.high}, got {secret!r:.40}")
        self.secret = secret
        return (f"I am thinking of an integer from {self.low} to {self.high}. "
                f"Guess it: reply with one number.")

    def step(self, action: str) -> tuple[str, float, bool]:
        if self.secret is None:
            raise RuntimeError("GuessNumberEnv.step() before reset()")
        found = self._INTEGER.findall(action)
        if not found:
            return "Reply with one integer.", 0.0, False
        digits = found[-1]
        if len(digits) > 20:     # beyond any secret, and beyond what int() converts quickly
            return f"{digits[:20]}... is too {'low' if digits[0] == '-' else 'high'}.", 0.0, False
        guess = int(digits)
        if guess == self.secret:
            return "Correct!", 1.0, True
        return f"{guess} is too {'low' if guess < self.secret else 'high'}.", 0.0, False
