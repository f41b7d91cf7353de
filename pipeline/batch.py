"""Batch: group rendered messages into provider requests.

Messages with the same provider ``batch_key`` share a request (Aliyun: one
template; SUBMAIL batchsend: one content). A batch leaves when it is full;
a partial one leaves after ``linger`` seconds so a slow source never stalls
sending, and everything left leaves when the source ends.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable

from providers.base import Batch, Message

__all__ = ("Batcher",)


class Batcher:
    """Accumulates messages per batch key and hands out full batches."""

    def __init__(self, size: int, key: Callable[[Message], Hashable], first_id: int = 1) -> None:
        if size < 1:
            raise ValueError("batch size must be at least 1")
        self.size = size
        self._key = key
        self._open: dict[Hashable, list[Message]] = {}
        self._next_id = first_id
        self.pending = 0  # messages waiting in partial batches

    def new_id(self) -> int:
        """The next batch id of the run (the dispatcher takes them for the parts of a split batch)."""
        self._next_id += 1
        return self._next_id - 1

    def _seal(self, messages: list[Message]) -> Batch:
        return Batch(self.new_id(), messages)

    def add(self, messages: list[Message]) -> list[Batch]:
        """Add messages; return the batches that filled up."""
        if not messages:
            return []
        self.pending += len(messages)
        keys = list(map(self._key, messages))
        if keys.count(keys[0]) == len(keys):  # one key (usual: a campaign-wide template): slices
            return self._add_run(keys[0], messages)
        full: list[Batch] = []
        size = self.size
        for k, m in zip(keys, messages, strict=True):
            group = self._open.get(k)
            if group is None:
                group = self._open[k] = []
            group.append(m)
            if len(group) >= size:
                full.append(self._seal(group))
                del self._open[k]
        self.pending -= sum(len(b.messages) for b in full)
        return full

    def _add_run(self, key: Hashable, messages: list[Message]) -> list[Batch]:
        group = self._open.pop(key, None)
        if group is None:
            group = messages
        else:
            group.extend(messages)
        size = self.size
        whole = len(group) - len(group) % size
        full = [self._seal(group[i : i + size]) for i in range(0, whole, size)]
        if whole < len(group):
            self._open[key] = group[whole:] if whole else group[:]
        self.pending -= whole
        return full

    def drain(self) -> list[Batch]:
        """Every partial batch, now (on linger or at the end of the source)."""
        out = [self._seal(group) for group in self._open.values()]
        self._open.clear()
        self.pending = 0
        return out
