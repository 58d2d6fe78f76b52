"""Length distributions (tokens) as configs name them: ``{kind: uniform, low: 8, high: 64}`` in a
job file, ``uniform:8:64`` on the command line.

They give the simulated engines their output lengths (``OutputLength``) and the benchmark its
prompt lengths and per-task ``max_tokens``, drawn with a seeded ``random.Random``
(``spec.sampler(rng)()`` is one draw).
"""
from __future__ import annotations

import itertools
import math
import random
from collections.abc import Callable
from typing import Annotated

import msgspec

from .engines.simulated import OutputLength
from .errors import ConfigError

__all__ = ["Fixed", "Uniform", "Lognormal", "Replay", "LengthSpec", "parse_length"]

_Kind = dict(kw_only=True, forbid_unknown_fields=True, tag_field="kind")
Positive = Annotated[int, msgspec.Meta(ge=1)]


class Fixed(msgspec.Struct, tag="fixed", **_Kind):
    value: Positive = 16

    def output_length(self) -> OutputLength:
        return OutputLength.fixed(self.value)

    def sampler(self, rng: random.Random) -> Callable[[], int]:
        return lambda: self.value


class Uniform(msgspec.Struct, tag="uniform", **_Kind):
    low: Positive = 1
    high: Positive = 64

    def __post_init__(self) -> None:
        if self.low > self.high:
            raise ValueError(f"low ({self.low}) is above high ({self.high})")

    def output_length(self) -> OutputLength:
        return OutputLength.uniform(self.low, self.high)

    def sampler(self, rng: random.Random) -> Callable[[], int]:
        return lambda: rng.randint(self.low, self.high)


class Lognormal(msgspec.Struct, tag="lognormal", **_Kind):
    """Long-tailed lengths around ``median``; ``sigma`` is the log's standard deviation."""

    median: Annotated[float, msgspec.Meta(gt=0)] = 64.0
    sigma: Annotated[float, msgspec.Meta(ge=0)] = 1.0
    max: Positive | None = None
    """Cap (as a ``max_tokens`` would cap it)."""

    def output_length(self) -> OutputLength:
        return OutputLength.lognormal(self.median, self.sigma)

    def sampler(self, rng: random.Random) -> Callable[[], int]:
        mu, cap = math.log(self.median), self.max

        def draw() -> int:
            n = max(1, round(rng.lognormvariate(mu, self.sigma)))
            return n if cap is None else min(n, cap)
        return draw


class Replay(msgspec.Struct, tag="replay", **_Kind):
    """Lengths read from a file (a JSON list or one integer per line), cycled in order."""

    path: str

    def output_length(self) -> OutputLength:
        return OutputLength.replay(self.path)

    def sampler(self, rng: random.Random) -> Callable[[], int]:
        return itertools.cycle(self.output_length().lengths).__next__


LengthSpec = Fixed | Uniform | Lognormal | Replay

# The fields each kind reads from ``kind:a:b`` on the command line, in order.
_FIELDS = {"fixed": ("value",), "uniform": ("low", "high"),
           "lognormal": ("median", "sigma", "max"), "replay": ("path",)}


def parse_length(text: str, what: str = "length") -> LengthSpec:
    """``fixed:N``, ``uniform:LOW:HIGH``, ``lognormal:MEDIAN:SIGMA[:MAX]`` or ``replay:PATH``
    (a bare ``N`` is ``fixed:N``); a ConfigError naming ``what`` otherwise."""
    kind, _, rest = text.partition(":")
    if kind.isdigit() and not rest:
        kind, rest = "fixed", kind
    if kind not in _FIELDS:
        raise ConfigError(f"{what}: unknown distribution {kind!r} in {text!r}; use fixed:N, "
                          f"uniform:LOW:HIGH, lognormal:MEDIAN:SIGMA[:MAX] or replay:PATH")
    names = _FIELDS[kind]
    values = [rest] if kind == "replay" else rest.split(":") if rest else []
    if not values or len(values) > len(names) or (kind == "uniform" and len(values) != 2):
        raise ConfigError(f"{what}: {text!r} does not read as {kind}:{':'.join(names)}")
    data: dict = {"kind": kind}
    for name, value in zip(names, values, strict=False):     # trailing fields are optional
        data[name] = value if kind == "replay" else _number(value, what, text)
    try:
        return msgspec.convert(data, LengthSpec)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"{what}: {text!r}: {exc}") from None


def _number(value: str, what: str, text: str) -> int | float:
    try:
        return int(value)
    except ValueError:
        try:
            return float(value)
        except ValueError:
            raise ConfigError(f"{what}: {value!r} in {text!r} is not a number") from None
