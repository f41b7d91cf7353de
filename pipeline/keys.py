"""A compact set of recipient keys, for rejecting duplicated keys.

Keys are kept as 64-bit hashes in sorted NumPy runs merged like an LSM tree:
8 bytes a key instead of a Python string (~60 bytes), and each chunk of rows is
checked with one vectorised search per run. Hashes are the interpreter's own
``hash(str)``: stable within a process, which is all that is needed because a
resume rebuilds the set by re-reading the source. Two distinct keys share a
64-bit hash with probability about n²/2⁶⁵ (3·10⁻⁶ at 10 million keys); the
second would then be rejected as a duplicate, visibly, in the ledger.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

__all__ = ("KeySet", "plain_keys")

_NOTE_BATCH = 1 << 20  # noted keys sorted into a run at a time


def plain_keys(column: Sequence[str]) -> bool:
    """True when every key of a chunk's key column is non-empty text that encodes as UTF-8
    (ASCII or not: the column path takes them); False sends the chunk row by row, where
    each bad key is rejected with its reason."""
    if "" in column:
        return False
    joined = "".join(column)
    if joined.isascii():
        return True
    try:
        joined.encode("utf-8")
    except UnicodeEncodeError:  # undecodable bytes (surrogate escapes) in some key
        return False
    return True


class KeySet:
    """Remembers keys; reports which of a chunk were seen before."""

    def __init__(self) -> None:
        self._runs: list[npt.NDArray[np.int64]] = []
        self._noted: list[npt.NDArray[np.int64]] = []  # keys taken on trust, not yet in a run
        self._noted_n = 0
        self.size = 0

    def note(self, keys: Sequence[str]) -> None:
        """Add keys already known to be settled (a resume's rows), without checking them: they
        are sorted into the set a million at a time, not searched for chunk by chunk."""
        if keys:
            self._noted.append(np.fromiter((hash(k) for k in keys), dtype=np.int64, count=len(keys)))
            self._noted_n += len(keys)
            if self._noted_n >= _NOTE_BATCH:
                self._settle_noted()

    def _settle_noted(self) -> None:
        if not self._noted:
            return
        run = np.sort(np.concatenate(self._noted))
        run = run[np.concatenate(([True], run[1:] != run[:-1]))]  # distinct
        self._noted, self._noted_n = [], 0
        for old in self._runs:  # already present: not counted twice
            idx = np.searchsorted(old, run)
            idx[idx == len(old)] = len(old) - 1
            run = run[old[idx] != run]
        self._push(run)

    def _push(self, run: npt.NDArray[np.int64]) -> None:
        if not len(run):
            return
        self._runs.append(run)
        self.size += len(run)
        # Merge while the newest run is as big as the one before it (sorted in place: a
        # merge of two 5M-key runs needs 1.5x their size, not 3x).
        while len(self._runs) > 1 and len(self._runs[-1]) >= len(self._runs[-2]):
            b = self._runs.pop()
            a = self._runs.pop()
            merged = np.concatenate((a, b))
            del a, b
            merged.sort(kind="mergesort")
            self._runs.append(merged)

    def contains(self, keys: Sequence[str]) -> list[bool]:
        """Per key, whether it is in the set (nothing is added)."""
        if not keys:
            return []
        self._settle_noted()
        h = np.fromiter((hash(k) for k in keys), dtype=np.int64, count=len(keys))
        found = np.zeros(len(keys), dtype=bool)
        for run in self._runs:
            idx = np.searchsorted(run, h)
            idx[idx == len(run)] = len(run) - 1
            found |= run[idx] == h
        return found.tolist()

    def add(self, keys: Sequence[str]) -> list[bool]:
        """Add ``keys``; return, per key, whether it was already present
        (earlier in the set or earlier in this same chunk)."""
        n = len(keys)
        if n == 0:
            return []
        self._settle_noted()
        h = np.fromiter((hash(k) for k in keys), dtype=np.int64, count=n)
        # Within the chunk: every occurrence after the first is a duplicate (a stable sort
        # keeps equal hashes in order; np.unique is hash-based and ~10x slower here).
        order = np.argsort(h, kind="stable")
        ordered = h[order]
        dup = np.empty(n, dtype=bool)
        dup[order] = np.concatenate(([False], ordered[1:] == ordered[:-1]))
        for run in self._runs:
            idx = np.searchsorted(run, h)
            idx[idx == len(run)] = len(run) - 1
            dup |= run[idx] == h
        self._push(np.sort(h[~dup]))
        return dup.tolist()
