"""ExperienceBatch: experiences as columns (views into a decoded payload, or built directly)."""
from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np

from .._native.pack import pack, unpack
from .column import ArrayColumn
from .model import ARRAY_FIELDS, EID, META_FIELDS, Experience, to_torch
from .wire import WireEID, WireItem

__all__ = ["ArrayColumn", "ExperienceBatch", "WireEID", "WireItem"]

# Experiences made at a time when iterating over a batch: as fast per item as all at once,
# without holding them all.
_ITER_CHUNK = 256


class ExperienceBatch(Sequence[Experience]):
    """Experiences as columns: ``len``, indexing to ``Experience`` (views), and columns.

    ``items`` are ``WireItem`` metadata records (``eid`` with batch/task/run/step/suffix, and
    the names in ``META_FIELDS``); ``columns`` maps array field names to ArrayColumn."""

    __slots__ = ("items", "columns", "rewards", "reward_present", "prompt_lengths")

    def __init__(self, items: list[WireItem], columns: dict[str, ArrayColumn],
                 rewards: np.ndarray, reward_present: np.ndarray | None,
                 prompt_lengths: np.ndarray) -> None:
        self.items = items
        self.columns = columns
        self.rewards = rewards                  # float64; NaN where the reward is None
        self.reward_present = reward_present    # None: every item has a reward
        self.prompt_lengths = prompt_lengths    # int64

    @classmethod
    def from_experiences(cls, exps: Iterable[Experience]) -> ExperienceBatch:
        """Columns built straight from experiences: each array field is copied once into one
        buffer, with the dtypes and layout that ``decode_experiences(encode_experiences(exps))``
        gives. The items' metadata (info, metrics, messages, ...) is kept by reference, not
        copied: the batch owns it from now on and it must not be modified. The experiences
        themselves are not kept (nor, through them, their original arrays)."""
        return cls(*pack(exps))

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> Experience:  # type: ignore[override]
        """Experience ``i``: its array fields are views into the columns, its metadata
        objects (info, metrics, messages, ...) the item's own."""
        n = len(self.items)
        if not -n <= i < n:
            raise IndexError(f"experience index {i} out of range for a batch of {n}")
        i %= n
        return unpack(self, i, i + 1)[0]

    def __iter__(self) -> Iterator[Experience]:
        n = len(self.items)
        for start in range(0, n, _ITER_CHUNK):
            yield from unpack(self, start, min(start + _ITER_CHUNK, n))

    def to_experiences(self) -> list[Experience]:
        """Every experience, as ``self[i]`` gives it, made in one pass."""
        return unpack(self, 0, len(self.items))

    def column(self, name: str) -> ArrayColumn | None:
        """The ArrayColumn of an array field, or None when no item has it."""
        if name not in ARRAY_FIELDS:
            raise KeyError(f"{name!r} is not an array field; expected one of {ARRAY_FIELDS}")
        return self.columns.get(name)

    @property
    def eids(self) -> list[EID]:
        return [EID(e.batch, e.task, e.run, e.step, e.suffix) for e in
                (item.eid for item in self.items)]

    def meta(self, name: str) -> list[Any]:
        """One metadata field (e.g. ``"info"``, ``"response_text"``) of every item."""
        if name not in META_FIELDS:
            raise KeyError(f"{name!r} is not a metadata field; expected one of {META_FIELDS}")
        return [getattr(item, name) for item in self.items]

    def response_lengths(self) -> np.ndarray:
        lengths: np.ndarray = self.columns["tokens"].lengths() - self.prompt_lengths
        return lengths

    @classmethod
    def concat(cls, batches: Sequence[ExperienceBatch]) -> ExperienceBatch:
        """Join batches; each array column is copied once into one contiguous buffer."""
        if len(batches) == 1:
            return batches[0]
        if not batches:
            return cls([], {}, np.zeros(0), None, np.zeros(0, np.int64))
        items = [item for b in batches for item in b.items]
        names = [n for n in ARRAY_FIELDS if any(n in b.columns for b in batches)]
        columns: dict[str, ArrayColumn] = {}
        joined: dict[tuple[int, ...], ArrayColumn] = {}   # a column under two names stays one
        for name in names:
            key = tuple(id(b.columns.get(name)) for b in batches)
            if key in joined:
                columns[name] = joined[key]
                continue
            parts, lengths, present = [], [], []
            for b in batches:
                col = b.columns.get(name)
                if col is None:
                    lengths.append(np.zeros(len(b), dtype=np.int64))
                    present.append(np.zeros(len(b), dtype=np.bool_))
                    continue
                parts.extend(col.segments())
                lengths.append(col.lengths())
                present.append(np.ones(len(b), dtype=np.bool_) if col.present is None
                               else col.present)
            dtype = np.result_type(*(p.dtype for p in parts))
            data = np.concatenate(parts, dtype=dtype) if parts else np.zeros(0, dtype)
            offsets = np.zeros(len(items) + 1, dtype=np.int64)
            np.cumsum(np.concatenate(lengths), out=offsets[1:])
            mask = np.concatenate(present)
            columns[name] = joined[key] = ArrayColumn.from_offsets(
                data, offsets, None if mask.all() else mask)
        rewards = np.concatenate([b.rewards for b in batches])
        masks = [np.ones(len(b), np.bool_) if b.reward_present is None else b.reward_present
                 for b in batches]
        reward_present = np.concatenate(masks)
        prompt_lengths = np.concatenate([b.prompt_lengths for b in batches])
        return cls(items, columns, rewards, None if reward_present.all() else reward_present,
                   prompt_lengths)

    def to_padded(self, pad_token_id: int, *, max_prompt_length: int | None = None,
                  max_response_length: int | None = None,
                  return_tensors: str = "np") -> dict[str, Any]:
        """Trainer layout (as Trinity's gather_* helpers): prompts left-padded to
        ``max_prompt_length``, responses right-padded to ``max_response_length``.

        Returns ``input_ids``, ``attention_mask``, ``position_ids`` [B, P+R];
        ``action_mask`` and every float response column present in all items [B, R];
        ``rewards``, ``prompt_lengths``, ``response_lengths`` [B]. Items without an
        action mask get ones over their response (Trinity's single-turn default).
        ``return_tensors="pt"`` gives zero-copy torch tensors of the same arrays."""
        n = len(self)
        tokens = self.columns.get("tokens")
        plen = self.prompt_lengths
        rlen = self.response_lengths() if n else np.zeros(0, np.int64)
        if n and ((rlen < 0).any() or (plen < 0).any()):
            raise ValueError("an experience has prompt_length outside 0..len(tokens)")
        p_max = int(plen.max(initial=0)) if max_prompt_length is None else max_prompt_length
        r_max = int(rlen.max(initial=0)) if max_response_length is None else max_response_length
        if n and (plen.max() > p_max or rlen.max() > r_max):
            raise ValueError(f"experiences longer than max_prompt_length={p_max} / "
                             f"max_response_length={r_max}")
        dtype = tokens.dtype if tokens is not None else np.dtype(np.int32)
        input_ids = np.full((n, p_max + r_max), pad_token_id, dtype=dtype)
        attention = np.zeros((n, p_max + r_max), dtype=np.bool_)
        action = np.zeros((n, r_max), dtype=np.bool_)
        out: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention}
        resp_cols = {name: np.zeros((n, r_max), dtype=col.dtype)
                     for name, col in self.columns.items()
                     if col.dtype.kind == "f" and col.present is None}
        masks = self.columns.get("action_mask")
        # tokens is set whenever n > 0: every experience has tokens
        for i in range(n):
            p, r = int(plen[i]), int(rlen[i])
            start = p_max - p
            input_ids[i, start:p_max + r] = tokens[i]  # type: ignore[index]
            attention[i, start:p_max + r] = True
            mask = masks[i] if masks is not None else None
            if mask is None:
                action[i, :r] = True
            else:
                action[i, :len(mask)] = mask
            for name, arr in resp_cols.items():
                values = self.columns[name][i]
                arr[i, :len(values)] = values  # type: ignore[arg-type]  # present in all
        out["position_ids"] = np.clip(np.cumsum(attention, axis=1) - 1, 0, None)
        out["action_mask"] = action
        out.update(resp_cols)
        out["rewards"] = self.rewards.copy()
        out["prompt_lengths"] = plen.copy()
        out["response_lengths"] = rlen
        if return_tensors == "pt":
            return {k: to_torch(v) for k, v in out.items()}
        if return_tensors != "np":
            raise ValueError(f"return_tensors must be 'np' or 'pt', got {return_tensors!r}")
        return out

    def __repr__(self) -> str:
        return f"ExperienceBatch({len(self)} experiences, columns={list(self.columns)})"
