"""Measure where to put the near-duplicate threshold: Jaccard similarity of character n-grams.

Positives: paraphrase pairs in tests/data/near_dup_zh.json (must be found). Negatives: distinct poems
sharing phrases and templated questions in the same file, plus every pair of distinct records in the
shipped sample data (must be kept). Prints, per n-gram size, the lowest positive and highest negative
similarity (exact Jaccard of n-gram sets), then the MinHash estimates for the chosen setting.

    python scripts/bench/dedup_threshold.py
"""

from __future__ import annotations

import itertools
import json
import statistics
from pathlib import Path

from finetune.data.dedup import NearIndex, shingle_hashes
from finetune.data.layer import text_pieces
from finetune.data.records import read_records

ROOT = Path(__file__).resolve().parents[2]


def grams(text: str, n: int) -> set[int]:
    return set(shingle_hashes(text, n).tolist())


def jaccard(a: str, b: str, n: int) -> float:
    x, y = grams(a, n), grams(b, n)
    return len(x & y) / len(x | y)


def estimate(index: NearIndex, a: str, b: str) -> float:
    """MinHash estimate of the Jaccard similarity of two texts."""
    return float((index.signature(a) == index.signature(b)).mean())


def main() -> None:
    labelled = json.loads((ROOT / "tests/data/near_dup_zh.json").read_text(encoding="utf-8"))
    shipped = []
    for name, fmt in (("culture_sft.jsonl", "chat"), ("culture_instructions.jsonl", "instruction")):
        shipped += ["\n".join(text_pieces(r, fmt)) for r in read_records(ROOT / "recipes/data" / name, fmt).records]
    print(
        f"{len(labelled['paraphrases'])} paraphrase pairs, {len(labelled['distinct'])} distinct pairs, "
        f"{len(shipped)} shipped records ({len(shipped) * (len(shipped) - 1) // 2} pairs)"
    )
    print("shingles: runs of 1..n units (a CJK character or a word); exact Jaccard of the shingle sets")
    print("n  paraphrase min / median   distinct max   shipped max   gap")
    for n in range(1, 5):
        pos = [jaccard(a, b, n) for a, b in labelled["paraphrases"]]
        neg = [jaccard(a, b, n) for a, b in labelled["distinct"]]
        sets = [grams(t, n) for t in shipped]
        ship = max(len(x & y) / len(x | y) for x, y in itertools.combinations(sets, 2))
        print(
            f"{n}  {min(pos):.3f} / {statistics.median(pos):.3f}          {max(neg):.3f}          {ship:.3f}"
            f"         {min(pos) - max(max(neg), ship):+.3f}"
        )
    for n, num_perm, threshold in ((2, 128, 0.55), (2, 256, 0.55), (1, 128, 0.6)):
        index = NearIndex(threshold, n, num_perm)
        pos = sorted(estimate(index, a, b) for a, b in labelled["paraphrases"])
        neg = sorted(estimate(index, a, b) for a, b in labelled["distinct"])
        found = sum(p >= threshold for p in pos)
        kept = sum(d < threshold for d in neg)
        print(
            f"MinHash n={n} num_perm={num_perm} threshold {threshold}: paraphrases found {found}/{len(pos)} "
            f"(estimates {pos[0]:.2f}..{pos[-1]:.2f}), distinct kept {kept}/{len(neg)} (max estimate {neg[-1]:.2f})"
        )
    index = NearIndex(0.5, 2, 128)
    pos = [estimate(index, a, b) for a, b in labelled["paraphrases"]]
    neg = [estimate(index, a, b) for a, b in labelled["distinct"]]
    sigs = [index.signature(t) for t in shipped]
    ship = sorted(float((x == y).mean()) for x, y in itertools.combinations(sigs, 2))[-1]
    print(f"sweep, n=2 num_perm=128 (shipped data: highest estimate over all pairs {ship:.2f})")
    for threshold in (0.4, 0.45, 0.5, 0.55, 0.6, 0.65):
        print(
            f"  threshold {threshold}: paraphrases found {sum(p >= threshold for p in pos)}/{len(pos)}, "
            f"distinct kept {sum(d < threshold for d in neg)}/{len(neg)}, shipped pairs merged "
            f"{sum(float((x == y).mean()) >= threshold for x, y in itertools.combinations(sigs, 2))}"
        )


if __name__ == "__main__":
    main()
