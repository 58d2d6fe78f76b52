"""EID: the identity of an experience (batch / task / run / step and a random suffix).

A leaf module: the compiled ``Experience`` imports it to give every experience its EID."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .._native.suffix import new_suffix

__all__ = ["EID"]


@dataclass(slots=True)
class EID:
    """Experience id: batch / task / run / step plus a random suffix."""

    batch: int | str = ""
    task: int | str = ""
    run: int = 0
    step: int = 0
    suffix: str = field(default_factory=new_suffix)  # C PRNG, reseeded after fork

    @property
    def uid(self) -> str:
        return f"{self.batch}/{self.task}/{self.run}/{self.step}/{self.suffix}"

    @property
    def sid(self) -> str:
        return f"{self.batch}/{self.task}/{self.step}"

    @property
    def rid(self) -> str:
        return f"{self.batch}/{self.task}/{self.run}"

    @property
    def tid(self) -> str:
        return f"{self.batch}/{self.task}"

    def __str__(self) -> str:
        return self.uid

    def to_dict(self) -> dict[str, Any]:
        return {"batch": self.batch, "task": self.task, "run": self.run,
                "step": self.step, "suffix": self.suffix}
