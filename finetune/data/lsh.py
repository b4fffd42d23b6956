"""A compact LSH index for streaming near-duplicate search over millions of MinHash signatures.

datasketch computes the signatures; its `MinHashLSH` keeps every band bucket as a Python set, which
measured 9.3 KB per record at 32 bands (tracemalloc, 20,000 records): a 1 GB JSONL of short records
would need about 26 GB. Here each band entry is 12 bytes in sorted numpy arrays (a 64-bit band hash
and a 32-bit record number) and each signature 4 bytes per permutation in a chunked array: about
0.9 KB per record at 128 permutations. Recently added entries wait in a small dict and are merged
into sorted segments in batches, so lookups stay a few `searchsorted` calls.
"""

from __future__ import annotations

import itertools

import numpy as np

BUFFER_RECORDS = 4096  # records whose band entries wait in a dict before they are sorted into a segment
CHUNK_RECORDS = 65536  # signatures are stored in blocks of this many rows
_MIX = np.uint64(0x9E3779B97F4A7C15)


def band_shape(threshold: float, num_perm: int, recall: float = 0.95) -> tuple[int, int]:
    """(bands, rows): the most rows per band that still makes a pair at `threshold` a candidate with `recall`.

    More rows per band mean fewer chance candidates; the signature comparison then applies the
    threshold exactly, so the banding only has to be generous enough not to miss true pairs.
    """
    best = (num_perm, 1)
    for rows in range(1, num_perm + 1):
        bands = num_perm // rows
        if bands < 2:
            break
        if 1 - (1 - threshold**rows) ** bands >= recall:
            best = (bands, rows)
    return best


class CompactLSH:
    """Signatures and their band hashes; `candidates` returns record numbers sharing any band."""

    def __init__(self, threshold: float, num_perm: int):
        self.num_perm = num_perm
        self.bands, self.rows = band_shape(threshold, num_perm)
        self._band_salt = (np.arange(self.bands, dtype=np.uint64) + np.uint64(1)) * _MIX
        self._chunks: list[np.ndarray] = []
        self.count = 0
        self._pending: dict[int, int] = {}  # band key -> the latest record with it, until the next flush
        self._pending_records = 0
        self._segments: list[tuple[np.ndarray, np.ndarray]] = []  # (sorted band keys, record numbers)

    def band_keys(self, signature: np.ndarray) -> np.ndarray:
        """One 64-bit key per band: a polynomial hash of the band's rows, salted by the band's number."""
        rows = signature[: self.bands * self.rows].astype(np.uint64).reshape(self.bands, self.rows)
        keys = np.zeros(self.bands, dtype=np.uint64)
        with np.errstate(over="ignore"):
            for i in range(self.rows):
                keys = keys * _MIX + rows[:, i]
            return keys ^ self._band_salt

    def candidates(self, keys: np.ndarray) -> set[int]:
        """Numbers of the records that share at least one band key."""
        found = set(map(self._pending.get, keys.tolist()))
        found.discard(None)
        for sorted_keys, numbers in self._segments:
            left = np.searchsorted(sorted_keys, keys, side="left")
            right = np.searchsorted(sorted_keys, keys, side="right")
            for band in np.flatnonzero(right > left).tolist():  # usually none: no Python loop over every band
                found.update(numbers[left[band] : right[band]].tolist())
        return found

    def signature_of(self, number: int) -> np.ndarray:
        """The stored signature of record `number`."""
        return self._chunks[number // CHUNK_RECORDS][number % CHUNK_RECORDS]

    def add(self, signature: np.ndarray, keys: np.ndarray) -> int:
        """Store a signature and its band keys; returns its record number."""
        number = self.count
        if number % CHUNK_RECORDS == 0:
            self._chunks.append(np.empty((CHUNK_RECORDS, self.num_perm), dtype=np.uint32))
        self._chunks[-1][number % CHUNK_RECORDS] = signature
        self.count += 1
        # two kept records sharing a band key within one buffer keep only the later one for that band;
        # the earlier is still found through its other bands (a dict of lists here cost a third of the time)
        self._pending.update(zip(keys.tolist(), itertools.repeat(number)))
        self._pending_records += 1
        if self._pending_records >= BUFFER_RECORDS:
            self._flush()
        return number

    def _flush(self) -> None:
        keys = np.fromiter(self._pending.keys(), dtype=np.uint64, count=len(self._pending))
        numbers = np.fromiter(self._pending.values(), dtype=np.uint32, count=len(self._pending))
        order = np.argsort(keys, kind="stable")
        self._segments.append((keys[order], numbers[order]))
        self._pending, self._pending_records = {}, 0
        # merge while the newest segment is at least half the size of the one before: O(log n) segments
        while len(self._segments) > 1 and len(self._segments[-1][0]) * 2 >= len(self._segments[-2][0]):
            (k2, n2), (k1, n1) = self._segments.pop(), self._segments.pop()
            keys, numbers = np.concatenate([k1, k2]), np.concatenate([n1, n2])
            order = np.argsort(keys, kind="stable")
            self._segments.append((keys[order], numbers[order]))
