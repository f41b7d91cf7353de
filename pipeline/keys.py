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

__all__ = ("KeySet",)


class KeySet:
    """Remembers keys; reports which of a chunk were seen before."""

    def __init__(self) -> None:
        self._runs: list[npt.NDArray[np.int64]] = []
        self.size = 0

    def contains(self, keys: Sequence[str]) -> list[bool]:
        """Per key, whether it is in the set (nothing is added)."""
        if not keys:
            return []
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
        h = np.fromiter((hash(k) for k in keys), dtype=np.int64, count=n)
        dup = np.zeros(n, dtype=bool)
        # Within the chunk: every occurrence after the first is a duplicate.
        _, first = np.unique(h, return_index=True)
        if len(first) != n:
            dup[:] = True
            dup[first] = False
        for run in self._runs:
            idx = np.searchsorted(run, h)
            idx[idx == len(run)] = len(run) - 1
            dup |= run[idx] == h
        new = np.sort(h[~dup])
        if len(new):
            self._runs.append(new)
            self.size += len(new)
            # Merge while the newest run is as big as the one before it.
            while len(self._runs) > 1 and len(self._runs[-1]) >= len(self._runs[-2]):
                b = self._runs.pop()
                a = self._runs.pop()
                self._runs.append(np.sort(np.concatenate((a, b)), kind="mergesort"))
        return dup.tolist()
