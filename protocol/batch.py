"""A keyed batch: per-sample tensors, arrays and lists by name, with concat / select / split.

Like verl's ``DataProto``: what crosses actors (a rollout batch) and what the learner holds
(an epoch's samples) is one ``KeyedBatch``.  Every value in ``data`` has the batch's length
as its first dimension; ``meta`` holds what is shared by the whole batch (e.g. the DDIM
timesteps).  An algorithm that needs more per sample adds a key (``"zmv/latents"``), never
a field.  Imports only torch and numpy (no diffusers, no Ray), so every layer may use it.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

Value = torch.Tensor | np.ndarray | list


def _length(value: Value) -> int:
    return len(value)


def _select(value: Value, indices: Sequence[int]) -> Value:
    if isinstance(value, torch.Tensor):
        return value[torch.as_tensor(list(indices), dtype=torch.long)] if len(indices) else value[:0]
    if isinstance(value, np.ndarray):
        return value[np.asarray(list(indices), dtype=np.int64)]
    return [value[i] for i in indices]


def _concat(values: list[Value]) -> Value:
    first = values[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(values)
    if isinstance(first, np.ndarray):
        return np.concatenate(values)
    return [v for part in values for v in part]


@dataclass
class KeyedBatch:
    """``data``: name -> per-sample value ([N, ...] tensor, [N, ...] array or length-N list);
    ``meta``: name -> a value shared by the whole batch."""

    data: dict[str, Value] = field(default_factory=dict)
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        lengths = {k: _length(v) for k, v in self.data.items()}
        if len(set(lengths.values())) > 1:
            raise ValueError(f"a KeyedBatch's values must have one length, got {lengths}")

    def __len__(self) -> int:
        return _length(next(iter(self.data.values()))) if self.data else 0

    def __contains__(self, key: str) -> bool:
        return key in self.data

    def __getitem__(self, key: str) -> Value:
        return self.data[key]

    def __setitem__(self, key: str, value: Value) -> None:
        if self.data and _length(value) != len(self):
            raise ValueError(f"key {key!r} has {_length(value)} rows, the batch {len(self)}")
        self.data[key] = value

    def __iter__(self) -> Iterator[str]:
        return iter(self.data)

    def keys(self):
        return self.data.keys()

    def get(self, key: str, default=None):
        return self.data.get(key, default)

    def select(self, indices: Sequence[int]) -> KeyedBatch:
        """The rows ``indices``, in that order (meta is shared)."""
        indices = [int(i) for i in indices]
        return KeyedBatch({k: _select(v, indices) for k, v in self.data.items()}, dict(self.meta))

    def split(self, size: int) -> list[KeyedBatch]:
        """Consecutive batches of ``size`` rows (the last may be shorter)."""
        return [self.select(range(start, min(start + size, len(self)))) for start in range(0, len(self), size)]

    @classmethod
    def concat(cls, batches: Sequence[KeyedBatch]) -> KeyedBatch:
        """Rows of every batch in order; all must hold the same keys.  Meta is the first's."""
        batches = list(batches)
        if not batches:
            return cls()
        keys = list(batches[0].data)
        for b in batches[1:]:
            if list(b.data) != keys:
                raise ValueError(f"cannot concatenate batches with keys {keys} and {list(b.data)}")
        return cls({k: _concat([b.data[k] for b in batches]) for k in keys}, dict(batches[0].meta))
