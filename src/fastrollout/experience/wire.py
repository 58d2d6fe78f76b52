"""The per-experience metadata records of a batch, as msgspec structs (its wire form too).

A leaf module: the compiled packer imports it to build them."""
from __future__ import annotations

from typing import Any

import msgspec

__all__ = ["WireEID", "WireItem"]


class WireEID(msgspec.Struct, array_like=True, gc=False):
    """An EID's fields, in EID's order."""

    batch: int | str
    task: int | str
    run: int
    step: int
    suffix: str


class WireItem(msgspec.Struct, array_like=True, gc=False, omit_defaults=True):
    """Per-experience metadata, an ExperienceBatch's item and its wire form: the fields most
    often unset come last (omitted). Not tracked by the GC (its dicts are)."""

    eid: WireEID
    info: dict[str, Any] = {}
    metrics: dict[str, Any] = {}
    response_text: str | None = None
    prompt_text: str | None = None
    truncate_status: str | None = None
    messages: list[Any] | None = None
    tools: list[Any] | None = None
    chosen_messages: list[Any] | None = None
    rejected_messages: list[Any] | None = None
