"""Duplicates: exact (hash of the normalised text) and near (MinHash/LSH over character n-grams, datasketch).

Shingles are runs of characters in Chinese and of words in English: no word segmentation needed. Near
duplicates are found in one streaming pass: each record is looked up in the LSH index of the records
kept so far, candidates are confirmed by comparing signatures, and a record that survives is added.
Memory per kept record: exact, one 8-byte digest in a set (~70 bytes with Python's overhead); near,
its signature (4 bytes x num_perm) and 12 bytes per LSH band (finetune/data/lsh.py): ~0.9 KB at 128
permutations (measured by scripts/bench/data_layer.py).
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
import zlib
from collections.abc import Iterable
from dataclasses import dataclass, field

from finetune.errors import WenmaiError

_NOT_WORD = re.compile(r"[\W_]+")  # whitespace, punctuation and symbols, in any script
_UNIT = re.compile(r"[\u3040-\u30ff\u3400-\u9fff\uf900-\ufaff]|[^\W_]+")


def normalise(text: str) -> str:
    """NFKC, case-folded, without whitespace, punctuation and symbols: what 'the same text' means for dedup."""
    return _NOT_WORD.sub("", unicodedata.normalize("NFKC", text).casefold())


def digest(normalised: str) -> int:
    """A stable 64-bit hash of normalised text."""
    return int.from_bytes(hashlib.blake2b(normalised.encode("utf-8"), digest_size=8).digest(), "little")


def shingle_hashes(text: str, n: int, cache: dict[str, int] | None = None):
    """32-bit hashes of every run of 1 to `n` units; a unit is a CJK character or a word of another script.

    Runs of one and two units together separate reworded duplicates from distinct records far better
    than either alone (scripts/bench/dedup_threshold.py), and a unit-based run is a character n-gram
    in Chinese and a word n-gram in English, so neither language drowns in the other's statistics.
    `cache` maps units to their crc32 (units repeat a lot: it saves most of the hashing).
    """
    import numpy as np

    cache = {} if cache is None else cache
    units = _UNIT.findall(unicodedata.normalize("NFKC", text).casefold()) or [""]
    hashes = list(map(cache.get, units))
    if None in hashes:
        for i, h in enumerate(hashes):
            if h is None:
                hashes[i] = cache[units[i]] = zlib.crc32(units[i].encode("utf-8"))
    single = np.array(hashes, dtype=np.uint64)
    runs, current = [single], single
    for size in range(2, n + 1):
        if len(units) < size:
            break
        current = (current[:-1] * 0x9E3779B1 + single[size - 1 :] + size) & 0xFFFFFFFF  # polynomial hash of the run
        runs.append(current)
    return np.concatenate(runs).astype(np.uint32)


class NearIndex:
    """MinHash signatures (datasketch) in a compact LSH index; `similar` confirms candidates by their signatures."""

    def __init__(self, threshold: float, ngram: int, num_perm: int):
        try:
            from datasketch import MinHash
        except ImportError:
            raise WenmaiError(
                "near-duplicate detection (data.policy.dedup.near, or checks against evaluation sets) "
                "needs datasketch: pip install 'wenmai[data]'"
            ) from None
        from finetune.data.lsh import CompactLSH  # numpy arrays: loaded only where near-duplicate search runs

        self.threshold, self.ngram, self.num_perm = threshold, ngram, num_perm
        self._minhash = MinHash(num_perm=num_perm, seed=1, hashfunc=int)  # cleared and reused for every text
        self._lsh = CompactLSH(threshold, num_perm)
        self._unit_hashes: dict[str, int] = {}
        self.labels: list[str] = []

    def signature(self, text: str):
        """The MinHash of a text's shingles (already hashed: crc32 of units, stable across runs and fast)."""
        self._minhash.clear()
        self._minhash.update_batch(shingle_hashes(text, self.ngram, self._unit_hashes).tolist())
        return self._minhash.hashvalues.copy()

    def similar(self, signature, keys=None) -> int | None:
        """The number of an indexed text whose estimated Jaccard similarity reaches the threshold, or None."""
        import numpy as np

        keys = self._lsh.band_keys(signature) if keys is None else keys
        candidates = sorted(self._lsh.candidates(keys))
        if not candidates:
            return None
        stacked = np.stack([self._lsh.signature_of(n) for n in candidates])
        agreement = (stacked == signature).mean(axis=1)
        best = int(np.argmax(agreement))
        return candidates[best] if agreement[best] >= self.threshold else None

    def band_keys(self, signature):
        """The signature's LSH band keys (computed once, used to look up and then to add)."""
        return self._lsh.band_keys(signature)

    def add(self, signature, label: str | None = None, keys=None) -> int:
        """Index a signature; returns its number."""
        if label is not None:  # an index of evaluation text labels every entry with its source
            self.labels.append(label)
        return self._lsh.add(signature, self._lsh.band_keys(signature) if keys is None else keys)


@dataclass
class ReferenceIndex:
    """Text of evaluation sets that training must not contain: exact digests and a near index of pieces."""

    min_chars: int
    exact: dict[int, str] = field(default_factory=dict)  # digest -> label (eval file or dataset)
    near: NearIndex | None = None
    pieces: int = 0

    def add(self, texts: Iterable[str], label: str) -> None:
        for text in texts:
            norm = normalise(text)
            if len(norm) < self.min_chars:
                continue
            self.pieces += 1
            self.exact.setdefault(digest(norm), label)
            if self.near is not None:
                self.near.add(self.near.signature(text), label)

    def match(self, texts: Iterable[str]) -> str | None:
        """The label of the evaluation set one of these texts repeats or paraphrases, or None."""
        for text in texts:
            norm = normalise(text)
            if len(norm) < self.min_chars:
                continue
            label = self.exact.get(digest(norm))
            if label is None and self.near is not None:
                key = self.near.similar(self.near.signature(text))
                label = self.near.labels[key] if key is not None else None
            if label is not None:
                return label
        return None


class Deduplicator:
    """Streaming dedup of records (given as their text pieces); remembers what it kept."""

    def __init__(self, options, reference: ReferenceIndex | None = None):
        self.exact = options.exact
        self.near = NearIndex(options.threshold, options.ngram, options.num_perm) if options.near else None
        self.reference = reference
        self._seen: set[int] = set()

    def verdict(self, pieces: list[str]) -> str | None:
        """Why this record is a duplicate (`exact`, `near`, or `eval: <set>`), or None; records it when kept."""
        if self.reference is not None:
            label = self.reference.match(pieces)
            if label is not None:
                return f"eval: {label}"
        if not (self.exact or self.near):
            return None
        text = "\n".join(pieces)
        key = digest(normalise(text))
        if self.exact and key in self._seen:
            return "exact"
        signature = keys = None
        if self.near is not None:
            signature = self.near.signature(text)
            keys = self.near.band_keys(signature)
            if self.near.similar(signature, keys) is not None:
                return "near"
        if self.exact:
            self._seen.add(key)
        if signature is not None:
            self.near.add(signature, keys=keys)
        return None
